"""One adaptation step at vocabulary scale (``lightning_mbpa._vocab_form``) against the per-query
reference :func:`~lightning_mbpa.local_adapt`, alone and through the callback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_mbpa._adapter as adapter_module
from lightning_mbpa import EpisodicMemory, MbPA, kernel_weights, local_adapt
from lightning_mbpa._vocab_form import SlotSoftmaxCache, one_step_outputs
from tests.test_mixture import StatefulLM, TokenWindows, _stream, _trainer

TOL = dict(rtol=1e-5, atol=1e-5)


def _reference(head, q, nb, w, lr):
    """Each query adapted alone (B = 1), one step from the trained head."""
    rows = [
        local_adapt(
            head,
            q[i : i + 1],
            nb.keys[i : i + 1],
            nb.values[i : i + 1],
            w[i : i + 1],
            steps=1,
            lr=lr,
            beta=0.3,
        )
        for i in range(q.shape[0])
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("filled", [3, 80])  # fewer memories than K: masked neighbours
def test_one_step_matches_the_per_query_reference(bias: bool, filled: int) -> None:
    torch.manual_seed(0)
    classes, dim, k = 40, 8, 5
    head = nn.Linear(dim, classes, bias=bias)
    memory = EpisodicMemory(capacity=100)
    keys = torch.randn(filled, dim)
    keys[1] = keys[0]  # a duplicate key
    memory.add(keys, torch.randint(0, classes, (filled,)))
    q = torch.randn(24, dim)
    q[3] = keys[2]  # an exact match
    nb = memory.search(q, k)
    w = kernel_weights(nb.distances, nb.mask)
    w[5] = 0  # a query without neighbours keeps its base outputs bit for bit
    with torch.no_grad():
        base = head(q)
    expected = _reference(head, q, nb, w, lr=0.7)
    for cache, memory_keys in (
        (None, None),
        (None, memory.keys),
        (SlotSoftmaxCache(), memory.keys),
    ):
        out = one_step_outputs(
            head, q, base, nb.keys, nb.values, w, nb.indices, 0.7, cache, memory_keys
        )
        torch.testing.assert_close(out, expected, **TOL)
        assert torch.equal(out[5], base[5])


@pytest.mark.parametrize(
    ("cached_rows", "chunk_rows"),
    [
        (40, 512),  # eviction every batch
        (40, 5),  # softmax rows computed a few at a time, offered logits within chunks
        (10, 3),  # no batch fits: a reused batch table of changing size
    ],
)
def test_slot_cache_stays_exact_while_the_memory_changes(
    cached_rows: int, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small cache over a FIFO memory that each batch overwrites, a key update, and the test
    history served from the offered logits: every batch matches the reference, and the cache
    did save work."""
    monkeypatch.setattr("lightning_mbpa._vocab_form.SOFTMAX_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(1)
    classes, dim, k, batch = 30, 6, 4, 16
    head = nn.Linear(dim, classes)
    memory = EpisodicMemory(capacity=48)
    memory.add(torch.randn(48, dim), torch.randint(0, classes, (48,)))
    cache = SlotSoftmaxCache(budget_bytes=4 * (classes + dim) * cached_rows)
    lookups = 0
    for step in range(8):
        q = torch.randn(batch, dim)
        y = torch.randint(0, classes, (batch,))
        nb = memory.search(q, k)
        w = kernel_weights(nb.distances, nb.mask)
        with torch.no_grad():
            base = head(q)
        out = one_step_outputs(
            head, q, base, nb.keys, nb.values, w, nb.indices, 0.5, cache, memory.keys
        )
        torch.testing.assert_close(out, _reference(head, q, nb, w, lr=0.5), **TOL)
        lookups += int(torch.unique(nb.indices).numel())
        cache.offer(q, base)
        memory.add(q, y)  # the test history: the slots just read are overwritten
        if step == 4:
            memory.update_keys(torch.tensor([0, 7]), torch.randn(2, dim))
    assert cache.reused > 0  # the history came from the offered logits
    if cached_rows > batch:
        assert cache.computed + cache.reused < lookups  # rows were served from the cache
    else:
        assert cache.computed + cache.reused == lookups and cache.probs is None


def test_changed_head_weights_are_never_served_from_the_cache() -> None:
    torch.manual_seed(2)
    head = nn.Linear(5, 20)
    memory = EpisodicMemory(capacity=30)
    memory.add(torch.randn(30, 5), torch.randint(0, 20, (30,)))
    q = torch.randn(6, 5)
    nb = memory.search(q, 4)
    w = kernel_weights(nb.distances, nb.mask)
    cache = SlotSoftmaxCache()
    for _ in range(2):
        with torch.no_grad():
            base = head(q)
        out = one_step_outputs(
            head, q, base, nb.keys, nb.values, w, nb.indices, 0.5, cache, memory.keys
        )
        torch.testing.assert_close(out, _reference(head, q, nb, w, lr=0.5), **TOL)
        with torch.no_grad():
            head.weight.mul_(2.0)


def _run(model, loader, mbpa) -> list[torch.Tensor]:
    _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    return [s.clone() for s in model.seen]


@pytest.mark.parametrize(
    "setting",
    [
        # the test history only (neural-cache memory), MbPA alone and mixed
        dict(write_on_fit=False, online_writes=True, memory_size=40),
        dict(
            write_on_fit=False,
            online_writes=True,
            memory_size=40,
            base_weight=0.2,
            memory_weight=0.3,
        ),
        # the training datastore plus the test history, three-way mixture
        dict(
            online_writes=True,
            memory_size=150,
            base_weight=0.1,
            memory_weight=0.2,
            memory_temperature=3.0,
        ),
    ],
)
def test_callback_fast_path_matches_the_general_path(
    setting: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same stateful test loop through the callback with the vocabulary-scale path forced on
    (at 12 words) and off: the same outputs for every token, with online writes (no leak: the
    general path writes after predicting, and the outputs agree)."""
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(241, seed=2), 6, ((1, 2), (5, 0))), batch_size=4)
    args = dict(head="decoder", k=6, adaptation_steps=1, adaptation_lr=0.5, **setting)
    general_cb, fast_cb = MbPA(**args), MbPA(**args)
    if setting.get("write_on_fit", True):
        _trainer(max_epochs=1, callbacks=[general_cb]).fit(model, train)
        fast_cb.memory.add(general_cb.memory.keys.clone(), general_cb.memory.values.clone())
    model.eval()
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    general = _run(model, test, general_cb)
    calls = []
    real = adapter_module.one_step_outputs

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 2)
    monkeypatch.setattr(adapter_module, "one_step_outputs", spy)
    fast = _run(model, test, fast_cb)
    assert len(calls) >= len(test) - 1  # the fast path ran (not for the first, empty-memory batch)
    for a, b in zip(fast, general, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    if not setting.get("write_on_fit", True):
        assert not torch.equal(fast[-1], fast[0])  # the history moved the outputs


def test_logit_adjusted_loss_keeps_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-step shortcut assumes plain cross-entropy: with ``adaptation_loss="logit_adjusted"``
    the neighbours' softmax includes the memory's class prior, so the general path must run
    (outputs equal to it, the shortcut never called)."""
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(241, seed=2), 6, ((1, 2), (5, 0))), batch_size=4)
    args = dict(
        head="decoder",
        k=6,
        adaptation_steps=1,
        adaptation_lr=0.5,
        memory_size=150,
        adaptation_loss="logit_adjusted",
    )
    general_cb, shortcut_cb = MbPA(**args), MbPA(**args)
    _trainer(max_epochs=1, callbacks=[general_cb]).fit(model, train)
    shortcut_cb.memory.add(general_cb.memory.keys.clone(), general_cb.memory.values.clone())
    model.eval()
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    general = _run(model, test, general_cb)

    def refuse(*a, **kw):
        raise AssertionError("the one-step shortcut ran with the logit-adjusted loss")

    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 2)
    monkeypatch.setattr(adapter_module, "one_step_outputs", refuse)
    shortcut = _run(model, test, shortcut_cb)
    for a, b in zip(shortcut, general, strict=True):
        assert torch.equal(a, b)
    plain_cb = MbPA(**{**args, "adaptation_loss": "cross_entropy"})
    plain_cb.memory.add(general_cb.memory.keys.clone(), general_cb.memory.values.clone())
    monkeypatch.setattr(adapter_module, "VOCAB_MIN_CLASSES", 10**9)
    plain = _run(model, test, plain_cb)
    assert not all(torch.equal(a, b) for a, b in zip(plain, general, strict=True))
