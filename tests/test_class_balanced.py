"""Class-balanced replay and class-balanced eviction for imbalanced streams.

Every draw and every slot is compared to a plain-Python reference of the same rule that consumes
the same random numbers, so the comparisons are exact.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mbpa import EpisodicMemory, MbPA
from lightning_mbpa._drift import draw_replay_slots
from tests.helpers import TinyClassifier, blobs, loader, trainer

ADAPT = dict(k=8, adaptation_steps=1)


# ---------------------------------------------------------------------- references


def reference_class_balanced_draw(labels: list[int], m: int, generator: torch.Generator) -> list:
    """Plain Python: a class uniformly among those present, then one of its slots uniformly."""
    classes = sorted(set(labels))
    members = {c: [slot for slot, label in enumerate(labels) if label == c] for c in classes}
    picked = torch.randint(len(classes), (m,), generator=generator).tolist()
    u = torch.rand(m, dtype=torch.float64, generator=generator).tolist()
    out = []
    for ci, ui in zip(picked, u, strict=True):
        slots = members[classes[ci]]
        out.append(slots[math.floor(ui * len(slots))])
    return out


def imbalanced_labels(n_common: int = 190, n_rare: int = 10) -> torch.Tensor:
    """Classes 0 and 1 common, 2 and 3 rare (5% of the common classes' count), interleaved."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0] * n_common + [1] * n_common + [2] * n_rare + [3] * n_rare)
    return labels[torch.randperm(labels.shape[0], generator=g)]


# ---------------------------------------------------------------------- replay sampling


def test_replay_sampling_is_validated():
    with pytest.raises(MisconfigurationException, match=r"replay_sampling.*'balanced'.*uniform"):
        MbPA(store_inputs=True, replay_every_n_steps=1, replay_sampling="balanced")
    # harmless without replay (ignored), so a config can switch replay off alone
    assert MbPA(replay_sampling="class_balanced").replay_sampling == "class_balanced"


def test_class_balanced_draws_equal_the_reference():
    labels = imbalanced_labels()
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(50):
        slots = draw_replay_slots(labels, 64, "class_balanced", ours)
        assert slots.dtype == torch.int64
        assert slots.tolist() == reference_class_balanced_draw(labels.tolist(), 64, theirs)
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_class_balanced_draws_each_class_about_equally():
    labels = imbalanced_labels()
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([draw_replay_slots(labels, 64, "class_balanced", g) for _ in range(500)])
    counts = torch.bincount(labels[draws], minlength=4).tolist()
    n, p = draws.numel(), 0.25
    bound = 5 * math.sqrt(n * p * (1 - p))  # 5 standard deviations of a binomial count
    assert all(abs(c - n * p) < bound for c in counts), counts
    # a uniform draw replays the rare classes at their 2.5% share
    uniform = torch.cat([draw_replay_slots(labels, 64, "uniform", g) for _ in range(500)])
    rare = int((labels[uniform] >= 2).sum())
    assert rare < 0.05 * uniform.numel()
    # every draw of a class is one of its slots, and every slot of a rare class comes up
    assert set(draws[labels[draws] == 3].tolist()) == set(
        torch.nonzero(labels == 3).flatten().tolist()
    )


def test_class_balanced_draw_of_a_small_memory_and_one_class():
    g = torch.Generator().manual_seed(0)
    assert draw_replay_slots(torch.tensor([2, 2, 2]), 8, "class_balanced", g).shape == (3,)
    slots = draw_replay_slots(torch.tensor([5]), 4, "class_balanced", g)
    assert slots.tolist() == [0]


#: Replay slots of the run in ``replayed_slots`` as drawn before ``replay_sampling`` existed.
UNIFORM_REFERENCE = [
    None,
    [5, 15, 6, 4, 11, 2, 7, 12],
    [28, 9, 23, 13, 12, 11, 19, 0],
    [38, 25, 7, 27, 16, 10, 26, 31],
    [10, 14, 9, 34, 37, 20, 1, 11],
    [9, 24, 5, 26, 32, 36, 15, 2],
]


def replayed_slots(**kwargs):
    x, y = blobs(96, seed=0)
    torch.manual_seed(0)
    cb = MbPA(
        store_inputs=True, memory_size=40, replay_every_n_steps=1, replay_batch_size=8, **kwargs
    )
    seen: list = []

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            slots = cb._drift.replay_slots
            seen.append(None if slots is None else slots.tolist())

    trainer(callbacks=[cb, Record()], max_epochs=1).fit(TinyClassifier(), loader(x, y))
    return seen, cb


def test_uniform_replay_draws_are_those_of_before():
    assert replayed_slots(k=8, adaptation_steps=1)[0] == UNIFORM_REFERENCE
    assert replayed_slots(replay_sampling="uniform", **ADAPT)[0] == UNIFORM_REFERENCE


def test_class_balanced_replay_in_fit_draws_the_reference_slots():
    seen, cb = replayed_slots(replay_sampling="class_balanced", **ADAPT)
    # the memory at each step: 16 rows per earlier batch, FIFO over 40 slots
    _, y = blobs(96, seed=0)
    g = torch.Generator().manual_seed(cb.seed + 1)
    for step, slots in enumerate(seen):
        if step == 0:
            assert slots is None
            continue
        written = y[: 16 * step]  # this step's batch is written after its replay
        labels = [0] * 40
        for t, label in enumerate(written.tolist()):
            labels[t % 40] = label
        labels = labels[: min(40, len(written))]
        assert slots == reference_class_balanced_draw(labels, 8, g)


def test_pickled_callback_keeps_its_replay_sampling():
    cb = MbPA(store_inputs=True, replay_every_n_steps=1, replay_sampling="class_balanced")
    copy = pickle.loads(pickle.dumps(cb))
    assert copy.replay_sampling == "class_balanced"


# ---------------------------------------------------------------------- class-balanced eviction


def reference_eviction(batches: list[list[int]], capacity: int):
    """Plain Python, one row at a time, O(capacity) per row: the label and write count of each
    slot, and per batch the slot of each row (-1: overwritten later in the same batch)."""
    labels: list[int] = []
    ticks: list[int] = []
    returned = []
    t = 0
    for batch in batches:
        slots = []
        for y in batch:
            if t < capacity:
                s = t
                labels.append(y)
                ticks.append(t)
            else:
                counts = {c: labels.count(c) for c in set(labels)}
                top = max(counts.values())
                tied = [c for c, n in counts.items() if n == top]
                largest = y if y in tied else min(tied)
                s = min((ticks[i], i) for i in range(capacity) if labels[i] == largest)[1]
                labels[s], ticks[s] = y, t
            slots.append(s)
            t += 1
        returned.append([s if s not in slots[i + 1 :] else -1 for i, s in enumerate(slots)])
    return labels, ticks, returned


def imbalanced_stream(n: int, seed: int, rare: float = 0.05) -> list[int]:
    """Classes 0-2 common, 3-5 rare (each ``rare`` times as likely as a common one)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1.0, 1.0, 1.0, rare, rare, rare])
    return torch.multinomial(weights, n, replacement=True, generator=g).tolist()


def split(stream: list[int], seed: int, largest: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    batches, i = [], 0
    while i < len(stream):
        size = int(torch.randint(1, largest + 1, (), generator=g))
        batches.append(stream[i : i + size])
        i += size
    return batches


def write(memory: EpisodicMemory, batch: list[int]) -> list[int]:
    labels = torch.tensor(batch, dtype=torch.int64)
    keys = torch.stack([labels.float(), torch.arange(len(batch)).float()], 1)
    return memory.add(keys, labels).tolist()


@pytest.mark.parametrize(
    ("capacity", "largest", "seed"), [(1, 3, 0), (7, 3, 1), (20, 8, 2), (20, 50, 3), (64, 40, 4)]
)
def test_class_balanced_eviction_equals_one_at_a_time_insertion(capacity, largest, seed):
    stream = imbalanced_stream(400, seed)
    batches = split(stream, seed, largest)
    labels, ticks, returned = reference_eviction(batches, capacity)
    memory = EpisodicMemory(capacity, dim=2, eviction="class_balanced")
    got = [write(memory, batch) for batch in batches]
    assert got == returned
    assert memory.values.tolist() == labels
    assert memory.state_dict()["inserted"].tolist() == ticks
    # the whole stream as one batch (larger than the capacity) ends the same
    whole = EpisodicMemory(capacity, dim=2, eviction="class_balanced")
    write(whole, stream)
    assert whole.values.tolist() == labels


def test_rare_classes_are_kept_while_a_larger_class_exists():
    stream = imbalanced_stream(1500, 5, rare=0.02)
    memory = EpisodicMemory(120, dim=2, eviction="class_balanced")
    for y in stream:  # one row at a time: only a largest class ever loses an entry
        before = torch.bincount(memory.values, minlength=6)
        write(memory, [y])
        after = torch.bincount(memory.values, minlength=6)
        lost = torch.nonzero(after < before).flatten().tolist()
        assert lost == [] or (len(lost) == 1 and before[lost[0]] == before.max())
    counts = torch.bincount(memory.values, minlength=6)
    seen = torch.bincount(torch.tensor(stream), minlength=6)
    # every rare example seen is still there; the common classes share the rest equally
    assert 0 < seen[3:].max() < 30
    assert counts[3:].tolist() == seen[3:].tolist()
    assert int(counts[:3].max() - counts[:3].min()) <= 1
    fifo = EpisodicMemory(120, dim=2)
    write(fifo, stream)
    assert int((fifo.values >= 3).sum()) < int(counts[3:].sum())


def test_class_balanced_state_continues_exactly(tmp_path):
    stream = imbalanced_stream(500, 6)
    batches = split(stream, 6, 25)
    straight = EpisodicMemory(30, dim=2, eviction="class_balanced")
    for batch in batches:
        write(straight, batch)

    first = EpisodicMemory(30, dim=2, eviction="class_balanced")
    for batch in batches[:10]:
        write(first, batch)
    torch.save(first.state_dict(), tmp_path / "memory.pt")
    restored = EpisodicMemory(30, dim=2, eviction="class_balanced")
    restored.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    unpickled = pickle.loads(pickle.dumps(first))
    for memory in (restored, unpickled, first):
        for batch in batches[10:]:
            write(memory, batch)
        assert torch.equal(memory.values, straight.values)
        assert torch.equal(memory.keys, straight.keys)
        assert torch.equal(memory.state_dict()["inserted"], straight.state_dict()["inserted"])
    # clear starts over
    first.clear()
    for batch in batches:
        write(first, batch)
    assert torch.equal(first.values, straight.values)


def test_states_without_write_counts():
    fifo = EpisodicMemory(8, dim=2)
    write(fifo, [0, 1, 2])
    state = fifo.state_dict()
    assert "inserted" not in state  # fifo and reservoir states are as before
    balanced = EpisodicMemory(8, dim=2, eviction="class_balanced")
    write(balanced, [5])
    with pytest.raises(ValueError, match="inserted"):
        balanced.load_state_dict(state)
    assert balanced.values.tolist() == [5]  # nothing changed
    bad = dict(balanced.state_dict(), inserted=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"inserted.*distinct"):
        balanced.load_state_dict(bad)
    # an empty state loads; a class-balanced state loads into a fifo memory (counts unused)
    balanced.load_state_dict(EpisodicMemory(8, eviction="class_balanced").state_dict())
    assert len(balanced) == 0
    fifo.load_state_dict(EpisodicMemory(8, dim=2, eviction="class_balanced").state_dict())


def test_class_balanced_eviction_is_validated():
    with pytest.raises(MisconfigurationException, match=r"eviction.*'balanced'.*class_balanced"):
        MbPA(eviction="balanced")
    with pytest.raises(ValueError, match="eviction"):
        EpisodicMemory(4, eviction="balanced")  # type: ignore[arg-type]
    assert MbPA(eviction="class_balanced").eviction == "class_balanced"


def test_imbalanced_stream_in_fit_keeps_the_reference_memory():
    """An imbalanced stream through ``trainer.fit`` with class-balanced eviction and replay."""
    g = torch.Generator().manual_seed(0)
    x_all, y_all = blobs(400, seed=3)
    keep = (y_all < 2) | (torch.rand(400, generator=g) < 0.05)  # classes 2 and 3 at 5%
    x, y = x_all[keep], y_all[keep]
    torch.manual_seed(0)
    cb = MbPA(
        store_inputs=True,
        memory_size=24,
        eviction="class_balanced",
        replay_every_n_steps=1,
        replay_batch_size=8,
        replay_sampling="class_balanced",
        **ADAPT,
    )
    trainer(callbacks=[cb], max_epochs=1).fit(TinyClassifier(), loader(x, y))
    labels, _, _ = reference_eviction([y.tolist()], 24)
    assert cb.memory.values.tolist() == labels
    stored, rare = cb.memory.payload["0"][cb.memory.values == 3], x[y == 3]
    assert stored.shape == rare.shape  # every rare image seen is kept, with its label
    assert bool((stored[:, None] == rare[None]).all(-1).any(0).all())
    counts = torch.bincount(cb.memory.values, minlength=4).tolist()
    rare_seen = [int((y == 2).sum()), int((y == 3).sum())]
    assert 0 < max(rare_seen) < 24 // 4
    assert counts[2:] == rare_seen
    assert sorted(counts[:2]) == [(24 - sum(rare_seen)) // 2, (25 - sum(rare_seen)) // 2]


def test_callback_checkpoint_and_pickle_keep_the_class_balanced_memory(tmp_path):
    x, y = blobs(96, seed=0)
    kwargs = dict(memory_size=20, eviction="class_balanced", **ADAPT)
    cb = MbPA(**kwargs)
    trainer(callbacks=[cb], max_epochs=1).fit(TinyClassifier(), loader(x[:60], y[:60]))
    torch.save(cb.state_dict(), tmp_path / "mbpa.pt")
    restored = MbPA(**kwargs)
    restored.load_state_dict(torch.load(tmp_path / "mbpa.pt", weights_only=True))
    unpickled = pickle.loads(pickle.dumps(cb))
    keys = torch.randn(36, 16, generator=torch.Generator().manual_seed(0))
    for each in (cb, restored, unpickled):
        each.memory.add(keys, y[60:])
    for each in (restored, unpickled):
        assert torch.equal(each.memory.values, cb.memory.values)
        assert torch.equal(each.memory.keys, cb.memory.keys)
    labels, _, _ = reference_eviction([y.tolist()], 20)
    assert cb.memory.values.tolist() == labels
