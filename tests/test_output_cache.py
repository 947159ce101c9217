"""``MbPA(output_cache_bytes=...)``: one validated budget for the caches of the trained head's
outputs on memory slots. Outputs do not depend on it; with 0 nothing is cached.

Whether something was cached is read from the adapter's internals (``cached_slots`` of the
general path's logits table, the ``SlotSoftmaxCache`` of the vocabulary-scale path): the budget
only changes speed and memory, which a test cannot observe reliably otherwise.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import lightning_mbpa._adapter as adapter_module
from lightning_mbpa import MbPA, kernel_weights, local_adapt
from lightning_mbpa._vocab_form import SLOT_CACHE_BYTES
from tests.helpers import TinyClassifier, blobs, loader, trainer
from tests.test_mixture import StatefulLM, TokenWindows, _stream, _trainer

CLASSES, HIDDEN, K = 100, 16, 6
ADAPT = dict(k=K, adaptation_steps=3, adaptation_lr=0.5, beta=0.1)


class CacheProbe(Callback):
    """After every test/predict batch: the general path's cached slots and the
    vocabulary-scale cache's state (both are dropped when the stage ends)."""

    def __init__(self, mbpa: MbPA) -> None:
        self.mbpa = mbpa
        self.cached_slots: list[int] = []
        self.softmax_rows: list[int] = []
        self.counters: tuple[int, int] = (0, 0)

    def _probe(self) -> None:
        adapter = self.mbpa._adapter
        self.cached_slots.append(int(adapter.cached_slots.sum()))
        cache = adapter._slot_softmax
        held = int((cache.slot_of_row >= 0).sum()) if cache.probs is not None else 0
        self.softmax_rows.append(held)
        self.counters = (cache.computed, cache.reused)

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        self._probe()

    def on_test_batch_end(self, *args, **kwargs) -> None:
        self._probe()


@pytest.mark.parametrize(
    "value",
    [-1, 1.5, 2.0**31, True, False, "2GiB", None, float("inf")],
)
def test_bad_budgets_are_refused_naming_the_argument(value) -> None:
    with pytest.raises(MisconfigurationException, match=r"`output_cache_bytes`=.*an int >= 0"):
        MbPA(output_cache_bytes=value)


def test_good_budgets_are_kept_as_ints() -> None:
    assert MbPA().output_cache_bytes == SLOT_CACHE_BYTES == 2 * 2**30
    assert MbPA(output_cache_bytes=0).output_cache_bytes == 0
    kept = MbPA(output_cache_bytes=np.int64(2**33)).output_cache_bytes
    assert kept == 2**33 and type(kept) is int


def _general_setup():
    x, y = blobs(240, dim=8, num_classes=CLASSES, seed=0)
    model = TinyClassifier(num_classes=CLASSES)
    model.eval()
    queries_x = blobs(64, dim=8, num_classes=CLASSES, seed=1)[0]
    return model, loader(x, y), loader(queries_x, torch.zeros(64, dtype=torch.long))


def _reference(model, mbpa: MbPA, queries_x: torch.Tensor) -> torch.Tensor:
    """``local_adapt`` on the memory's neighbours, with no cached outputs."""
    with torch.no_grad():
        q = model.encoder(queries_x)
        base = model.head(q)
    nb = mbpa.memory.search(q, K)
    w = kernel_weights(nb.distances, nb.mask, mbpa.kernel_eps)
    return local_adapt(
        model.head, q, nb.keys, nb.values, w, steps=3, lr=0.5, beta=0.1, base_outputs=base
    )


def test_general_path_outputs_do_not_depend_on_the_budget() -> None:
    """A C = 100 linear head on 240 memories: the logits table is 240·100·4 bytes. A budget one
    byte short caches nothing, the exact size and the default cache the slots retrieved; the
    predictions are the same and equal the uncached reference."""
    model, train, test = _general_setup()
    table = 240 * CLASSES * 4
    outputs, cached = {}, {}
    for budget in (0, 1000, table - 1, table, SLOT_CACHE_BYTES):
        mbpa = MbPA(output_cache_bytes=budget, **ADAPT)
        mbpa.populate(model, train)
        probe = CacheProbe(mbpa)
        predictions = trainer(callbacks=[mbpa, probe]).predict(model, test)
        outputs[budget] = torch.cat(predictions)
        cached[budget] = probe.cached_slots
        assert mbpa._adapter.settings.output_cache_bytes == budget
    for budget in (0, 1000, table - 1):
        assert cached[budget] == [0] * 4, budget  # nothing cached, batch after batch
    for budget in (table, SLOT_CACHE_BYTES):
        assert cached[budget][0] > 0 and cached[budget][-1] > cached[budget][0], budget
    queries_x = torch.cat([batch[0] for batch in test])
    expected = _reference(model, mbpa, queries_x)
    for budget, got in outputs.items():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=str(budget))
        torch.testing.assert_close(got, outputs[0], rtol=1e-6, atol=1e-6, msg=str(budget))


def _run_lm(model, test, mbpa: MbPA) -> tuple[list[torch.Tensor], CacheProbe]:
    probe = CacheProbe(mbpa)
    _trainer(callbacks=[mbpa, probe]).test(model, test, verbose=False)
    return [s.clone() for s in model.seen], probe


def test_vocabulary_scale_path_outputs_do_not_depend_on_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One step at "vocabulary scale" (forced on at 12 words) with the training datastore plus
    the test history: budgets 0, 10 rows and the default give the general path's outputs; 0
    keeps no softmax row and computes every lookup, 10 rows keeps at most 10, the default
    serves repeated slots from the cache (fewer rows computed)."""
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(241, seed=2), 6, ((1, 2), (5, 0))), batch_size=4)
    args = dict(head="decoder", k=6, adaptation_steps=1, adaptation_lr=0.5, online_writes=True)
    fitted = MbPA(memory_size=150, **args)
    _trainer(max_epochs=1, callbacks=[fitted]).fit(model, train)
    model.eval()

    def callback(budget: int) -> MbPA:
        mbpa = MbPA(memory_size=150, output_cache_bytes=budget, **args)
        mbpa.memory.add(fitted.memory.keys.clone(), fitted.memory.values.clone())
        return mbpa

    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    general, _ = _run_lm(model, test, callback(SLOT_CACHE_BYTES))
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 2)
    row = 4 * (12 + 16)  # a softmax row and its key
    runs = {budget: _run_lm(model, test, callback(budget)) for budget in (0, 10 * row, 2**31)}
    for budget, (outputs, _) in runs.items():
        for a, b in zip(outputs, general, strict=True):
            np.testing.assert_allclose(
                a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=str(budget)
            )
    none, tiny, large = (runs[b][1] for b in (0, 10 * row, 2**31))
    assert none.softmax_rows == [0] * len(test)  # nothing kept between batches
    assert max(tiny.softmax_rows) <= 10 and max(large.softmax_rows) > 10
    assert none.cached_slots == tiny.cached_slots == large.cached_slots == [0] * len(test)
    assert sum(large.counters) < sum(tiny.counters) <= sum(none.counters)
    assert none.counters[0] > 0


def test_one_cache_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same callback switched between the two paths within its life: taking one path
    empties the other's cache, so the one budget bounds what is held."""
    model, train, test = _general_setup()
    mbpa = MbPA(adaptation_steps=1, adaptation_lr=0.5, k=K)
    mbpa.populate(model, train)
    probe = CacheProbe(mbpa)
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    trainer(callbacks=[mbpa, probe]).predict(model, test)
    assert probe.cached_slots[-1] > 0 and probe.softmax_rows[-1] == 0
    adapter = mbpa._adapter
    adapter.start("predict", adapter.settings, lambda: mbpa.memory)  # keep the stage open
    x = next(iter(test))[0]
    with torch.no_grad():
        model(x)  # general path: the logits table
    assert int(adapter.cached_slots.sum()) > 0
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 2)
    with torch.no_grad():
        model(x)  # vocabulary-scale path: the softmax rows, the logits table dropped
    assert adapter._slot_softmax.probs is not None and adapter.cached_slots.numel() == 0
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    with torch.no_grad():
        model(x)
    assert adapter._slot_softmax.probs is None and int(adapter.cached_slots.sum()) > 0
    adapter.stop()


def test_the_budget_survives_pickling_and_reaches_the_adapter() -> None:
    model, train, test = _general_setup()
    mbpa = MbPA(output_cache_bytes=0, **ADAPT)
    mbpa.populate(model, train)
    clone = pickle.loads(pickle.dumps(mbpa))
    assert clone.output_cache_bytes == 0
    probe = CacheProbe(clone)
    trainer(callbacks=[clone, probe]).predict(model, test)
    assert clone._adapter.settings.output_cache_bytes == 0
    assert probe.cached_slots == [0] * 4


def test_the_budget_is_set_from_yaml_and_the_command_line() -> None:
    """As LightningCLI builds the callback (jsonargparse, from the typed signature)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MbPA, "mbpa")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    config = parser.parse_string("mbpa:\n  k: 4\n  output_cache_bytes: 8589934592\n")
    assert instantiate(config).mbpa.output_cache_bytes == 8 * 2**30
    config = parser.parse_args(["--mbpa.output_cache_bytes", "0"])
    assert instantiate(config).mbpa.output_cache_bytes == 0
    assert parser.get_defaults().mbpa.output_cache_bytes == SLOT_CACHE_BYTES
    with pytest.raises(BaseException):  # noqa: B017 (jsonargparse's parse error, or exit)
        parser.parse_args(["--mbpa.output_cache_bytes", "2GiB"])
