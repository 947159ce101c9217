"""Property-based tests: whatever batch a user hands MbPA, and whatever finite numbers.

1. Batch structures (tuples, lists, dicts, NamedTuples, dataclasses, plain objects with
   attributes or ``__slots__``, nested inputs; label names, dtypes, shapes and values;
   ``label_key`` given or not): either the memory holds exactly the true labels (and the head
   inputs of their rows), or a ``MisconfigurationException``/``ValueError`` names what was
   wrong, with nothing written and no hook left on the model. The expected outcome comes from
   an independent oracle written from the documented rules, not from the library.
2. Head inputs over the whole finite float32/float64 range: the predictions are finite (where
   the model's own are), or the queries keep the base prediction with a warning that says why.

Seeded (``derandomize``) and small, so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa import MbPA, kernel_weights, local_adapt
from tests.helpers import TinyClassifier, loader, trainer
from tests.test_reliability import assert_memory_is, assert_no_hooks, memory_state

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LABEL_NAMES = ("y", "label", "labels", "target", "targets")  # the documented defaults
NUM_CLASSES = 4
ROWS = 6


# ----------------------------------------------------------------- the batch containers


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Record:
    first: Any
    second: Any


class Plain:
    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second


class Slotted:
    __slots__ = ("first", "second")

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second


def renamed(cls: type, first: str, second: str) -> type:
    """``cls`` with its two fields called ``first`` and ``second`` (the label's name varies)."""
    if cls is Pair:
        return NamedTuple("Batch", [(first, Any), (second, Any)])  # type: ignore[misc]
    if cls is Record:
        return dataclasses.make_dataclass("Batch", [first, second])
    if cls is Slotted:

        def init(self, a, b):
            setattr(self, first, a)
            setattr(self, second, b)

        return type("Batch", (), {"__slots__": (first, second), "__init__": init})

    def init_plain(self, a, b):
        setattr(self, first, a)
        setattr(self, second, b)

    return type("Batch", (), {"__init__": init_plain})


def first_feature_tensor(inputs: Any) -> Tensor | None:
    """The model input: the first float ``[N, 8]`` tensor anywhere in ``inputs``."""
    if isinstance(inputs, Tensor):
        ok = inputs.is_floating_point() and inputs.dim() == 2 and inputs.shape[-1] == 8
        return inputs if ok else None
    if isinstance(inputs, dict):
        children: list[Any] = list(inputs.values())
    elif isinstance(inputs, (list, tuple)):
        children = list(inputs)
    elif dataclasses.is_dataclass(inputs):
        children = [getattr(inputs, f.name) for f in dataclasses.fields(inputs)]
    elif hasattr(inputs, "__slots__"):
        children = [getattr(inputs, name) for name in type(inputs).__slots__]
    elif hasattr(inputs, "__dict__"):
        children = list(vars(inputs).values())
    else:
        return None
    for child in children:
        found = first_feature_tensor(child)
        if found is not None:
            return found
    return None


class AnyBatch(TinyClassifier):
    """Takes its features from wherever they are in the model input (a tensor, or nested)."""

    def forward(self, inputs: Any) -> Tensor:
        features = first_feature_tensor(inputs)
        if features is None:  # what a user's model does with the labels as its input
            raise ValueError(f"the model found no features in its input {inputs!r}")
        return self.head(self.encoder(features))

    def training_step(self, batch, batch_idx):
        return self(batch).sum()


# ------------------------------------------------------------------ generated batches


@st.composite
def labelled_batches(draw):
    """``(batch, label_key, features, labels, expected)``: ``expected`` is ``"ok"`` or
    ``(exception type, regex the message must match)``, from the documented rules."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    features = torch.randn(ROWS, 8, generator=g)
    kind = draw(
        st.sampled_from(["tuple", "list", "dict", "namedtuple", "dataclass", "plain", "slots"])
    )
    dtype = draw(
        st.sampled_from(
            [
                torch.int64,
                torch.int32,
                torch.int16,
                torch.uint8,
                torch.float32,
                torch.float64,
                torch.bool,
            ]
        )
    )
    shape = draw(st.sampled_from(["flat", "column", "wide", "pylist"]))
    values_kind = draw(
        st.sampled_from(["ok", "ok", "ok", "ignored", "too_high", "negative", "fraction"])
    )
    values = torch.randint(0, NUM_CLASSES, (ROWS,), generator=g)
    if values_kind == "ignored":
        values[draw(st.integers(0, ROWS - 1))] = -100
    elif values_kind == "too_high":
        values[draw(st.integers(0, ROWS - 1))] = NUM_CLASSES + draw(st.integers(0, 5))
    elif values_kind == "negative":
        values[draw(st.integers(0, ROWS - 1))] = -draw(st.integers(1, 99))
    if dtype == torch.uint8 and values_kind in ("ignored", "negative"):
        values_kind = "ok"
        values = values.clamp(min=0)
    if dtype == torch.bool:
        values = values.clamp(0, 1)
        values_kind = "ok"
    labels = values.to(dtype)
    if values_kind == "fraction":
        labels = values.to(torch.float32) + 0.5
        dtype = torch.float32
    if shape == "column":
        stored_labels: Any = labels[:, None]
    elif shape == "wide":
        stored_labels = torch.stack([labels, labels], 1)
    elif shape == "pylist":
        stored_labels = labels.tolist()
    else:
        stored_labels = labels
    nested = draw(st.booleans())
    inputs: Any = {"image": features, "mask": torch.ones(ROWS, 3)} if nested else features

    # -------- where the labels are, and the label_key the user gives
    expected: Any = "ok"
    if kind in ("tuple", "list"):
        position = draw(st.sampled_from([0, 1, 2]))
        items: list[Any] = [inputs, torch.zeros(ROWS, 2)]
        items.insert(position, stored_labels)
        batch: Any = tuple(items) if kind == "tuple" else items
        key_choice = draw(st.sampled_from(["none", "position", "negative", "name"]))
        label_key: Any = {
            "none": None,
            "position": position,
            "negative": position - 3,
            "name": "y",
        }[key_choice]
        if key_choice == "name":
            expected = (MisconfigurationException, r"label_key='y'.*no such item")
        elif key_choice == "none" and position != 1:
            # the second element is taken as the labels: here it is not integer class labels
            expected = "wrong"
    else:
        name = draw(st.sampled_from(["y", "Y", "label", "Labels", "target", "TARGETS", "classes"]))
        other = draw(st.sampled_from(["x", "inputs", "features"]))
        label_first = draw(st.booleans())
        if kind == "dict":
            pairs = [(name, stored_labels), (other, inputs)]
            batch = dict(pairs if label_first else pairs[::-1])
        else:
            cls = {"namedtuple": Pair, "dataclass": Record, "plain": Plain, "slots": Slotted}[kind]
            names = (name, other) if label_first else (other, name)
            args = (stored_labels, inputs) if label_first else (inputs, stored_labels)
            batch = renamed(cls, *names)(*args)
        key_choice = draw(st.sampled_from(["none", "name", "wrong"]))
        label_key = {"none": None, "name": name, "wrong": "nope"}[key_choice]
        if key_choice == "wrong":
            expected = (MisconfigurationException, r"label_key='nope'.*no such item")
        elif key_choice == "none" and name.lower() not in LABEL_NAMES:
            expected = (MisconfigurationException, r"cannot find labels.*`label_key=")
    if expected == "ok":
        if dtype == torch.bool:
            expected = (ValueError, r"integer class labels.*torch\.bool.*`label_key=")
        elif values_kind == "fraction":
            expected = (ValueError, r"integer class labels; got non-integral.*`label_key=")
        elif shape == "wide":
            expected = (MisconfigurationException, r"labels of the .* do not match the inputs")
        elif values_kind in ("too_high", "negative"):
            expected = (ValueError, r"must be class indices in \[0, 4\).*or -100")
    return batch, label_key, features, values, expected


@SETTINGS
@given(case=labelled_batches())
def test_any_batch_structure_writes_exactly_its_labels_or_names_the_problem(case):
    batch, label_key, features, values, expected = case
    model = AnyBatch()
    cb = MbPA(label_key=label_key, k=2)
    cb.memory.add(torch.randn(3, 16), torch.tensor([0, 1, 2]))  # something to keep intact
    before = memory_state(cb)
    if expected == "ok":
        assert cb.populate(model, [batch]) == int((values != -100).sum())
        keep = values != -100
        assert torch.equal(cb.memory.values, torch.cat([before["values"], values[keep]]))
        with torch.no_grad():
            keys = model.encoder(features)[keep]
        assert torch.equal(cb.memory.keys[3:], keys)
    elif expected == "wrong":  # the labels were looked for where the documented rule says
        with pytest.raises((MisconfigurationException, ValueError)) as info:
            cb.populate(model, [batch])
        assert "label" in str(info.value) or "features" in str(info.value)
        assert_memory_is(cb, before)
    else:
        error, pattern = expected
        with pytest.raises(error, match=pattern):
            cb.populate(model, [batch])
        assert_memory_is(cb, before)
    assert_no_hooks(model)


@settings(SETTINGS, max_examples=6)
@given(case=labelled_batches())
def test_any_batch_structure_in_fit_writes_exactly_its_labels_or_names_the_problem(case):
    batch, label_key, _, values, expected = case
    if expected == "wrong":
        return  # covered by the populate property; fit would also refuse
    model = AnyBatch()
    cb = MbPA(label_key=label_key, k=2)
    fit = trainer(callbacks=[cb], max_steps=1)
    data = torch.utils.data.DataLoader([batch], batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own (no val loader, batch size guesses)
        if expected == "ok":
            fit.fit(model, data)
            assert torch.equal(cb.memory.values, values[values != -100])
        else:
            error, pattern = expected
            with pytest.raises(error, match=pattern):
                fit.fit(model, data)
            assert len(cb.memory) == 0
    assert_no_hooks(model)


# --------------------------------------------------------- the whole finite float range


def magnitudes(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Scales from the smallest subnormal to near the largest finite value of ``dtype``."""
    info = torch.finfo(dtype)
    low, high = math.log10(info.smallest_normal) - 7, math.log10(info.max) - 1
    return st.floats(low, high).map(lambda e: 10.0**e)


@settings(SETTINGS, max_examples=25)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_local_adapt_is_finite_or_falls_back_with_a_warning(dtype, data, duplicates, seed):
    scale = data.draw(st.one_of(st.sampled_from([1e19, 1e20, 1e-44]), magnitudes(dtype)))
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(8, 3).to(dtype)
    keys = (torch.randn(5, 4, 8, generator=g, dtype=dtype) * scale).clamp(
        -torch.finfo(dtype).max, torch.finfo(dtype).max
    )
    queries = keys[:, 0].clone() if duplicates else torch.randn(5, 8, generator=g, dtype=dtype)
    # distances in float64 from the difference (finite for finite float32 inputs), as a user
    # with their own retrieval would compute them
    distances = ((queries[:, None].double() - keys.double()) ** 2).sum(-1)
    mask = torch.isfinite(distances)
    weights = kernel_weights(torch.where(mask, distances, 0.0), mask)
    assert torch.isfinite(weights).all()
    labels = torch.randint(0, 3, (5, 4), generator=g)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = local_adapt(head, queries, keys, labels, weights.to(dtype), 3, 0.1, 0.0)
    with torch.no_grad():
        base = head(queries)
    finite_base = torch.isfinite(base).all(-1)
    assert torch.isfinite(out[finite_base]).all()
    messages = [str(w.message) for w in record]
    for message in messages:
        assert "overflowed" in message and "keep the head's base outputs" in message
    if messages:  # a fallback happened: those queries hold their base outputs exactly
        assert (out == base).all(-1).any()


class Scaled(TinyClassifier):
    """The head sees the encoder's output times ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x) * self.scale)


#: From the smallest float32 subnormal to near the largest float64 (beyond float32's range a
#: float32 model's head inputs are infinite: its own outputs are, too).
SCALES = st.floats(-45.0, 307.0).map(lambda e: 10.0**e)


@settings(SETTINGS, max_examples=8)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), scale=SCALES)
@example(dtype=torch.float32, scale=1e19)  # squared norms at the float32 limit
@example(dtype=torch.float32, scale=1e20)  # beyond it: nothing can be ranked
@example(dtype=torch.float64, scale=1e30)
@example(dtype=torch.float64, scale=1e300)  # beyond float32: the writes are refused
@example(dtype=torch.float32, scale=1e-44)  # subnormal head inputs
def test_predict_over_the_whole_float_range_is_finite_or_warns(dtype, scale):
    torch.manual_seed(0)
    x = torch.randn(24, 8, dtype=dtype)
    model = Scaled(scale).to(dtype)
    cb = MbPA(k=4, adaptation_steps=3, adaptation_lr=0.5)
    queries = torch.cat([x[:4], torch.randn(4, 8, dtype=dtype)])  # duplicates and new points
    precision = "64-true" if dtype == torch.float64 else "32-true"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cb.populate(model, loader(x, torch.arange(24) % 4))
        out = torch.cat(
            trainer(callbacks=[cb], precision=precision).predict(
                model, loader(queries, torch.zeros(8, dtype=torch.long))
            )
        )
    with torch.no_grad():
        base = model(queries)
        head_inputs = model.encoder(queries) * scale
    finite_base = torch.isfinite(base).all(-1)
    assert torch.isfinite(out[finite_base]).all()
    ours = [str(w.message) for w in record if str(w.message).startswith(("MbPA", "local_adapt"))]
    for message in ours:  # each warning says why and what to do
        assert any(
            why in message for why in ("overflow", "float32", "NaN or infinite", "memory is empty")
        ), message
    if len(cb.memory) > 0:
        # independent reference: each query's squared distance to its nearest memory, in float64
        # from the stored float32 keys; far beyond float32 it cannot be ranked there
        queries32 = head_inputs.float().double()
        nearest = torch.cdist(queries32, cb.memory.keys.double()).min(1).values ** 2
        far = torch.isfinite(queries32).all(-1) & (nearest > 4 * torch.finfo(torch.float32).max)
        if bool(far.any()):
            assert any("overflow" in m for m in ours), ours
            assert torch.equal(out[far], base[far])
    assert_no_hooks(model)
