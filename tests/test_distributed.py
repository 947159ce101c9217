"""MbPA under DDP: 2 CPU processes (gloo). Every rank must hold the same, complete memory.

The two processes are started once and run fit → test → resumed fit with ``strategy="ddp"``
(Lightning sees them as launched externally), which keeps the test to one process start-up.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_mbpa import MbPA
from tests.helpers import TinyClassifier, blobs, ddp_environment, free_port, loader, trainer

ADAPT = dict(k=8, adaptation_steps=3, adaptation_lr=0.5, beta=0.1)
RANK_ROWS = (45, 40)  # training rows of rank 0 and rank 1


class DumpMemory(Callback):
    """Each rank saves its MbPA memory, so the test can compare ranks."""

    def __init__(self, directory, tag):
        self.directory, self.tag = directory, tag

    def on_fit_end(self, trainer, pl_module):
        mbpa = next(cb for cb in trainer.callbacks if isinstance(cb, MbPA))
        torch.save(
            mbpa.memory.state_dict(),
            os.path.join(self.directory, f"{self.tag}-rank{trainer.global_rank}.pt"),
        )


class LabelOptional(TinyClassifier):
    """A test step that works on batches with or without labels."""

    def test_step(self, batch, batch_idx):
        self(batch[0])


def _worker(rank: int, world: int, port: int, directory: str) -> None:
    ddp_environment(rank, world, port)
    torch.set_num_threads(1)
    x, y = blobs(90)
    xt, yt = blobs(40, seed=1)
    # fit on rank-own shards of different sizes (no distributed sampler): rank 0 has batches of
    # 16, 16, 13 and rank 1 of 16, 16, 8, so the gather pads the last batch of rank 1
    mine = slice(0, RANK_ROWS[0]) if rank == 0 else slice(RANK_ROWS[0], sum(RANK_ROWS))
    ddp = dict(strategy="ddp", devices=world)
    last = os.path.join(directory, "last.ckpt")

    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=directory, save_last=True)
    trainer(
        callbacks=[MbPA(**ADAPT), DumpMemory(directory, "fit"), ckpt],
        enable_checkpointing=True,
        use_distributed_sampler=False,
        **ddp,
    ).fit(TinyClassifier(), loader(x[mine], y[mine]))
    result = trainer(callbacks=[MbPA(**ADAPT)], **ddp).test(
        TinyClassifier(), loader(xt, yt), ckpt_path=last, verbose=False
    )[0]
    if rank == 0:
        with open(os.path.join(directory, "ddp-test.json"), "w") as f:
            json.dump(result, f)
    # only rank 0's test batches carry labels: rank 1 has no accuracy to compute, yet must take
    # part in every collective of the epoch-end logs (or rank 0 waits for it forever)
    mixed = loader(xt[:20], yt[:20]) if rank == 0 else DataLoader(TensorDataset(xt[20:]), 16)
    result = trainer(callbacks=[MbPA(**ADAPT)], use_distributed_sampler=False, **ddp).test(
        LabelOptional(), mixed, ckpt_path=last, verbose=False
    )[0]
    if rank == 0:
        with open(os.path.join(directory, "ddp-mixed.json"), "w") as f:
            json.dump(result, f)
    # resume from rank 0's checkpoint, now storing a random half: same choice on every rank
    trainer(
        callbacks=[MbPA(write_fraction=0.5, **ADAPT), DumpMemory(directory, "resume")],
        max_epochs=2,
        **ddp,
    ).fit(TinyClassifier(), loader(x, y), ckpt_path=last)


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_ddp_ranks_write_identical_complete_memories_test_and_resume(tmp_path):
    context = mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 600  # a rank left waiting in a collective would hang forever
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish: a collective was not called on every rank")
    _, y = blobs(90)
    xt, yt = blobs(40, seed=1)

    rank0, rank1 = _load(tmp_path / "fit-rank0.pt"), _load(tmp_path / "fit-rank1.pt")
    _assert_same(rank0, rank1)
    # every example of every rank, step by step in rank order (rank 1's short batch unpadded)
    shards = y[: RANK_ROWS[0]].split(16), y[RANK_ROWS[0] : sum(RANK_ROWS)].split(16)
    expected = torch.cat([torch.cat(step) for step in zip(*shards, strict=True)])
    assert torch.equal(rank0["values"], expected)
    saved = _load(tmp_path / "last.ckpt")["callbacks"][MbPA(**ADAPT).state_key]["memory"]
    _assert_same(saved, rank0)  # rank 0's checkpoint holds the complete memory

    # each rank adapted its own queries on its full memory; the synced metrics equal one
    # process testing everything from the same checkpoint
    single = trainer(callbacks=[MbPA(**ADAPT)]).test(
        TinyClassifier(), loader(xt, yt), ckpt_path=tmp_path / "last.ckpt", verbose=False
    )[0]
    both = json.loads((tmp_path / "ddp-test.json").read_text())
    for key in ("test_acc", "mbpa/base_acc", "mbpa/adapted_acc", "mbpa/memory_size"):
        assert both[key] == pytest.approx(single[key]), key
    # with labels on rank 0 only, the accuracies are those of rank 0's batches
    mixed = json.loads((tmp_path / "ddp-mixed.json").read_text())
    rank0_only = trainer(callbacks=[MbPA(**ADAPT)]).test(
        TinyClassifier(), loader(xt[:20], yt[:20]), ckpt_path=tmp_path / "last.ckpt", verbose=False
    )[0]
    for key in ("mbpa/base_acc", "mbpa/adapted_acc", "mbpa/memory_size"):
        assert mixed[key] == pytest.approx(rank0_only[key]), key
    assert mixed["mbpa/queries_per_s"] > 0

    rank0, rank1 = _load(tmp_path / "resume-rank0.pt"), _load(tmp_path / "resume-rank1.pt")
    _assert_same(rank0, rank1)
    fitted = sum(RANK_ROWS)
    assert torch.equal(rank0["keys"][:fitted], saved["keys"])  # the memory continued
    assert fitted + 20 <= len(rank0["values"]) <= fitted + 70
