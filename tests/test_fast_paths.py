"""The callback's fast paths give the results of the straightforward ones.

Training writes go through the memory's checked rows (``check_rows`` then ``add_checked``, each
row looked at once); the memory must then be bit-identical to one ``EpisodicMemory.add`` per batch
(built here from head inputs recorded by an independent hook) and to a plain per-row FIFO, and
current whenever anyone reads, saves or pickles it. The per-slot cache of the head's base outputs must equal a
recomputation.
"""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_mbpa import MbPA
from lightning_mbpa.batches import as_label_tensor
from lightning_mbpa.memory import EpisodicMemory
from tests.helpers import TinyClassifier, blobs, loader, trainer

ADAPT = dict(adaptation_steps=3, adaptation_lr=0.5, beta=0.1)


class Recorder(Callback):
    """Records, per training batch, the head's input (its own hook) and the batch's labels."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._handle = pl_module.head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self._inputs = args[0].detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((self._inputs, batch[1].clone()))

    def on_train_end(self, trainer, pl_module) -> None:
        self._handle.remove()


def one_add_per_batch(batches, capacity, eviction="fifo", index="Flat", write_fraction=1.0):
    """The memory the callback must hold: the recorded rows, written batch by batch."""
    memory = EpisodicMemory(capacity, eviction=eviction, index=index, seed=0)
    draws = torch.Generator().manual_seed(0)
    for inputs, labels in batches:
        keys, values = inputs.reshape(-1, inputs.shape[-1]), labels.reshape(-1)
        keys, values = keys[values != -100], values[values != -100]
        if write_fraction < 1.0 and len(values):
            chosen = torch.rand(len(values), generator=draws) < write_fraction
            keys, values = keys[chosen], values[chosen]
        if len(values):
            memory.add(keys.float(), values)
    return memory


class SequenceTagger(TinyClassifier):
    """Token classification with -100 padding: the head sees [B, T, D]."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten(), ignore_index=-100)


def assert_same_memory(got: EpisodicMemory, expected: EpisodicMemory) -> None:
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):  # the payload
            assert a[name].keys() == b[name].keys(), name
            assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        else:
            assert torch.equal(a[name], b[name]), name
    assert torch.equal(got._norms[: len(got)], expected._norms[: len(expected)])


@pytest.mark.parametrize(
    "config",
    [
        dict(memory_size=40),  # the ring wraps within and across batches
        dict(memory_size=40, eviction="reservoir"),
        dict(memory_size=500, write_fraction=0.5),
        dict(memory_size=300, index="IVF4,Flat"),  # trains at 156 keys, mid-epoch
        dict(memory_size=500, sequence=True),  # [B, T, D] head inputs, -100 padding
        dict(memory_size=100, eviction="class_balanced"),
    ],
    ids=["fifo", "reservoir", "write_fraction", "ivf", "sequence", "class_balanced"],
)
def test_training_writes_equal_one_add_per_batch(config):
    config = dict(config)
    sequence = config.pop("sequence", False)
    torch.manual_seed(0)
    if sequence:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 5, 8, generator=g), torch.randint(0, 4, (48, 5), generator=g)
        y[::3, 2:] = -100
        y[5] = -100  # a sequence with no labelled token
        model = SequenceTagger()
    else:
        x, y = blobs(192, seed=0)
        y[7::11] = -100
        model = TinyClassifier()
    cb, recorder = MbPA(k=4, **ADAPT, **config), Recorder()
    trainer(callbacks=[cb, recorder], max_epochs=2).fit(model, loader(x, y, shuffle=True))
    expected = one_add_per_batch(
        recorder.batches,
        config["memory_size"],
        eviction=config.get("eviction", "fifo"),
        index=config.get("index", "Flat"),
        write_fraction=config.get("write_fraction", 1.0),
    )
    assert len(recorder.batches) == 2 * len(x) // 16
    assert_same_memory(cb.memory, expected)
    q = torch.randn(10, 16)
    found, ref = cb.memory.search(q, 5), expected.search(q, 5)
    assert torch.equal(found.indices, ref.indices) and torch.equal(found.keys, ref.keys)


class ReadsTheMemory(Callback):
    """After MbPA's own hook: the memory must hold every row of the finished batches."""

    def __init__(self, mbpa: MbPA) -> None:
        self.mbpa, self.seen = mbpa, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(self.mbpa.memory.num_seen)


def test_the_memory_is_current_whenever_it_is_read_during_fit(tmp_path):
    x, y = blobs(96, seed=0)
    cb = MbPA(k=4, memory_size=1000, **ADAPT)
    reader = ReadsTheMemory(cb)
    every_two = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer(callbacks=[cb, reader, every_two], max_epochs=2, enable_checkpointing=True).fit(
        TinyClassifier(), loader(x, y)
    )
    assert reader.seen == [16 * (step + 1) for step in range(12)]
    saved = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert len(saved) == 6
    for path in saved:
        step = int(path.stem.split("step=")[1])
        state = torch.load(path, weights_only=True)["callbacks"][cb.state_key]["memory"]
        assert int(state["num_seen"]) == 16 * step


def test_training_writes_equal_one_add_per_batch_when_the_ring_wraps():
    x, y = blobs(192, seed=0)
    torch.manual_seed(0)
    cb, recorder = MbPA(k=4, memory_size=150, **ADAPT), Recorder()  # the ring wraps
    trainer(callbacks=[cb, recorder], max_epochs=2).fit(
        TinyClassifier(), loader(x, y, shuffle=True)
    )
    assert len(recorder.batches) == 24
    assert_same_memory(cb.memory, one_add_per_batch(recorder.batches, 150))


class Frozen(TinyClassifier):
    """Forward passes only (no optimiser step): a bad batch cannot change later keys."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self(batch[0])


def _labels(values):
    return lambda x, y: (x, values(y))


def _keys(change):
    def bad(x, y):
        x = x.clone()
        change(x)
        return x, y

    return bad


def _nan(x):
    x[3, 0] = math.nan


def _inf(x):
    x[0, 1], x[9, 2] = math.inf, -math.inf


def _huge(x):
    x.mul_(1e37)  # finite keys whose float32 sum overflows


@pytest.mark.parametrize(
    ("third_batch", "outcome"),
    [
        (_keys(_nan), "refused"),
        (_keys(_inf), "refused"),
        (_keys(_huge), "written"),
        (_labels(lambda y: y + 3), "error"),  # beyond the head's 4 outputs
        (_labels(lambda y: torch.where(y == 0, 4, y)), "error"),  # one past the last class
        (_labels(lambda y: torch.where(y == 0, -1, y)), "error"),
        (_labels(lambda y: torch.where(y == 1, -100, y)), "written"),  # rows to skip
        (_labels(lambda y: torch.full_like(y, -100)), "written"),  # nothing to write
        (_labels(lambda y: y.int()), "written"),  # cast by extract_labels
        (_labels(lambda y: y[:, None]), "written"),  # squeezed by extract_labels
        (_labels(lambda y: y.float()), "written"),
    ],
    ids=[
        "nan",
        "inf",
        "huge",
        "above-range",
        "one-past",
        "negative",
        "ignore-index",
        "all-ignored",
        "int32",
        "column",
        "float",
    ],
)
def test_a_bad_batch_is_refused_or_skipped_at_the_batch_that_carries_it(third_batch, outcome):
    x, y = blobs(80)
    pairs = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 80, 16)]
    pairs[2] = third_batch(*pairs[2])
    torch.manual_seed(0)
    model, cb = Frozen(), MbPA(k=4, **ADAPT)
    with torch.no_grad():  # the reference: the (frozen) encoder's outputs, labels as int64
        expected = [(model.encoder(bx), as_label_tensor(by)) for bx, by in pairs]
    error = None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            trainer(callbacks=[cb]).fit(model, DataLoader(pairs, batch_size=None))
        except ValueError as err:
            error = str(err)
    said = [str(w.message) for w in record if str(w.message).startswith("MbPA")]
    if outcome == "error":  # raised at the third batch; the two before it are written
        assert error is not None and "labels of the training batch must be" in error
        assert said == []
        written = [0, 1]
    elif outcome == "refused":  # warned at the third batch and skipped
        assert error is None and len(said) == 1 and "refused a training batch" in said[0]
        written = [0, 1, 3, 4]
    else:
        assert error is None and said == []
        written = [0, 1, 2, 3, 4]
    assert_same_memory(cb.memory, one_add_per_batch([expected[i] for i in written], 100_000))


class SwapsTheMemory(Callback):
    """Gives MbPA a new memory before the third batch (the write buffer stays allocated)."""

    def __init__(self, mbpa: MbPA, memory: EpisodicMemory) -> None:
        self.mbpa, self.memory = mbpa, memory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            self.mbpa.memory = self.memory


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        (lambda: EpisodicMemory(1000, dim=12), "called with inputs of width 16"),
        (lambda: EpisodicMemory(1000, index="PQ3"), "cannot index the keys of the head"),
    ],
    ids=["other-width", "index-cannot-take-the-width"],
)
def test_a_new_memory_checks_the_width_of_the_next_batch(memory, message):
    x, y = blobs(80)
    cb = MbPA(k=4, **ADAPT)
    with pytest.raises(MisconfigurationException, match=message):
        trainer(callbacks=[SwapsTheMemory(cb, memory()), cb]).fit(Frozen(), loader(x, y))
    assert len(cb.memory) == 0  # the new memory: the third batch was refused


def test_a_refused_populate_batch_leaves_the_batches_before_it_written():
    x, y = blobs(64, seed=0)
    model = TinyClassifier()
    bad = y.clone()
    bad[40] = -5  # the third batch of 16
    cb = MbPA(k=4, memory_size=1000, **ADAPT)
    with pytest.raises(ValueError, match="labels"):
        cb.populate(model, loader(x, bad))
    assert cb.memory.num_seen == 32  # the two batches before the refused one
    assert torch.equal(cb.memory.values, y[:32])
    with torch.no_grad():
        torch.testing.assert_close(cb.memory.keys, model.encoder(x[:32]))


def test_lazy_output_cache_equals_a_recomputation():
    x, y = blobs(200, seed=0)
    model = TinyClassifier()
    cb = MbPA(k=6, memory_size=1000, **ADAPT)
    cb.populate(model, loader(x, y))
    cb._head.bind(model, "head", cb.memory.dim)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 200, (7, 6), generator=g)
    second = torch.cat([first[:3], torch.randint(0, 200, (4, 6), generator=g)])  # overlaps
    second[0, 0] = -1  # a masked neighbour
    with torch.no_grad():
        expected = model.head(cb.memory.keys)
    for indices in (first, second):
        got = cb._adapter.neighbour_outputs(cb.memory, indices)
        torch.testing.assert_close(got, expected[indices.clamp_min(0)], rtol=1e-6, atol=1e-6)
    touched = torch.unique(torch.cat([first.flatten(), second.flatten()]).clamp_min(0))
    computed = cb._adapter.cached_slots
    assert computed.sum() == len(touched)
    assert torch.equal(computed.nonzero().squeeze(1), touched)  # nothing else computed
    cb.memory.add(torch.randn(1, 16), torch.tensor([0]))  # any change clears the cache
    with torch.no_grad():
        expected = model.head(cb.memory.keys)
    got = cb._adapter.neighbour_outputs(cb.memory, second)
    torch.testing.assert_close(got, expected[second.clamp_min(0)], rtol=1e-6, atol=1e-6)
    assert cb._adapter.cached_slots.sum() == len(torch.unique(second.clamp_min(0)))
    last = torch.full((1, 6), 200)  # the new slot
    torch.testing.assert_close(cb._adapter.neighbour_outputs(cb.memory, last), expected[last])


def test_lazy_output_cache_from_the_searched_keys_equals_a_recomputation():
    """Outputs computed over the keys the search returned (repeated slots in a batch, batches
    that partly hit the cache, a masked neighbour, keys in another dtype) equal the head's
    outputs on the stored keys, and the cache then holds exactly the slots seen."""
    x, y = blobs(200, seed=0)
    model = TinyClassifier()
    cb = MbPA(k=6, memory_size=1000, **ADAPT)
    cb.populate(model, loader(x, y))
    cb._head.bind(model, "head", cb.memory.dim)
    stored = cb.memory.keys
    with torch.no_grad():
        expected = model.head(stored)
    g = torch.Generator().manual_seed(1)
    first = torch.randint(0, 50, (7, 6), generator=g)  # slots repeat within the batch
    second = torch.cat([first[:3], torch.randint(0, 200, (4, 6), generator=g)])  # partly cached
    masked = torch.randint(0, 200, (3, 6), generator=g)
    masked[1, 5] = -1
    fresh = torch.randint(0, 200, (5, 6), generator=g)
    seen = []
    for indices, dtype in ((first, None), (second, None), (masked, None), (fresh, torch.float64)):
        keys = stored[indices.clamp_min(0)]
        keys[indices < 0] = 0.0  # as the search pads a masked column
        if dtype is not None:
            keys = keys.to(dtype)
        got = cb._adapter.neighbour_outputs(cb.memory, indices, keys)
        valid = indices >= 0
        torch.testing.assert_close(got[valid], expected[indices[valid]], rtol=1e-6, atol=1e-6)
        seen.append(indices.clamp_min(0).flatten())
        touched = torch.unique(torch.cat(seen))
        assert torch.equal(cb._adapter.cached_slots.nonzero().squeeze(1), touched)
    # every cached row is the head's output on its stored key
    everything = torch.arange(200).reshape(-1, 8)
    got = cb._adapter.neighbour_outputs(cb.memory, everything)
    torch.testing.assert_close(got, expected[everything], rtol=1e-6, atol=1e-6)


def test_lazy_output_cache_grows_past_its_first_table():
    x, y = blobs(5000, seed=0)
    model = TinyClassifier()
    cb = MbPA(k=6, memory_size=5000, **ADAPT)
    cb.populate(model, loader(x, y, batch_size=1000))
    cb._head.bind(model, "head", cb.memory.dim)
    with torch.no_grad():
        expected = model.head(cb.memory.keys)
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    for part in (order[:3000], order[3000:], order[::7]):  # 3000 + 2000 new rows, then hits
        indices = (
            part.reshape(-1, 5) if len(part) % 5 == 0 else part[: len(part) // 5 * 5].reshape(-1, 5)
        )
        got = cb._adapter.neighbour_outputs(cb.memory, indices)
        torch.testing.assert_close(got, expected[indices], rtol=1e-6, atol=1e-6)
    assert bool(cb._adapter.cached_slots.all()) and len(cb._adapter.cached_slots) == 5000


# ---------------------------------------------------------------------- one write path


def _batches(sizes, dim=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def _plain_fifo(batches, capacity):
    """What a FIFO memory must hold, row by row in plain Python: row t goes to slot t % capacity."""
    keys, values, seen = [None] * capacity, [None] * capacity, 0
    for batch_keys, batch_values in batches:
        for key, value in zip(batch_keys, batch_values.tolist(), strict=True):
            keys[seen % capacity], values[seen % capacity] = key, value
            seen += 1
    size = min(seen, capacity)
    return torch.stack(keys[:size]), torch.tensor(values[:size]), seen


@pytest.mark.parametrize("capacity", [7, 40, 1000])  # wraps within batches, across them, never
def test_appended_rows_equal_a_plain_per_row_fifo(capacity, monkeypatch):
    monkeypatch.setattr("lightning_mbpa._writing.PENDING_BYTES", 12 * 6 * 4)  # 12 rows pending
    batches = _batches([3, 5, 1, 9, 2, 11, 4, 13, 6, 8, 3])  # 13 rows: over the buffer, direct
    memory = EpisodicMemory(capacity)
    for keys, values in batches:
        memory.append_checked(memory.check_rows(keys, values))
    expected_keys, expected_values, seen = _plain_fifo(batches, capacity)
    assert memory.num_seen == seen and len(memory) == len(expected_values)
    assert torch.equal(memory.keys, expected_keys)
    assert torch.equal(memory.values, expected_values)
    norms = (expected_keys.double() ** 2).sum(1).float()
    torch.testing.assert_close(memory._norms[: len(memory)], norms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eviction", ["fifo", "reservoir", "class_balanced"])
def test_appended_rows_equal_one_add_per_row(eviction, monkeypatch):
    """Pending rows, bulk writes and direct writes (a large batch, a search in between) leave
    the memory bit-identical to inserting the rows one at a time."""
    monkeypatch.setattr("lightning_mbpa._writing.PENDING_BYTES", 10 * 6 * 4)
    batches = _batches([3, 5, 1, 9, 2, 11, 4, 2, 6, 8, 3, 7])
    memory, reference = EpisodicMemory(20, eviction=eviction), EpisodicMemory(20, eviction=eviction)
    for i, (keys, values) in enumerate(batches):
        memory.append_checked(memory.check_rows(keys, values))
        if i == 6:
            memory.search(keys[:2], 3)  # a read writes the pending rows first
        if i == 8:
            memory.add(keys, values)  # a direct write after the pending ones
            for row in range(len(values)):
                reference.add(keys[row : row + 1], values[row : row + 1])
        for row in range(len(values)):
            reference.add(keys[row : row + 1], values[row : row + 1])
    assert_same_memory(memory, reference)


def test_pending_rows_are_in_every_read_state_and_pickle():
    memory = EpisodicMemory(100)
    (keys, values), (more_keys, more_values) = _batches([4, 3])
    memory.append_checked(memory.check_rows(keys, values))
    assert len(memory) == 4 and torch.equal(memory.keys, keys)  # written when read
    memory.append_checked(memory.check_rows(more_keys, more_values))
    assert memory.state_dict()["num_seen"] == 7
    memory.append_checked(memory.check_rows(keys, values))
    restored = pickle.loads(pickle.dumps(memory))
    assert torch.equal(restored.keys, torch.cat([keys, more_keys, keys]))
    memory.append_checked(memory.check_rows(keys, values))
    found = memory.search(keys[:1], 1)
    assert int(found.indices[0, 0]) in (0, 7, 11) and memory.num_seen == 15
    memory.append_checked(memory.check_rows(keys, values))
    memory.clear()  # pending rows go with the rest
    assert len(memory) == 0 and memory.num_seen == 0


@pytest.mark.parametrize(
    ("keys", "values", "message"),
    [
        (torch.tensor([[0.0, 1.0], [math.nan, 0.0]]), torch.tensor([0, 1]), "finite"),
        (torch.tensor([[0.0, 1.0], [math.inf, 0.0]]), torch.tensor([0, 1]), "finite"),
        (torch.ones(2, 2), torch.tensor([0, -3]), r"non-negative labels; got \[-3\]"),
        (torch.ones(2, 3), torch.tensor([0, 1]), r"shape \[N, 2\]"),
        (torch.ones(2, 2), torch.tensor([0.5, 1.0]), "non-integral"),
    ],
    ids=["nan", "inf", "negative", "width", "non-integral"],
)
def test_a_refused_append_changes_nothing_and_leaves_the_pending_rows(keys, values, message):
    memory = EpisodicMemory(100)
    good_keys, good_values = torch.randn(3, 2), torch.tensor([1, 2, 3])
    memory.append_checked(memory.check_rows(good_keys, good_values))  # waits in the buffer
    with pytest.raises(ValueError, match=message):
        memory.append_checked(memory.check_rows(keys, values))
    assert memory.num_seen == 3 and torch.equal(memory.keys, good_keys)
    with pytest.raises(ValueError, match=message):
        memory.add(keys, values)
    assert memory.num_seen == 3


def test_checked_rows_dropped_by_select_are_not_looked_at_again():
    memory = EpisodicMemory(100)
    keys = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, 4.0]])
    rows = memory.check_rows(keys, torch.tensor([2, -100, 0]))
    assert not rows.finite and (rows.low, rows.high) == (-100, 2)
    kept = rows.select(torch.tensor([True, False, True]))  # the ignored row held the NaN
    assert kept.finite and (kept.low, kept.high) == (0, 2) and kept.problem() is None
    memory.append_checked(kept)
    assert torch.equal(memory.keys, keys[[0, 2]]) and memory.values.tolist() == [2, 0]


class SnapshotBefore(Callback):
    """Saves MbPA's memory (``state_dict``: every finished batch) when batch ``at`` starts."""

    def __init__(self, mbpa: MbPA, at: int) -> None:
        self.mbpa, self.at, self.state, self.started = mbpa, at, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started.append(batch_idx)
        if batch_idx == self.at:
            self.state = {k: v.clone() for k, v in self.mbpa.memory.state_dict().items()}


@pytest.mark.parametrize("bad", ["label", "nan"])
def test_a_bad_row_in_batch_n_fails_in_batch_n_with_the_memory_as_before(bad):
    """Batches 0-3 wait in the pending buffer (nothing reads the memory before batch 4 starts);
    a bad row in batch 4 raises (or, non-finite, is refused with a warning) while batch 4 is
    processed, and the memory is bit-identical to the one before batch 4."""
    x, y = blobs(112)
    pairs = [(x[i : i + 16].clone(), y[i : i + 16].clone()) for i in range(0, 112, 16)]
    if bad == "label":
        pairs[4][1][5] = 4  # the head has 4 outputs
    cb = MbPA(k=4, **ADAPT)
    snapshot = SnapshotBefore(cb, at=4)
    model = Frozen()
    if bad == "nan":
        model.encoder.register_forward_hook(
            lambda module, args, out: (
                out.index_fill(0, torch.tensor([5]), math.nan) if snapshot.started[-1] == 4 else out
            )
        )
    fit = trainer(callbacks=[snapshot, cb]).fit
    if bad == "label":
        with pytest.raises(ValueError, match=r"labels of the training batch must be .* got \[4\]"):
            fit(model, DataLoader(pairs, batch_size=None))
        assert snapshot.started[-1] == 4  # raised while batch 4 was processed
        after = cb.memory.state_dict()
    else:
        with pytest.warns(UserWarning, match="refused a training batch: 1 of its 16"):
            fit(model, DataLoader(pairs[:5], batch_size=None))  # batch 4 is the last one
        assert cb.refused_batches == 1
        after = cb.memory.state_dict()
    assert snapshot.state is not None and int(snapshot.state["num_seen"]) == 4 * 16
    assert after.keys() == snapshot.state.keys()
    for name in after:
        assert torch.equal(after[name], snapshot.state[name]), name


class PicklesAt(Callback):
    """Pickles MbPA after MbPA's own end of batch ``at`` (its rows still pending)."""

    def __init__(self, mbpa: MbPA, at: int) -> None:
        self.mbpa, self.at, self.pickled = mbpa, at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at:
            self.pickled = pickle.dumps(self.mbpa)


def test_checkpoints_and_pickles_mid_epoch_equal_one_add_per_batch(tmp_path):
    """Pending rows are in every checkpoint and pickle taken mid-epoch: each equals a memory
    written by one ``add`` per batch finished so far."""
    x, y = blobs(160, seed=0)
    cb, recorder = MbPA(k=4, memory_size=100, **ADAPT), Recorder()  # the ring wraps at step 7
    pickler = PicklesAt(cb, at=6)
    every_three = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(
        callbacks=[cb, recorder, pickler, every_three], max_epochs=1, enable_checkpointing=True
    ).fit(TinyClassifier(), loader(x, y))
    saved = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert [int(p.stem.split("step=")[1]) for p in saved] == [3, 6, 9]
    for path in saved:
        step = int(path.stem.split("step=")[1])
        state = torch.load(path, weights_only=True)["callbacks"][cb.state_key]["memory"]
        expected = one_add_per_batch(recorder.batches[:step], 100).state_dict()
        assert state.keys() == expected.keys()
        for name in state:
            assert torch.equal(state[name], expected[name]), (step, name)
    unpickled = pickle.loads(pickler.pickled)
    assert_same_memory(unpickled.memory, one_add_per_batch(recorder.batches[:7], 100))


@pytest.mark.parametrize("change", ["none", "nan", "inf", "huge", "negative", "ignored"])
def test_the_one_call_check_of_a_training_batch_equals_the_general_check(change):
    """Rows checked for the pending buffer (one call: CPU float32 keys, int64 labels) carry the
    same keys, labels, finiteness and label range as the general check that computes norms."""
    from lightning_mbpa._memory_checks import check_rows

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    if change == "nan":
        keys[7, 3] = math.nan
    elif change == "inf":
        keys[0, 0] = -math.inf
    elif change == "huge":
        keys *= 1e37  # finite, but the squares overflow
    elif change == "negative":
        values[5] = -2
    elif change == "ignored":
        values[::4] = -100
    fast = check_rows(keys, values, 16, on_cpu=True, norms=False)
    general = check_rows(keys.clone(), values.clone(), 16, on_cpu=True, norms=True)
    assert fast.norms is None and general.norms is not None
    assert fast.finite == general.finite == (change not in ("nan", "inf"))
    assert (
        (fast.low, fast.high)
        == (general.low, general.high)
        == (
            int(values.min()),
            int(values.max()),
        )
    )
    torch.testing.assert_close(fast.keys, keys, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(fast.values, values) and fast.listed == values.tolist()


@pytest.mark.parametrize(
    ("change", "written"),
    [
        ("none", True),
        ("huge", True),  # finite keys whose squares overflow
        ("binary", True),  # labels 0 and 1 below a single-output head's 2
        ("nan", False),
        ("inf", False),
        ("negative", False),
        ("ignored", False),
        ("at the limit", False),  # a label the head cannot predict
        ("float64 keys", False),
        ("int32 labels", False),
        ("3-d keys", False),
        ("other width", False),
        ("grad", False),
        ("first write", False),  # the general path allocates the storage
        ("approximate index", False),
        ("payload", False),
        ("over the buffer", False),
    ],
)
def test_append_if_valid_writes_as_the_general_path_or_changes_nothing(change, written):
    """The one-pass write of a training batch leaves the memory exactly as ``add`` would, and
    declines, changing nothing (pending rows included), whatever needs the general path."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(8, 4, generator=g), torch.randint(0, 5, (8,), generator=g)
    below = 5
    memory = EpisodicMemory(50, index="HNSW8" if change == "approximate index" else "Flat")
    reference = EpisodicMemory(50)
    if change == "payload":
        payload = {"x": torch.zeros(3, 2)}
        memory.add(torch.ones(3, 4), torch.tensor([0, 1, 2]), payload)
        reference.add(torch.ones(3, 4), torch.tensor([0, 1, 2]), payload)
    elif change != "first write":
        first_keys, first_values = torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2])
        memory.append_checked(memory.check_rows(first_keys, first_values))  # pending
        reference.add(first_keys, first_values)
    if change == "huge":
        keys = keys * 1e37
    elif change == "binary":
        values, below = values % 2, 2
    elif change == "nan":
        keys[2, 1] = math.nan
    elif change == "inf":
        keys[0, 3] = math.inf
    elif change == "negative":
        values[4] = -2
    elif change == "ignored":
        values[::3] = -100
    elif change == "at the limit":
        values[5] = below
    elif change == "float64 keys":
        keys = keys.double()
    elif change == "int32 labels":
        values = values.int()
    elif change == "3-d keys":
        keys, values = keys.reshape(2, 4, 4), values.reshape(2, 4)
    elif change == "other width":
        keys = torch.randn(8, 3, generator=g)
    elif change == "grad":
        keys.requires_grad_(True)
    elif change == "over the buffer":
        keys, values = torch.randn(1024, 256, generator=g), torch.randint(0, 5, (1024,))
    pending = memory._pending
    waiting = (pending.count, list(pending.values))
    waiting_keys = None if pending.keys is None else pending.keys[: pending.count].copy()
    assert memory.append_if_valid(keys, values, below) is written
    if written:
        reference.add(keys, values)
    else:  # the pending rows are as they were, and so is everything once they are written
        assert (pending.count, list(pending.values)) == waiting
        if waiting_keys is not None:
            assert np.array_equal(pending.keys[: pending.count], waiting_keys)
    if change == "first write":
        assert len(memory) == memory.num_seen == 0 and memory.dim is None
    else:
        assert_same_memory(memory, reference)


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 7, 64 * 128, (1 << 16) + 3]),  # both sides of the dot's size limit
    value=st.floats(width=32, allow_nan=True, allow_infinity=True),
    where=st.floats(0, 1, exclude_max=True),
    scale=st.sampled_from([0.0, 1.0, 1e-30, 1e19, 3e38]),
)
def test_all_finite_agrees_with_numpy(size, value, where, scale):
    from lightning_mbpa._memory_checks import all_finite

    rng = np.random.default_rng(size)
    with np.errstate(over="ignore"):  # (3e38 times a normal sample may be inf: no matter)
        keys = rng.standard_normal((size, 2)).astype(np.float32) * np.float32(scale)
    keys[int(where * size), 0] = value
    column = torch.from_numpy(keys)[:, 0]  # strided: every other float
    expected = bool(np.isfinite(keys[:, 0]).all())
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")  # huge finite values warn and raise nowhere
        assert all_finite(column) == expected
        assert all_finite(column.contiguous()) == expected


@pytest.mark.parametrize("eviction", ["fifo", "reservoir"])
def test_one_pass_appends_fill_the_pending_buffer_and_write_it_in_order(eviction, monkeypatch):
    """Batches appended in one pass that overflow the pending buffer (a bulk write before the
    next one waits), reads in between: the memory equals one ``add`` per batch."""
    monkeypatch.setattr("lightning_mbpa._writing.PENDING_BYTES", 10 * 6 * 4)  # 10 rows pending
    batches = _batches([3, 4, 2, 5, 1, 3, 4, 2, 6, 3, 5, 2])
    memory = EpisodicMemory(30, eviction=eviction, seed=3)
    reference = EpisodicMemory(30, eviction=eviction, seed=3)
    memory.add(*batches[0])  # the storage exists: the one-pass write applies
    reference.add(*batches[0])
    for i, (keys, values) in enumerate(batches[1:]):
        assert memory.append_if_valid(keys, values, 5)
        reference.add(keys, values)
        if i == 6:
            assert len(memory) == len(reference)  # a read writes the pending rows first
    assert memory._pending.count > 0
    assert_same_memory(memory, reference)


def test_huge_finite_keys_are_written_without_numpy_warnings():
    keys, values = torch.full((4, 3), 1e20), torch.tensor([0, 1, 2, 3])
    memory = EpisodicMemory(20)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        memory.add(keys, values)  # the norms overflow: the keys are still finite
        assert memory.append_if_valid(keys, values)
        memory.append_checked(memory.check_rows(keys, values))
    assert len(memory) == 12 and torch.equal(memory.keys[-4:], keys)
