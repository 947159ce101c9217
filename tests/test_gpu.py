"""CUDA: the memory lives on the device and searches there (torch backend); adaptation too.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mbpa import EpisodicMemory, MbPA
from tests.helpers import TinyClassifier, assert_bit_identical, blobs, loader, params, trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ADAPT = dict(k=8, adaptation_steps=3, adaptation_lr=0.5, beta=0.1)


def test_cuda_memory_searches_like_faiss_on_cpu():
    g = torch.Generator().manual_seed(0)
    keys, labels = torch.randn(5000, 64, generator=g), torch.randint(0, 10, (5000,), generator=g)
    queries = torch.randn(100, 64, generator=g)
    cpu = EpisodicMemory(8000)
    cpu.add(keys, labels)
    gpu = EpisodicMemory(8000, device="cuda")
    gpu.add(keys.cuda(), labels.cuda())
    assert gpu.backend == "torch" and gpu.keys.device.type == "cuda"
    a, b = cpu.search(queries, 16), gpu.search(queries.cuda(), 16)
    assert b.keys.device.type == "cuda" and b.values.device.type == "cuda"
    torch.testing.assert_close(b.distances.cpu(), a.distances, rtol=1e-4, atol=1e-3)
    assert (b.indices.cpu() == a.indices).float().mean() > 0.99  # ties may order differently
    assert torch.equal(b.values.cpu(), labels[b.indices.cpu()])


def test_fit_and_predict_on_gpu_match_the_cpu_computation():
    x, y = blobs(96)
    xt, yt = blobs(40, seed=1)
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = MbPA(**ADAPT)
    trainer(callbacks=[cb], accelerator="gpu").fit(model, loader(x, y))
    assert cb.memory.keys.device.type == "cuda" and cb.memory.backend == "torch"
    before = params(model)
    on_gpu = torch.cat(
        trainer(callbacks=[cb], accelerator="gpu").predict(model, loader(xt, yt))
    ).cpu()
    assert_bit_identical(before, model)

    cpu_cb = MbPA(**ADAPT)
    cpu_cb.memory.load_state_dict(
        {key: value.cpu() for key, value in cb.memory.state_dict().items()}
    )
    model = model.cpu()
    on_cpu = torch.cat(trainer(callbacks=[cpu_cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
