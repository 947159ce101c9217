"""What an adversarial user could still break: one test per case, each failing before its fix.

Custom batch objects, training steps that skip the head, head inputs near the float32 limit,
a ``kernel_eps`` too small for float32, and a float64 model with inputs beyond float32.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mbpa import MbPA, kernel_weights, local_adapt
from tests.helpers import TinyClassifier, blobs, loader, params, trainer
from tests.test_callback import ADAPT, reference_logits
from tests.test_reliability import assert_no_hooks

MIN_KERNEL_EPS = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


@pytest.fixture
def data():
    x, y = blobs(48, seed=0)
    xt, yt = blobs(20, seed=1)
    return x, y, xt, yt


class Batch:
    """A custom batch class: plain attributes, neither a NamedTuple nor a dataclass."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


class SlotBatch:
    __slots__ = ("features", "target")

    def __init__(self, features: Tensor, target: Tensor) -> None:
        self.features, self.target = features, target


def object_loader(x: Tensor, y: Tensor, cls: type = Batch, size: int = 16) -> DataLoader:
    return DataLoader(
        [cls(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)],
        batch_size=None,
    )


class ObjectBatches(TinyClassifier):
    def _xy(self, batch):
        if isinstance(batch, SlotBatch):
            return batch.features, batch.target
        return batch.x, batch.y


# ---------------------------------------------------------------- 1. custom batch objects


@pytest.mark.parametrize("label_key", ["y", None])
def test_custom_batch_object_labels_are_found_by_attribute(data, label_key):
    x, y, _, _ = data
    torch.manual_seed(0)
    model, cb = ObjectBatches(), MbPA(k=4, label_key=label_key, **ADAPT)
    trainer(callbacks=[cb]).fit(model, object_loader(x, y))
    assert torch.equal(cb.memory.values, y)
    assert_no_hooks(model)


def test_custom_batch_object_with_slots_and_populate(data):
    x, y, _, _ = data
    model, cb = ObjectBatches(), MbPA(k=4, **ADAPT)
    assert cb.populate(model, object_loader(x, y, SlotBatch)) == len(x)
    assert torch.equal(cb.memory.values, y)
    with torch.no_grad():
        assert torch.equal(cb.memory.keys, model.encoder(x))


class Stored:
    """Serves its fields through ``__getattr__`` from a private store (as graph data objects do)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self._store = {"x": x, "y": y}

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self.__dict__["_store"][name]
        except KeyError:
            raise AttributeError(name) from None


def test_batch_object_with_dynamic_attributes_and_label_key(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model, cb = ObjectBatches(), MbPA(k=4, label_key="y", **ADAPT)
    trainer(callbacks=[cb]).fit(model, object_loader(x, y, Stored))
    assert torch.equal(cb.memory.values, y)
    with pytest.raises(MisconfigurationException, match=r"label_key='z'.*no such item"):
        trainer(callbacks=[MbPA(k=4, label_key="z", **ADAPT)]).fit(
            ObjectBatches(), object_loader(x, y, Stored)
        )


def test_custom_batch_object_without_labels_names_its_attributes(data):
    x, y, _, _ = data

    class NoLabels:
        def __init__(self, x: Tensor, y: Tensor) -> None:
            self.x, self.classes = x, y

    class Model(TinyClassifier):
        def _xy(self, batch):
            return batch.x, batch.classes

    model = Model()
    with pytest.raises(MisconfigurationException, match=r"NoLabels\('x': Tensor.*'classes'"):
        trainer(callbacks=[MbPA(k=4, **ADAPT)]).fit(model, object_loader(x, y, NoLabels))
    assert_no_hooks(model)


# ------------------------------------------------- 2. a training step that returns None


class SkipsSomeSteps(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if batch_idx in (1, 2):
            return None  # a skipped step: Lightning skips the optimizer step too
        return super().training_step(batch, batch_idx)


def test_training_step_returning_none_after_earlier_batches_is_accepted(data):
    x, y, _, _ = data
    model, cb = SkipsSomeSteps(), MbPA(k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))  # 3 batches of 16
    assert torch.equal(cb.memory.values, y[:16])  # only the batch that ran the head
    assert_no_hooks(model)


def test_training_step_returning_none_from_the_first_batch_still_names_the_head(data):
    class NeverRuns(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return None

    x, y, _, _ = data
    model = NeverRuns()
    with pytest.raises(MisconfigurationException, match=r"head 'head' was not called"):
        trainer(callbacks=[MbPA(head="head", k=4, **ADAPT)]).fit(model, loader(x, y))
    assert_no_hooks(model)


# ---------------------------------------------------- 3. huge keys overflow float32


class Scaled(TinyClassifier):
    """The head sees the encoder's output times ``scale`` (huge head inputs)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x) * self.scale + 1.0)


@pytest.mark.parametrize(("scale", "all_base"), [(1e19, False), (1e20, True), (1e30, True)])
def test_huge_head_inputs_give_finite_predictions_with_a_warning(data, scale, all_base):
    x, y, xt, _ = data
    torch.manual_seed(0)
    model, cb = Scaled(scale), MbPA(k=4, **ADAPT)
    cb.populate(model, loader(x, y))
    with torch.no_grad():
        base = model(torch.cat([xt, x[:8]]))
    queries = torch.cat([xt, x[:8]])  # new queries, and exact duplicates of memories
    with pytest.warns(UserWarning, match=r"overflow") as record:
        out = torch.cat(trainer(callbacks=[cb]).predict(model, loader(queries, queries[:, 0])))
    assert torch.isfinite(out).all()
    # the queries whose adaptation overflows keep their base prediction, and a warning says so;
    # at 1e30 every squared norm is beyond float32, so nothing can be adapted
    assert (out == base).all(-1).any()
    assert torch.equal(out, base) == all_base
    text = " ".join(str(w.message) for w in record)
    assert "Scale the head's inputs down" in text or "scale the head's inputs down" in text


def test_local_adapt_overflowing_gram_matrix_keeps_base_outputs_with_a_warning():
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    keys = torch.randn(6, 4, 16)
    keys[:3] *= 1e20  # squared norms ~1e41: beyond float32
    queries = keys[:, 0].clone()
    labels = torch.randint(0, 4, (6, 4))
    weights = torch.full((6, 4), 0.25)
    with pytest.warns(UserWarning, match=r"overflowed torch.float32.*lower `lr`"):
        out = local_adapt(head, queries, keys, labels, weights, steps=3, lr=0.1, beta=0.0)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(out[:3], head(queries[:3]))
        expected = local_adapt(head, queries[3:], keys[3:], labels[3:], weights[3:], 3, 0.1, 0.0)
    assert torch.equal(out[3:], expected)  # the other queries are adapted as usual


def test_moderate_keys_are_still_adapted_exactly(data):
    # 1e17: squared distances ~1e35, inside float32, so nothing falls back
    x, y, xt, _ = data
    torch.manual_seed(0)
    model, cb = Scaled(1e3), MbPA(k=4, **ADAPT)
    cb.populate(model, loader(x, y))
    out = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, xt[:, 0])))
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert not torch.equal(out, model(xt))


# --------------------------------------------------------------- 4. a tiny kernel_eps


@pytest.mark.parametrize("eps", [1e-45, 1e-39, 0.0])
def test_kernel_eps_below_the_float32_normal_range_is_refused(eps):
    with pytest.raises(MisconfigurationException, match=r"`kernel_eps`.*>= 1\.17549435"):
        MbPA(kernel_eps=eps)
    with pytest.raises(ValueError, match=r"`eps` must be a finite float >= 1\.17549435"):
        kernel_weights(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), eps=eps)


def test_smallest_kernel_eps_with_exact_duplicates_gives_finite_weights(data):
    # five exact matches at the smallest eps: 5/eps overflows float32, the weights must not
    weights = kernel_weights(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), MIN_KERNEL_EPS)
    torch.testing.assert_close(weights, torch.full((2, 5), 0.2))
    x, y, _, _ = data
    torch.manual_seed(0)
    model, cb = TinyClassifier(), MbPA(k=8, kernel_eps=MIN_KERNEL_EPS, **ADAPT)
    xx, yy = torch.cat([x[:8]] * 5), torch.cat([y[:8]] * 5)  # every memory five times
    cb.populate(model, loader(xx, yy))
    out = torch.cat(trainer(callbacks=[cb]).predict(model, loader(x[:8], y[:8])))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_logits(model, cb, x[:8]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------- 5. float64 model beyond float32 range


def test_float64_query_beyond_float32_keeps_base_prediction_with_a_warning(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model, cb = TinyClassifier().double(), MbPA(k=4, **ADAPT)
    trainer(callbacks=[cb], precision="64-true").fit(model, loader(x.double(), y))
    before = params(model)
    queries = xt.double().clone()
    queries[3] = 1e300  # finite in float64; its head input is beyond float32
    predict = trainer(callbacks=[cb], precision="64-true")
    with pytest.warns(UserWarning, match=r"1 of 16 predict queries .*beyond the float32 range"):
        out = torch.cat(predict.predict(model, loader(queries, yt)))
    with torch.no_grad():
        base = model(queries)
    assert torch.equal(out[3], base[3])
    others = torch.arange(len(xt)) != 3
    adapted = torch.cat(predict.predict(model, loader(xt.double()[others], yt[others])))
    torch.testing.assert_close(out[others], adapted)  # the other queries are adapted as usual
    assert not torch.equal(out[others], base[others])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
