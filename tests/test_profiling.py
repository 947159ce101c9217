"""The ``mbpa.*`` ranges a torch profiler sees during ``trainer.test`` with MbPA."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_mbpa import MbPA
from lightning_mbpa._profiling import phase
from tests.helpers import TinyClassifier, blobs, loader, trainer

HOOK_PARTS = ("mbpa.search", "mbpa.weights", "mbpa.neighbour_outputs", "mbpa.adapt")
DUAL_PARTS = (
    "mbpa.dual.gram",
    "mbpa.dual.neighbour_logits",
    "mbpa.dual.softmax",
    "mbpa.dual.update",
    "mbpa.dual.query_output",
)


def test_phase_is_a_no_op_without_a_profiler() -> None:
    assert isinstance(phase("mbpa.hook"), contextlib.nullcontext)


def test_a_profile_of_test_shows_every_phase_nested_in_the_hook() -> None:
    torch.manual_seed(0)
    x, y = blobs(96)
    model = TinyClassifier()
    cb = MbPA(k=4, adaptation_steps=3)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer(callbacks=[cb]).test(model, loader(x[:32], y[:32]), verbose=False)
    events = [e for e in prof.events() if e.name.startswith("mbpa.")]
    count = {name: sum(e.name == name for e in events) for name in {e.name for e in events}}
    batches = 2  # 32 test examples in batches of 16
    assert count["mbpa.hook"] == batches and count["mbpa.metrics"] == batches
    for name in (*HOOK_PARTS, "mbpa.gather", "mbpa.dual.gram", "mbpa.dual.query_output"):
        assert count[name] == batches, name
    assert count["mbpa.dual.softmax"] == batches * 3  # once per step
    assert count["mbpa.dual.update"] == batches * 3
    assert "mbpa.dual.neighbour_logits" in count  # computed or skipped (cached outputs)

    def within(inner: str, outer: str) -> bool:  # every `inner` range lies in an `outer` one
        spans = [e.time_range for e in events if e.name == outer]
        return all(
            any(s.start <= e.time_range.start and e.time_range.end <= s.end for s in spans)
            for e in events
            if e.name == inner
        )

    assert all(within(name, "mbpa.hook") for name in HOOK_PARTS)
    assert within("mbpa.gather", "mbpa.search")
    assert all(within(name, "mbpa.adapt") for name in DUAL_PARTS)
    assert not within("mbpa.metrics", "mbpa.hook")
