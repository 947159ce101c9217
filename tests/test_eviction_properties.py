"""Property-based test: class-balanced slot assignment of whole batches equals a plain
one-row-at-a-time reference over random label streams, capacities, batch splits and restores.

The reference is written from the documented rule only: while the memory is not full row ``t``
takes slot ``t``; then it overwrites the oldest entry (smallest write count) of the largest
class, the row's own class among equally large ones if it is one of them, else the smallest
label. Seeded (``derandomize``) and small, so the file runs in seconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_mbpa import EpisodicMemory
from lightning_mbpa._eviction import SlotAssigner

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class Reference:
    """One row at a time, straightforward: the label and write count of each slot."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.labels: list[int] = []
        self.ticks: list[int] = []
        self.t = 0

    def write(self, batch: list[int]) -> list[int]:
        """The slot of each row, ``-1`` for a row overwritten later in the same batch."""
        slots = []
        for y in batch:
            if self.t < self.capacity:
                s = self.t
                self.labels.append(y)
                self.ticks.append(self.t)
            else:
                counts: dict[int, int] = {}
                for label in self.labels:
                    counts[label] = counts.get(label, 0) + 1
                top = max(counts.values())
                tied = [c for c, n in counts.items() if n == top]
                largest = y if y in tied else min(tied)
                oldest = [(self.ticks[i], i) for i in range(self.capacity)]
                s = min(o for o in oldest if self.labels[o[1]] == largest)[1]
                self.labels[s], self.ticks[s] = y, self.t
            slots.append(s)
            self.t += 1
        return [s if s not in slots[i + 1 :] else -1 for i, s in enumerate(slots)]

    def queues(self) -> dict[int, list[int]]:
        """Per class its slots, oldest first."""
        out: dict[int, list[int]] = {}
        for s in sorted(range(len(self.labels)), key=self.ticks.__getitem__):
            out.setdefault(self.labels[s], []).append(s)
        return out


@st.composite
def streams(draw):
    """A capacity, a label stream in phases (each phase its own class weights, so classes go
    missing, dominate, and appear for the first time late), its split into batches, and the
    batch after which the memory is saved and restored (None: never)."""
    capacity = draw(st.integers(1, 24))
    labels: list[int] = []
    for _ in range(draw(st.integers(1, 4))):
        classes = draw(st.lists(st.integers(0, 7), min_size=1, max_size=5))
        labels += draw(st.lists(st.sampled_from(classes), max_size=3 * capacity + 10))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(labels)), max_size=12))))
    bounds = [0, *cuts, len(labels)]
    batches = [labels[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    restore_at = draw(st.none() | st.integers(0, max(0, len(batches) - 1)))
    return capacity, batches, restore_at


def assigner_state(slots: SlotAssigner) -> dict[int, list[int]]:
    return {label: list(q) for label, q in slots._queues.items() if q}


@settings(SETTINGS)
@given(case=streams())
@example(case=(4, [[0, 0, 0, 0], [1, 2, 1, 2, 1]], None))  # a class absent, then two tied
@example(case=(3, [[5, 5, 5], [1, 1, 1, 1, 1, 1, 1]], 0))  # one class takes over, restored
@example(case=(2, [[0, 1], [2] * 9], 1))  # a batch far larger than the capacity
def test_batched_class_balanced_assignment_equals_one_row_at_a_time(case):
    capacity, batches, restore_at = case
    reference = Reference(capacity)
    slots = SlotAssigner("class_balanced", capacity, seed=0)
    memory = EpisodicMemory(capacity, dim=1, eviction="class_balanced")
    for i, batch in enumerate(batches):
        expected = reference.write(batch)
        labels = np.asarray(batch, dtype=np.int64)
        got, runs = slots.assign(len(batch), labels)
        slots.advance(len(batch))
        assert got.tolist() == expected
        if runs is not None:  # the runs name exactly the kept rows and their slots
            from_runs = [-1] * len(batch)
            for row, start, length in runs:
                from_runs[row : row + length] = range(start, start + length)
            assert from_runs == expected
        keys = torch.arange(len(batch), dtype=torch.float32)[:, None]
        assert memory.add(keys, torch.tensor(batch, dtype=torch.int64)).tolist() == expected
        assert assigner_state(slots) == reference.queues()
        size = len(reference.labels)
        assert slots.inserted is not None
        assert slots.inserted[:size].tolist() == reference.ticks
        assert memory.values.tolist() == reference.labels
        assert memory.state_dict()["inserted"].tolist() == reference.ticks
        if i == restore_at:  # continue from the saved state
            state = memory.state_dict()
            memory = EpisodicMemory(capacity, dim=1, eviction="class_balanced")
            memory.load_state_dict(state)
            restored = SlotAssigner("class_balanced", capacity, seed=0)
            restored.restore(
                slots.num_seen,
                slots.generator,
                np.asarray(reference.labels, dtype=np.int64),
                slots.inserted[:size].copy(),
            )
            assert assigner_state(restored) == reference.queues()
            slots = restored
