"""The reliability matrix (issue 7): bad input and faults get a clear answer, nothing is lost.

Every case asserts the exact exception type and a message that names the problem and the fix,
or the documented fallback, and that the trained weights and the memory are exactly as they
were before the failure. The README section "Guarantees: what is kept, refused, or falls back"
is the prose version of this file.

Cases covered elsewhere, by design: DDP (tests/test_distributed.py), the memory's own input
validation (tests/test_memory.py), `local_adapt`'s argument checks (tests/test_adaptation.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mbpa import MbPA
from tests.helpers import (
    TinyClassifier,
    TwoLayerHead,
    assert_bit_identical,
    blobs,
    count_writes_and_adaptations,
    loader,
    params,
    trainer,
)
from tests.test_callback import ADAPT, reference_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data():
    x, y = blobs(48, seed=0)
    xt, yt = blobs(20, seed=1)
    return x, y, xt, yt


class Frozen(TinyClassifier):
    """Training runs the forward pass but never changes a weight (manual optimisation, no step),
    so the memory's keys must equal ``encoder(x)`` exactly and bad inputs cannot poison the
    weights of later batches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self(batch[0])


def fitted(data, model=None, **kwargs):
    torch.manual_seed(0)
    x, y, _, _ = data
    model = TinyClassifier() if model is None else model
    cb = MbPA(**{"k": 8, **ADAPT, **kwargs})
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    return model, cb


def batches(*pairs):
    """A loader that yields the given ``(x, y)`` batches as they are (no collation)."""
    return DataLoader(list(pairs), batch_size=None)


def memory_state(cb: MbPA) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in cb.memory.state_dict().items()}


def assert_memory_is(cb: MbPA, state: dict[str, Tensor]) -> None:
    now = cb.memory.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), f"memory entry {key} changed"


def assert_no_hooks(model: nn.Module) -> None:
    for name, sub in model.named_modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, f"hook left on {name!r}"


def mbpa_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("MbPA")]


# ====================================================================== configuration


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("head", "", "non-empty dotted module name"),
        ("head", 5, "non-empty dotted module name"),
        ("memory_size", 0, "an int >= 1"),
        ("memory_size", 2.5, "an int >= 1"),
        ("memory_size", True, "an int >= 1"),
        ("memory_size", "10", "an int >= 1"),
        ("k", 0, "an int >= 1"),
        ("k", 4.0, "an int >= 1"),
        ("adaptation_steps", -1, "an int >= 0"),
        ("adaptation_steps", None, "an int >= 0"),
        ("adaptation_lr", -0.1, "a finite float >= 0"),
        ("adaptation_lr", math.nan, "a finite float >= 0"),
        ("adaptation_lr", math.inf, "a finite float >= 0"),
        ("adaptation_lr", "0.1", "a finite float >= 0"),
        ("beta", -0.1, r"a float in \[0, 1\]"),
        ("beta", 1.5, r"a float in \[0, 1\]"),
        ("beta", math.nan, r"a float in \[0, 1\]"),
        ("kernel_eps", 0.0, r"a finite float >= 1\.1754943508222875e-38"),
        ("kernel_eps", math.inf, r"a finite float >= 1\.1754943508222875e-38"),
        ("label_key", True, "a str, an int or None"),
        ("label_key", 1.5, "a str, an int or None"),
        ("eviction", "lru", "'fifo', 'reservoir' or 'class_balanced'"),
        ("eviction", None, "'fifo', 'reservoir' or 'class_balanced'"),
        ("replay_sampling", "balanced", r"one of \['uniform', 'class_balanced'\]"),
        ("replay_sampling", None, r"one of \['uniform', 'class_balanced'\]"),
        ("index", "", "index_factory string"),
        ("index", 5, "index_factory string"),
        ("index", "NoSuchIndex", "not a valid faiss index_factory string"),
        ("write_fraction", 0.0, r"a float in \(0, 1\]"),
        ("write_fraction", 1.5, r"a float in \(0, 1\]"),
        (
            "adapt_on",
            ["train"],
            r"a list of stages from \['validate', 'test', 'predict'\]",
        ),
        ("adapt_on", "fit", r"a list of stages from \['validate', 'test', 'predict'\]"),
        ("adapt_on", None, r"a list of stages from \['validate', 'test', 'predict'\]"),
        (
            "adapt_on",
            [],
            r"`adapt_on`=\[\]\) is invalid: expected a non-empty list of stages.*nothing reads",
        ),
        ("online_writes", 1, "a bool"),
        ("save_memory", "yes", "a bool"),
        ("seed", 1.5, "an int"),
        ("seed", None, "an int"),
    ],
)
def test_invalid_argument_is_refused_naming_it_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(MisconfigurationException) as info:
        MbPA(**{name: value})
    message = str(info.value)
    assert f"`{name}`" in message and repr(value) in message
    assert info.match(allowed)


def test_head_naming_a_missing_module_lists_the_linear_modules(data):
    x, y, _, _ = data
    model = TinyClassifier()
    before = params(model)
    with pytest.raises(
        MisconfigurationException,
        match=r"MbPA\(head='decoder'\): TinyClassifier has no submodule 'decoder'\. "
        r"Its nn.Linear modules are: \['head', 'encoder.0'\]",
    ):
        trainer(callbacks=[MbPA(head="decoder", **ADAPT)]).fit(model, loader(x, y))
    assert_bit_identical(before, model)  # refused in setup(), before any training step


class NoLinearRuns(TinyClassifier):
    """Its forward pass runs no nn.Linear (the encoder's Linear exists but is bypassed)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Bilinear(8, 8, 4)

    def forward(self, x):
        return self.head(x, x)


def test_no_linear_module_or_none_that_runs_is_refused_asking_for_head(data):
    x, y, _, _ = data
    with pytest.raises(
        MisconfigurationException,
        match=r"MbPA\(head=None\): no nn.Linear ran while processing the training batch, so the "
        r"head cannot be found\. Name the module your forward pass ends with via `head=\.\.\.`",
    ):
        trainer(callbacks=[MbPA(**ADAPT)]).fit(NoLinearRuns(), loader(x, y))
    model = NoLinearRuns()
    model.encoder = nn.ReLU()
    with pytest.raises(
        MisconfigurationException,
        match=r"MbPA\(head=None\): NoLinearRuns has no nn.Linear module to use as the head\. "
        r"Name the output head with `head=\.\.\.`",
    ):
        trainer(callbacks=[MbPA(**ADAPT)]).fit(model, loader(x, y))


class Bypass(TinyClassifier):
    """Has a Linear ``extra`` that the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(16, 4)


def test_head_not_called_in_forward_is_refused_in_fit_and_in_predict(data):
    x, y, xt, yt = data
    model = Bypass()
    with pytest.raises(
        MisconfigurationException,
        match=r"head 'extra' was not called while processing the training batch.*`head=\.\.\.`",
    ):
        trainer(callbacks=[MbPA(head="extra", **ADAPT)]).fit(model, loader(x, y))
    assert_no_hooks(model)

    # a memory restored for `extra` (here from another callback): predict must not silently
    # return unadapted predictions
    cb = MbPA(head="extra", k=4, **ADAPT)
    cb.memory.add(torch.randn(8, 16), torch.arange(8) % 4)
    memory, before = memory_state(cb), params(model)
    with pytest.raises(
        MisconfigurationException,
        match=r"head 'extra' was not called while processing the predict batch.*`head=\.\.\.`",
    ):
        trainer(callbacks=[cb]).predict(model, loader(xt, yt))
    assert_bit_identical(before, model)
    assert_memory_is(cb, memory)
    assert_no_hooks(model)


class SkipsLaterBatches(TinyClassifier):
    """A ``predict_step`` that answers some batches without running the model."""

    def predict_step(self, batch, batch_idx):
        if batch_idx % 2:
            return torch.zeros(len(batch[0]), 4)
        return self(batch[0])


def test_a_step_that_skips_the_head_after_it_ran_is_not_refused(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model, cb = SkipsLaterBatches(), MbPA(k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    out = trainer(callbacks=[cb]).predict(model, loader(xt, yt))
    plain = TinyClassifier()
    plain.load_state_dict(model.state_dict())
    every = trainer(callbacks=[cb]).predict(plain, loader(xt, yt))  # same weights and memory
    for i, (got, adapted) in enumerate(zip(out, every, strict=True)):
        assert torch.equal(got, torch.zeros_like(got) if i % 2 else adapted), i


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, h):
        return self.linear(h).flatten()


class Unsqueezed(Flat):
    def forward(self, h):
        return self.linear(h).unsqueeze(-1)


class Pair(Flat):
    def forward(self, h):
        return self.linear(h), h


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (Flat, r"maps inputs of shape \(20, 16\) to outputs of shape \(80,\); MbPA needs \[B, C\]"),
        (Unsqueezed, r"maps inputs of shape \(20, 16\) to outputs of shape \(20, 4, 1\)"),
        (Pair, r"must take a tensor and return a tensor of logits; it returned tuple"),
    ],
)
def test_head_whose_output_is_not_logits_is_refused_and_nothing_changes(data, head, message):
    x, y, xt, yt = data

    class Model(Frozen):
        def __init__(self):
            super().__init__()
            self.head = head()

        def predict_step(self, batch, batch_idx):
            self(batch[0])

    model = Model()
    cb = MbPA(head="head", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))  # keys are the head's inputs: fine
    assert len(cb.memory) == len(x)
    memory, before = memory_state(cb), params(model)
    with pytest.raises(MisconfigurationException, match=message):
        trainer(callbacks=[cb]).predict(model, loader(xt, yt, batch_size=20))
    assert_bit_identical(before, model)
    assert_memory_is(cb, memory)
    assert_no_hooks(model)


# ====================================================================== data


class LabelBlind(Frozen):
    """A training step that never reads the labels, so only MbPA can object to them."""


def test_batch_without_labels_is_refused_showing_what_it_contains():
    x, _ = blobs(32)

    class Unsupervised(Frozen):
        def training_step(self, batch, batch_idx):
            self(batch["pixels"])

    cb = MbPA(k=4, **ADAPT)
    with pytest.raises(
        MisconfigurationException,
        match=r"cannot find labels in the training batch: it contains "
        r"dict\('pixels': Tensor\(shape=\(8, 8\).*Set `label_key=\.\.\.` or override "
        r"`MbPA.extract_labels`",
    ):
        trainer(callbacks=[cb]).fit(Unsupervised(), DataLoader([{"pixels": r} for r in x], 8))
    assert len(cb.memory) == 0


@pytest.mark.parametrize(
    ("bad_labels", "error", "message"),
    [
        (
            lambda y: torch.cat([y, y]),
            MisconfigurationException,
            r"labels of the training batch \(shape \(32,\)\) do not match the inputs of the head "
            r"'head' \(shapes \[\(16, 16\)\]\): need one label per head input row",
        ),
        (
            lambda y: y.float() + 0.5,
            ValueError,
            r"labels under 1 are unusable: `labels` must be integer class labels; got "
            r"non-integral values \[.*point `label_key=\.\.\.` at the class labels, or override "
            r"`MbPA.extract_labels`",
        ),
        (
            lambda y: [f"class{int(v)}" for v in y],
            ValueError,
            r"labels under 1 are unusable: `labels` must be integer class labels",
        ),
        (
            lambda y: y + 3,
            ValueError,
            r"labels of the training batch must be class indices in \[0, 4\) \(4 outputs\) for "
            r"the head 'head', or -100 to skip a row; got \[4, 5, 6\]\. Fix the labels",
        ),
        (
            lambda y: torch.where(y == 0, -1, y),
            ValueError,
            r"must be class indices in \[0, 4\) \(4 outputs\).*got \[-1\]",
        ),
    ],
    ids=["wrong-length", "non-integer", "strings", "above-range", "negative"],
)
def test_bad_labels_refuse_the_batch_and_keep_every_earlier_write(bad_labels, error, message):
    x, y = blobs(48)
    model = LabelBlind()
    with torch.no_grad():
        keys = model.encoder(x)
    cb = MbPA(k=4, **ADAPT)
    dl = batches((x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], bad_labels(y[32:])))
    with pytest.raises(error, match=message):
        trainer(callbacks=[cb]).fit(model, dl)
    assert torch.equal(cb.memory.keys, keys[:32]) and torch.equal(cb.memory.values, y[:32])
    assert_no_hooks(model)


def test_labels_outside_a_generic_heads_range_are_refused_at_test_time(data):
    """A non-Linear head's number of outputs is only known from its output, at test time."""
    x, y, xt, yt = data

    class GenericHead(Frozen, TwoLayerHead):
        pass

    model = GenericHead()
    cb = MbPA(head="head", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y * 3))  # labels 0..9 for 4 outputs
    memory, before = memory_state(cb), params(model)
    with pytest.raises(
        MisconfigurationException,
        match=r"memory holds labels \[6, 9\], but the head 'head' needs class indices in "
        r"\[0, 4\) \(4 outputs\).*use a fresh MbPA callback",
    ):
        trainer(callbacks=[cb]).predict(model, loader(xt, yt))
    assert_bit_identical(before, model)
    assert_memory_is(cb, memory)
    assert_no_hooks(model)

    # online writes during test are checked against the outputs the head has shown
    cb = MbPA(head="head", k=4, online_writes=True, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    memory = memory_state(cb)
    with pytest.raises(
        ValueError,
        match=r"labels of the test batch \(online_writes\) must be class indices in \[0, 4\) "
        r"\(4 outputs\) for the head 'head', or -100 to skip a row; got \[",
    ):
        trainer(callbacks=[cb]).test(model, loader(xt, yt * 3), verbose=False)
    assert_memory_is(cb, memory)
    assert_bit_identical(before, model)


def test_nan_and_inf_embeddings_refuse_their_batch_with_a_counted_warning():
    x, y = blobs(80)
    nan, inf = x[16:32].clone(), x[48:64].clone()
    nan[3, 0] = math.nan
    inf[0, 1], inf[9, 2] = math.inf, -math.inf
    dl = batches(
        (x[:16], y[:16]),
        (nan, y[16:32]),
        (x[32:48], y[32:48]),
        (inf, y[48:64]),
        (x[64:], y[64:]),
    )
    model = LabelBlind()
    with torch.no_grad():
        keys = model.encoder(x)
    clean = torch.cat([torch.arange(0, 16), torch.arange(32, 48), torch.arange(64, 80)])
    cb = MbPA(k=4, **ADAPT)
    with pytest.warns(UserWarning, match="MbPA: refused") as record:
        trainer(callbacks=[cb]).fit(model, dl)
    assert mbpa_warnings(record) == [
        "MbPA: refused a training batch: 1 of its 16 head inputs hold NaN or infinite values, so "
        "nothing of it was written to memory (1 batches, 1 rows refused so far). Non-finite "
        "embeddings usually mean training diverged: lower the learning rate or clip gradients.",
        "MbPA: refused a training batch: 2 of its 16 head inputs hold NaN or infinite values, so "
        "nothing of it was written to memory (2 batches, 3 rows refused so far). Non-finite "
        "embeddings usually mean training diverged: lower the learning rate or clip gradients.",
    ]
    assert torch.equal(cb.memory.keys, keys[clean]) and torch.equal(cb.memory.values, y[clean])
    assert cb.memory.num_seen == 48  # refused rows were never offered


def test_nan_queries_keep_the_base_prediction_and_the_others_are_adapted(data):
    _, _, xt, yt = data
    model, cb = fitted(data)
    bad = xt.clone()
    bad[[2, 7], 0] = math.nan
    with pytest.warns(UserWarning, match=r"MbPA: 2 of 20 predict queries hold NaN or infinite"):
        got = torch.cat(trainer(callbacks=[cb]).predict(model, loader(bad, yt, batch_size=20)))
    keep = torch.ones(20, dtype=torch.bool)
    keep[[2, 7]] = False
    assert torch.isnan(got[~keep]).all()  # the base prediction of a NaN input
    torch.testing.assert_close(
        got[keep], reference_logits(model, cb, xt[keep]), rtol=1e-4, atol=1e-5
    )


def test_empty_batches_write_nothing_and_predict_empty_outputs():
    x, y = blobs(32)
    model = LabelBlind()
    with torch.no_grad():
        keys = model.encoder(x)
    cb = MbPA(k=4, **ADAPT)
    dl = batches((x[:0], y[:0]), (x[:16], y[:16]), (x[:0], y[:0]), (x[16:], y[16:]))
    trainer(callbacks=[cb]).fit(model, dl)
    assert torch.equal(cb.memory.keys, keys) and torch.equal(cb.memory.values, y)
    assert cb.memory.num_seen == 32
    preds = trainer(callbacks=[cb]).predict(model, dl)
    assert [tuple(p.shape) for p in preds] == [(0, 4), (16, 4), (0, 4), (16, 4)]


class ZeroPadded(nn.Module):
    """A head that takes inputs of any width up to 16 (zero-padded)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, h):
        return self.linear(F.pad(h, (0, 16 - h.shape[-1])))


class Narrowing(LabelBlind):
    """Feeds its head 16-wide inputs, or 8-wide ones for a batch of 15 rows."""

    def __init__(self):
        super().__init__()
        self.head = ZeroPadded()

    def forward(self, x):
        h = self.encoder(x)
        return self.head(h[:, :8] if h.shape[0] == 15 else h)


def test_head_called_with_varying_widths_is_refused_in_fit_and_in_predict():
    x, y = blobs(47)
    model = Narrowing()
    cb = MbPA(head="head", k=4, **ADAPT)
    with pytest.raises(
        MisconfigurationException,
        match=r"head 'head' was called with inputs of width 8 in the training batch, but the "
        r"memory holds keys of width 16\. MbPA needs a head with a fixed input width",
    ):
        trainer(callbacks=[cb]).fit(model, loader(x, y))
    assert len(cb.memory) == 32 and cb.memory.dim == 16
    memory, before = memory_state(cb), params(model)
    with pytest.raises(
        MisconfigurationException,
        match=r"called with inputs of width 8, but the memory holds keys of width 16",
    ):
        trainer(callbacks=[cb]).predict(model, loader(x[:15], y[:15]))
    assert_bit_identical(before, model)
    assert_memory_is(cb, memory)


def test_an_index_that_cannot_take_the_key_width_is_refused_at_the_first_batch(data):
    """PQ3 cannot split 16-wide keys into 3 sub-vectors. Writes are buffered and reach the
    index in bulk, so without an eager check this failed at the end of the epoch."""
    x, y, _, _ = data
    model = TinyClassifier()
    seen = []

    class CountBatches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch_idx)

    cb = MbPA(head="head", index="PQ3", k=4, **ADAPT)
    with pytest.raises(
        MisconfigurationException,
        match=r"MbPA\(index='PQ3'\) cannot index the keys of the head 'head', which are 16 wide:"
        r".*multiple of the number of subquantizers.*m must divide it\) or 'Flat'",
    ):
        trainer(callbacks=[CountBatches(), cb]).fit(model, loader(x, y))
    assert seen == [0]
    assert len(cb.memory) == 0 and cb.memory.dim is None
    # a width it can take is written as usual
    cb = MbPA(head="head", index="PQ4", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y))
    assert len(cb.memory) == 48 and cb.memory.dim == 16


class WideHead(TinyClassifier):
    """A non-Linear head (its input width is unknown until it runs) fed 12-wide inputs."""

    def __init__(self):
        super().__init__(hidden=12)
        self.head = nn.Sequential(nn.Linear(12, 4))


def test_a_cleared_memory_keeps_its_width_and_refuses_others_at_the_first_batch(data):
    x, y, _, _ = data
    cb = MbPA(head="head", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y))
    cb.memory.clear()
    assert len(cb.memory) == 0 and cb.memory.dim == 16
    seen = []

    class CountBatches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch_idx)

    with pytest.raises(
        MisconfigurationException,
        match=r"called with inputs of width 12 in the training batch, but the memory holds keys "
        r"of width 16",
    ):
        trainer(callbacks=[CountBatches(), cb]).fit(WideHead(), loader(x, y))
    assert seen == [0] and len(cb.memory) == 0 and cb.memory.dim == 16


def test_adapt_on_may_be_empty_for_replay_alone(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = MbPA(adapt_on=[], store_inputs=True, replay_every_n_steps=1, replay_batch_size=8, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    assert len(cb.memory) == 48 and cb._drift.replay_slots is not None  # replay ran
    with torch.no_grad():
        base = model(xt)
    assert torch.equal(torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt))), base)


class HeadTwice(Frozen):
    """The head also scores a second, differently shaped input every step (say a prototype
    bank): only the call whose rows match the labels is a memory."""

    def training_step(self, batch, batch_idx):
        self.head(torch.zeros(3, 16))
        self(batch[0])


def test_head_calls_that_do_not_match_the_labels_are_skipped_with_one_warning(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model = HeadTwice()
    cb = MbPA(head="head", k=4, **ADAPT)
    with pytest.warns(UserWarning) as record:  # batches of 16, 16 and 10: shapes vary
        trainer(callbacks=[cb]).fit(model, loader(x[:42], y[:42]))
    warned = [m for m in mbpa_warnings(record) if "ran 2 times in one step" in m]
    assert len(warned) == 1, warned
    assert "shapes [(3, 16), (16, 16)]" in warned[0] and "`head=...`" in warned[0]
    with torch.no_grad():
        expected = model.encoder(x[:42])
    torch.testing.assert_close(cb.memory.keys, expected, rtol=0, atol=0)
    assert torch.equal(cb.memory.values, y[:42])


# ====================================================================== runs


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
@pytest.mark.parametrize("head", [None, "head"])
def test_stage_without_fit_falls_back_to_base_predictions_with_one_warning(data, stage, head):
    _, _, xt, yt = data
    model = TinyClassifier()
    before = params(model)
    cb = MbPA(head=head, adapt_on=["validate", "test", "predict"], **ADAPT)
    with torch.no_grad():
        base = model(xt)
    with pytest.warns(UserWarning) as record:
        run = getattr(trainer(callbacks=[cb]), stage)
        out = run(model, loader(xt, yt), **({} if stage == "predict" else {"verbose": False}))
    assert mbpa_warnings(record) == [
        f"MbPA: the episodic memory is empty, so {stage} uses the model's base predictions until "
        "something is written. Fit with the callback attached, restore a checkpoint that holds "
        "the memory, or call `MbPA.populate(model, dataloader)`."
    ]
    if stage == "predict":
        assert torch.equal(torch.cat(out), base)
    elif stage == "test":
        assert out[0]["test_acc"] == pytest.approx((base.argmax(1) == yt).float().mean().item())
    else:
        assert out[0]["val_loss"] == pytest.approx(F.cross_entropy(base, yt).item(), rel=1e-6)
    if stage != "predict":
        assert out[0]["mbpa/memory_size"] == 0
    assert_bit_identical(before, model)
    assert_no_hooks(model)


def test_k_larger_than_the_memory_uses_all_memories(data):
    _, _, xt, yt = data
    model, cb = fitted(data, k=500)  # 48 memories
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(preds, reference_logits(model, cb, xt), rtol=1e-4, atol=1e-5)


class HookCounter(Callback):
    """Records how many MbPA hooks sit on the head while each stage runs."""

    def __init__(self):
        self.seen: dict[str, set[tuple[int, int]]] = {}

    def _record(self, stage, pl_module):
        head = pl_module.head
        self.seen.setdefault(stage, set()).add(
            (len(head._forward_pre_hooks), len(head._forward_hooks))
        )

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._record("fit", pl_module)

    def on_test_batch_end(self, trainer, pl_module, *args):
        self._record("test", pl_module)


def test_fit_test_fit_test_never_doubles_hooks_and_the_memory_continues(data, monkeypatch):
    x, y, xt, yt = data
    calls = count_writes_and_adaptations(monkeypatch)

    torch.manual_seed(0)
    model, cb, counter = TinyClassifier(), MbPA(k=8, **ADAPT), HookCounter()
    results = []
    for _ in range(2):
        trainer(callbacks=[cb, counter]).fit(model, loader(x, y))
        before = params(model)
        results.append(trainer(callbacks=[cb, counter]).test(model, loader(xt, yt), verbose=False))
        assert_bit_identical(before, model)
        assert_no_hooks(model)
    assert counter.seen == {"fit": {(1, 0)}, "test": {(0, 1)}}
    assert calls == {"add": 2 * len(x), "adapt": 2 * 2}  # rows written; 2 test batches a round

    # one fit of 2 epochs (SGD has no state to lose between fits) writes the same memory
    torch.manual_seed(0)
    straight_model, straight = TinyClassifier(), MbPA(k=8, **ADAPT)
    trainer(callbacks=[straight], max_epochs=2).fit(straight_model, loader(x, y))
    assert cb.memory.num_seen == 2 * len(x)
    assert_memory_is(cb, straight.memory.state_dict())
    expected = trainer(callbacks=[straight]).test(straight_model, loader(xt, yt), verbose=False)
    for result in (results[1], expected):
        result[0].pop("mbpa/queries_per_s")
    assert results[1] == expected


def test_two_mbpa_callbacks_are_refused(data):
    x, y, _, _ = data
    with pytest.raises(
        MisconfigurationException,
        match=r"only one MbPA callback per Trainer is supported \(found 2\).*Keep one",
    ):
        trainer(callbacks=[MbPA(head="head", **ADAPT), MbPA(**ADAPT)]).fit(
            TinyClassifier(), loader(x, y)
        )
    # identical configurations share a checkpoint key: Lightning refuses them at Trainer()
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MbPA`"):
        trainer(callbacks=[MbPA(**ADAPT), MbPA(**ADAPT)])


@pytest.mark.parametrize("how", ["module.compile", "torch.compile"])
def test_compiled_modules_write_and_adapt_like_eager_ones(data, how):
    """torch.compile with the ``eager`` backend: dynamo traces the forward pass and its hooks
    exactly as with inductor (the part that used to break), without inductor's minutes of C++
    code generation on a CPU box. MbPA's hooks run outside the graph."""
    x, y, xt, yt = data
    eager_model, eager = fitted(data)
    eager_preds = torch.cat(trainer(callbacks=[eager]).predict(eager_model, loader(xt, yt)))

    torch.manual_seed(0)
    model = TinyClassifier()
    if how == "module.compile":
        model.compile(backend="eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")
    cb = MbPA(k=8, **ADAPT)
    trainer(callbacks=[cb]).fit(compiled, loader(x, y))
    torch.testing.assert_close(cb.memory.keys, eager.memory.keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(cb.memory.values, eager.memory.values)
    before = params(model)
    preds = torch.cat(trainer(callbacks=[cb]).predict(compiled, loader(xt, yt)))
    torch.testing.assert_close(preds, eager_preds, rtol=1e-5, atol=1e-5)
    assert_bit_identical(before, model)
    assert_no_hooks(model)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_stores_float32_keys_and_returns_the_models_dtype(data, precision):
    x, y, xt, yt = data
    model = Frozen()
    cb = MbPA(k=8, **ADAPT)
    trainer(callbacks=[cb], precision=precision).fit(model, loader(x, y))
    with torch.no_grad():
        if precision == "bf16-mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                keys, base = model.encoder(x), model(xt)
        else:
            keys, base = model.encoder(x.bfloat16()), model(xt.bfloat16())
    assert cb.memory.keys.dtype == torch.float32
    assert torch.equal(cb.memory.keys, keys.float())  # the bf16 head inputs, exactly
    preds = torch.cat(trainer(callbacks=[cb], precision=precision).predict(model, loader(xt, yt)))
    assert preds.dtype == base.dtype == torch.bfloat16
    # against a float32 per-query reference on the same memory: bf16 rounding only
    reference = reference_logits(model.float(), cb, xt)
    torch.testing.assert_close(preds.float(), reference, rtol=0.05, atol=0.05)


def test_inference_mode_off_gives_identical_results_and_leaves_no_gradients(data):
    _, _, xt, yt = data
    model, cb = fitted(data)
    before = params(model)
    on = torch.cat(trainer(callbacks=[cb], inference_mode=True).predict(model, loader(xt, yt)))
    off = torch.cat(trainer(callbacks=[cb], inference_mode=False).predict(model, loader(xt, yt)))
    assert torch.equal(on, off)
    assert not off.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert_bit_identical(before, model)


# ====================================================================== faults


class _Boom(Exception):
    pass


class FailingAt1(TinyClassifier):
    """Raises ``fault`` in the second test/predict batch (after the first was adapted)."""

    fault: type[BaseException] = _Boom

    def test_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise self.fault("boom")
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise self.fault("boom")
        return super().predict_step(batch, batch_idx)


@pytest.mark.parametrize("stage", ["test", "predict"])
@pytest.mark.parametrize("fault", [_Boom, KeyboardInterrupt])
def test_a_fault_inside_test_or_predict_leaves_weights_memory_and_hooks_as_they_were(
    data, stage, fault
):
    _, _, xt, yt = data
    torch.manual_seed(0)
    model = FailingAt1()
    model.fault = fault
    model, cb = fitted(data, model=model)
    before, memory = params(model), memory_state(cb)
    expected = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt[:16], yt[:16])))

    run = getattr(trainer(callbacks=[cb]), stage)
    # Lightning turns a KeyboardInterrupt into a graceful exit (on_exception, then SystemExit)
    with pytest.raises(_Boom if fault is _Boom else SystemExit):
        run(model, loader(xt, yt), **({"verbose": False} if stage == "test" else {}))
    assert_bit_identical(before, model)
    assert_memory_is(cb, memory)
    assert_no_hooks(model)
    # internal only (no public view of what the hooks hold): no captured tensor is kept alive
    assert not cb._writer.captured
    with torch.no_grad():  # a plain forward is the base model again
        assert torch.equal(model(xt), TinyClassifier.forward(model, xt))
    # and the callback works as before the fault
    again = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt[:16], yt[:16])))
    assert torch.equal(again, expected)


def _good_state(data) -> dict:
    _, cb = fitted(data)
    return cb.state_dict()


def _corrupt(state: dict, **memory) -> dict:
    return {**state, "memory": {**state["memory"], **memory}}


CORRUPTIONS = {
    "memory entry missing": (
        lambda s: {"head": s["head"], "write_generator": s["write_generator"]},
        r"has no 'memory' entry; it is truncated or was written by another callback",
    ),
    "memory not a mapping": (
        lambda s: {**s, "memory": torch.zeros(3)},
        r"has no 'memory' entry; it is truncated",
    ),
    "keys truncated": (
        lambda s: _corrupt(s, keys=s["memory"]["keys"][:10]),
        r"cannot restore the memory from the checkpoint: `state\['keys'\]` must be float32 of "
        r"shape \[48, 16\].*got torch.float32 of shape \(10, 16\)",
    ),
    "values truncated": (
        lambda s: _corrupt(s, values=s["memory"]["values"][:10]),
        r"`state\['values'\]` must be int64 of shape \[48\]; got torch.int64 of shape \(10,\)",
    ),
    "counter missing": (
        lambda s: {**s, "memory": {k: v for k, v in s["memory"].items() if k != "num_seen"}},
        r"`state` must hold exactly .* missing \['num_seen'\]",
    ),
    "cursor inconsistent": (
        lambda s: _corrupt(s, cursor=torch.tensor(3)),
        r"`state\['cursor'\]`=3 is inconsistent with num_seen=48",
    ),
    "NaN keys": (
        lambda s: _corrupt(s, keys=torch.full_like(s["memory"]["keys"], math.nan)),
        r"`state\['keys'\]` must be finite; got NaN or infinite values",
    ),
    "float64 keys": (
        lambda s: _corrupt(s, keys=s["memory"]["keys"].double()),
        r"`state\['keys'\]` must be float32",
    ),
    "labels outside the head": (
        lambda s: _corrupt(s, values=torch.full_like(s["memory"]["values"], 99)),
        r"checkpoint's memory holds labels \[99\], but the head 'head' needs class indices in "
        r"\[0, 4\)",
    ),
    "memory generator garbage": (
        lambda s: _corrupt(s, generator_state=torch.zeros(3, dtype=torch.uint8)),
        r"`state\['generator_state'\]` is not a CPU torch.Generator state",
    ),
    "write generator garbage": (
        lambda s: {**s, "write_generator": torch.zeros(3, dtype=torch.uint8)},
        r"'write_generator' entry is not a CPU generator state .* the checkpoint is corrupted",
    ),
    "head not a name": (
        lambda s: {**s, "head": 7},
        r"'head' entry is 7, not a module name; the checkpoint is corrupted",
    ),
    "head not in the model": (
        lambda s: {**s, "head": "decoder"},
        r"memory was written from head 'decoder', which this model lacks.*\['head', 'encoder.0'\]",
    ),
    "other capacity": (
        lambda s: _corrupt(s, capacity=torch.tensor(64)),
        r"MbPA\(memory_size=100000\): the checkpoint's memory has capacity 64; use "
        r"memory_size=64 to restore it",
    ),
    "written by a model with another head width": (
        lambda s: _corrupt(s, keys=torch.randn(48, 32), dim=torch.tensor(32)),
        r"memory holds keys of width 32 but the head 'head' takes inputs of width 16.*fresh MbPA",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_memory_state_is_refused_before_anything_is_loaded(data, case):
    corrupt, message = CORRUPTIONS[case]
    state = corrupt(_good_state(data))
    # the target already holds a memory and a head found by discovery: both must survive
    model, cb = TinyClassifier(), MbPA(k=8, **ADAPT)
    cb.setup(trainer(callbacks=[cb]), model, "test")
    cb.populate(model, loader(*blobs(8, seed=5)))
    memory, head = memory_state(cb), cb._head.module
    generator = cb.state_dict()["write_generator"]
    with pytest.raises(MisconfigurationException, match=message):
        cb.load_state_dict(state)
    assert_memory_is(cb, memory)
    assert cb._head.module is head and cb.head_name == "head"
    assert torch.equal(cb.state_dict()["write_generator"], generator)


def test_a_corrupted_or_truncated_checkpoint_file_is_refused_by_trainer_test(tmp_path, data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model, cb = TinyClassifier(), MbPA(k=8, **ADAPT)
    trainer(
        callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True,
    ).fit(model, loader(x, y))
    good = tmp_path / "last.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["callbacks"][cb.state_key]["memory"]["keys"][5, 0] = math.inf
    corrupted = tmp_path / "corrupted.ckpt"
    torch.save(checkpoint, corrupted)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    target = MbPA(k=8, **ADAPT)
    target.populate(TinyClassifier(), loader(xt, yt))
    memory = memory_state(target)
    with pytest.raises(MisconfigurationException, match=r"`state\['keys'\]` must be finite"):
        trainer(callbacks=[target]).test(TinyClassifier(), loader(xt, yt), ckpt_path=corrupted)
    assert_memory_is(target, memory)
    # torch.load's own error (the archive's directory is cut off; OSError through fsspec here,
    # RuntimeError from torch's zip reader on other file objects): nothing reaches the callback
    with pytest.raises((OSError, RuntimeError)):
        trainer(callbacks=[target]).test(TinyClassifier(), loader(xt, yt), ckpt_path=truncated)
    assert_memory_is(target, memory)


_KILLED_FIT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_mbpa import MbPA
    from tests.helpers import TinyClassifier, blobs, loader, trainer

    directory, kill_at = sys.argv[1], int(sys.argv[2])

    class KillAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at:
                mbpa = next(cb for cb in trainer.callbacks if isinstance(cb, MbPA))
                with open(os.path.join(directory, "at_kill.json"), "w") as f:
                    json.dump({"num_seen": mbpa.memory.num_seen}, f)
                os.kill(os.getpid(), signal.SIGKILL)  # no on_exception, no teardown, no flush

    torch.manual_seed(0)
    x, y = blobs(96)
    trainer(
        callbacks=[
            MbPA(k=8, memory_size=150, adaptation_steps=3, adaptation_lr=0.5, beta=0.1),
            ModelCheckpoint(dirpath=directory, save_last=True),
            KillAt(),
        ],
        max_epochs=3,
        enable_checkpointing=True,
    ).fit(TinyClassifier(), loader(x, y))
    """
)


def test_a_process_killed_between_checkpoints_resumes_losing_only_the_writes_since(tmp_path):
    """SIGKILL mid-epoch 2 (global step 8 of 6 per epoch). The last checkpoint (end of epoch 1)
    holds every write up to it; the 32 writes since are lost, and the resumed fit redoes them,
    ending with the memory of a run that was never killed."""
    x, y = blobs(96)
    dl = loader(x, y, batch_size=16)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_FIT, str(tmp_path), "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    at_kill = json.loads((tmp_path / "at_kill.json").read_text())["num_seen"]
    assert at_kill == 8 * 16
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved_memory = next(v for k, v in saved["callbacks"].items() if k.startswith("MbPA"))["memory"]
    assert int(saved_memory["num_seen"]) == 6 * 16  # lost: the 2 batches since the checkpoint

    kwargs = dict(k=8, memory_size=150, **ADAPT)
    resumed = MbPA(**kwargs)
    trainer(callbacks=[resumed], max_epochs=3).fit(
        TinyClassifier(), dl, ckpt_path=tmp_path / "last.ckpt"
    )
    torch.manual_seed(0)
    straight = MbPA(**kwargs)
    trainer(callbacks=[straight], max_epochs=3).fit(TinyClassifier(), dl)
    assert resumed.memory.num_seen == straight.memory.num_seen == 3 * 96
    assert_memory_is(resumed, straight.memory.state_dict())
