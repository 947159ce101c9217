"""The memory is configured in one place: ``MbPA(memory=...)`` or the convenience arguments.

Every memory setting survives ``state_dict``/``load_state_dict`` (loaded with
``weights_only=True``) and pickling; checkpoints are checked against the memory's own
configuration; a memory can be built from YAML by jsonargparse, as LightningCLI does.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mbpa import EpisodicMemory, MbPA
from tests.helpers import TinyClassifier, blobs, loader

ADAPT = dict(adaptation_steps=3, adaptation_lr=0.5, beta=0.1)
HNSW = dict(capacity=500, index="HNSW32", index_params="efSearch=64", seed=3)


def _filled(memory: EpisodicMemory) -> tuple[MbPA, TinyClassifier]:
    model, cb = TinyClassifier(), MbPA(k=4, **ADAPT)
    cb.memory = memory
    cb.populate(model, loader(*blobs(120, seed=0)))
    return cb, model


def _settings(memory: EpisodicMemory) -> tuple:
    return (
        memory.capacity,
        memory.eviction,
        memory.index_string,
        memory.index_params,
        memory.backend,
        str(memory.device),
    )


def _assert_same_contents(got: EpisodicMemory, expected: EpisodicMemory) -> None:
    assert len(got) == len(expected) == 120
    assert torch.equal(got.keys, expected.keys) and torch.equal(got.values, expected.values)
    q = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    a, b = got.search(q, 5), expected.search(q, 5)
    assert torch.equal(a.indices, b.indices)
    # A restored HNSW graph is built in one add, the original batch by batch (with OpenMP), so
    # faiss may compute a pair's distance through another SIMD path: equal up to float rounding.
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-6, atol=1e-6)


def test_an_hnsw_memory_with_index_params_survives_state_dict_and_load_state_dict():
    cb, _ = _filled(EpisodicMemory(**HNSW))
    expected = _settings(cb.memory)
    assert expected == (500, "fifo", "HNSW32", "efSearch=64", "faiss", "cpu")
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["memory_config"] == cb.memory.config
    cb.load_state_dict(state)  # into the same callback: the same memory
    assert _settings(cb.memory) == expected
    fresh = MbPA(k=4, memory=EpisodicMemory(**HNSW), **ADAPT)
    fresh.load_state_dict(state)
    assert _settings(fresh.memory) == expected
    _assert_same_contents(fresh.memory, cb.memory)


def test_an_hnsw_memory_with_index_params_survives_pickling():
    cb, _ = _filled(EpisodicMemory(**HNSW))
    copy = pickle.loads(pickle.dumps(cb))
    assert _settings(copy.memory) == _settings(cb.memory)
    assert copy.memory.config == cb.memory.config
    assert (copy.memory_size, copy.index) == (500, "HNSW32")
    _assert_same_contents(copy.memory, cb.memory)
    # the copy keeps working: its parts write to its own memory
    copy.populate(TinyClassifier(), loader(*blobs(16, seed=2)))
    assert len(copy.memory) == 136 and len(cb.memory) == 120


def test_a_checkpoint_of_another_capacity_is_refused_naming_the_memorys_capacity():
    cb, _ = _filled(EpisodicMemory(**HNSW))
    other = MbPA(k=4, memory=EpisodicMemory(capacity=200), **ADAPT)
    before = other.memory.state_dict()
    with pytest.raises(
        MisconfigurationException,
        match=r"MbPA\(memory_size=200\): the checkpoint's memory has capacity 500; use "
        r"memory_size=500 to restore it",
    ):
        other.load_state_dict(cb.state_dict())
    after = other.memory.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_convenience_arguments_read_the_memory_and_clash_with_it():
    cb = MbPA(memory=EpisodicMemory(capacity=64, eviction="reservoir", index="HNSW16"))
    assert (cb.memory_size, cb.eviction, cb.index) == (64, "reservoir", "HNSW16")
    cb.memory = EpisodicMemory(capacity=10)
    assert (cb.memory_size, cb.eviction, cb.index) == (10, "fifo", "Flat")
    plain = MbPA(memory_size=7, eviction="reservoir", index="HNSW8", seed=4)
    assert plain.memory.config["capacity"] == 7 and plain.memory.config["seed"] == 4
    assert (plain.memory_size, plain.eviction, plain.index) == (7, "reservoir", "HNSW8")
    for clash, shown in (
        (dict(memory_size=500), "`memory_size`=500"),
        (dict(eviction="reservoir"), "`eviction`='reservoir'"),
        (dict(index="HNSW32"), "`index`='HNSW32'"),
    ):
        with pytest.raises(MisconfigurationException, match=rf"`memory`=.*{shown}"):
            MbPA(memory=EpisodicMemory(capacity=10), **clash)
    with pytest.raises(MisconfigurationException, match=r"`memory`=.*expected an EpisodicMemory"):
        MbPA(memory="Flat")  # type: ignore[arg-type]


def test_a_memory_given_in_yaml_is_built_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MbPA, "mbpa")
    config = parser.parse_string(
        """
        mbpa:
          k: 4
          memory:
            class_path: lightning_mbpa.EpisodicMemory
            init_args:
              capacity: 500
              index: HNSW32
              index_params: efSearch=64
              backend: faiss
        """
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = instantiate(config).mbpa
    assert isinstance(cb, MbPA) and cb.k == 4
    assert _settings(cb.memory) == (500, "fifo", "HNSW32", "efSearch=64", "faiss", "cpu")
    assert cb.memory_size == 500
