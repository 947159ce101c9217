"""Output mixtures (``base_weight``, ``memory_weight``, ``memory_temperature``) and the memory of
the test history (``write_on_fit=False``): the neural cache and kNN-LM as special cases of MbPA.

Every number is checked against a float64 numpy reference (brute-force neighbours, the mixture
written out as a sum of probabilities).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mbpa import MbPA, kernel_weights, local_adapt
from lightning_mbpa.mixture import LOG_FLOOR, mix_log_probs, neighbour_weights

# ---------------------------------------------------------------------------- numpy reference


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_weights(d: np.ndarray, mask: np.ndarray, eps: float, tau: float | None) -> np.ndarray:
    d = np.maximum(d.astype(np.float64), 0)
    w = np.zeros_like(d)
    for b in range(d.shape[0]):
        valid = mask[b]
        if not valid.any():
            continue
        if tau is None:
            raw = 1.0 / (eps + d[b, valid])
        else:
            raw = np.exp(-(d[b, valid] - d[b, valid].min()) / tau)
        w[b, valid] = raw / raw.sum()
    return w


def np_mixture(
    base: np.ndarray,
    adapted: np.ndarray | None,
    w: np.ndarray | None,
    y: np.ndarray | None,
    lb: float,
    lm: float,
) -> np.ndarray:
    """``log(λa·p_adapted + λb·p_base + λm·p_memory)`` with p_base for rows without neighbours."""
    la = 1.0 - lb - lm
    la = 0.0 if la < 1e-9 else la  # round-off of sums such as 1 − 0.9 − 0.1
    pb = np_softmax(base.astype(np.float64))
    pa = pb if adapted is None else np_softmax(adapted.astype(np.float64))
    pm = pb.copy()
    if w is not None:
        for b in range(base.shape[0]):
            if w[b].sum() > 0:
                pm[b] = 0
                np.add.at(pm[b], y[b], w[b])
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(la * pa + lb * pb + lm * pm), LOG_FLOOR)


# ---------------------------------------------------------------------------- the pure functions


@pytest.mark.parametrize("tau", [None, 0.7])
@pytest.mark.parametrize("lb,lm", [(0.3, 0.5), (0.0, 1.0), (1.0, 0.0), (0.25, 0.0), (0.0, 0.4)])
def test_mixture_matches_numpy(tau: float | None, lb: float, lm: float) -> None:
    g = torch.Generator().manual_seed(0)
    B, K, C = 7, 5, 6
    base, adapted = torch.randn(B, C, generator=g) * 3, torch.randn(B, C, generator=g) * 3
    d = torch.rand(B, K, generator=g) * 4
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[2] = False  # a query without neighbours: its memory part is p_base
    y = torch.randint(0, C, (B, K), generator=g)
    w = neighbour_weights(d, mask, kernel_eps=0.1, temperature=tau)
    expected_w = np_weights(d.numpy(), mask.numpy(), 0.1, tau)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5, atol=1e-7)
    out = mix_log_probs(
        base,
        base_weight=lb,
        memory_weight=lm,
        adapted_logits=adapted,
        memory_weights=w,
        memory_labels=y,
    )
    expected = np_mixture(base.numpy(), adapted.numpy(), expected_w, y.numpy(), lb, lm)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(2, 12)),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    lb=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    lm=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    adapted=st.booleans(),
    empty_rows=st.booleans(),
)
def test_mixture_matches_numpy_on_any_labels_and_extreme_logits(
    seed: int,
    shape: tuple[int, int, int],
    scale: float,
    lb: float,
    lm: float,
    adapted: bool,
    empty_rows: bool,
) -> None:
    """Repeated neighbour labels (few classes), masked neighbours holding any label, rows
    without neighbours, logits from tiny to huge: the sparse memory update equals the dense
    reference."""
    if lb + lm > 1:
        lb = 1.0 - lm
    g = torch.Generator().manual_seed(seed)
    B, K, C = shape
    base = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    adapted_logits = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, K, generator=g) > 0.3
    if empty_rows:
        mask[0] = False
    y = torch.randint(0, C, (B, K), generator=g)
    w = neighbour_weights(torch.rand(B, K, generator=g, dtype=torch.float64), mask)
    out = mix_log_probs(
        base,
        base_weight=lb,
        memory_weight=lm,
        adapted_logits=adapted_logits if adapted else None,
        memory_weights=w,
        memory_labels=y,
    )
    expected = np_mixture(
        base.numpy(), adapted_logits.numpy() if adapted else None, w.numpy(), y.numpy(), lb, lm
    )
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lb,lm", [(0.3, 0.5), (0.0, 1.0), (1.0, 0.0), (0.0, 0.4), (0.2, 0.0)])
def test_mixture_gradients_match_finite_differences(lb: float, lm: float) -> None:
    """``mix_log_probs`` used in a loss: gradients to both logits (with repeated labels, masked
    neighbours and a row without neighbours) and to the neighbour weights, against autograd's
    finite differences."""
    g = torch.Generator().manual_seed(3)
    B, K, C = 4, 6, 5
    base = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    adapted = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(
        [[1, 1, 3, 1, 0, 4], [2, 2, 2, 2, 2, 2], [0, 1, 2, 3, 4, 0], [4, 3, 4, 3, 4, 3]]
    )
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 4:] = False  # masked neighbours, one with a label no real neighbour holds
    mask[3] = False  # a row without neighbours: its memory part is p_base
    w = neighbour_weights(torch.rand(B, K, generator=g, dtype=torch.float64), mask)

    def mixed(b: Tensor, a: Tensor) -> Tensor:
        return mix_log_probs(
            b, base_weight=lb, memory_weight=lm, adapted_logits=a, memory_weights=w, memory_labels=y
        )

    assert torch.autograd.gradcheck(mixed, (base, adapted))
    weights = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.1  # every neighbour real
    weights.requires_grad_(True)

    def by_weights(v: Tensor) -> Tensor:
        return mix_log_probs(
            base.detach(), base_weight=lb, memory_weight=lm, memory_weights=v, memory_labels=y
        )

    assert torch.autograd.gradcheck(by_weights, (weights,))


@pytest.mark.parametrize("k", [1, 1024])
def test_mixture_with_many_neighbours_matches_numpy(k: int) -> None:
    """kNN-LM's large K (labels sorted per row, not compared pairwise)."""
    g = torch.Generator().manual_seed(k)
    B, C = 3, 50
    base = torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, k), generator=g)
    w = neighbour_weights(torch.rand(B, k, generator=g, dtype=torch.float64), y >= 0)
    out = mix_log_probs(base, base_weight=0.7, memory_weight=0.3, memory_weights=w, memory_labels=y)
    expected = np_mixture(base.numpy(), None, w.numpy(), y.numpy(), 0.7, 0.3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_memory_only_gives_finite_floor_to_classes_without_mass() -> None:
    base = torch.zeros(2, 4)
    w = torch.tensor([[0.75, 0.25], [0.0, 0.0]])
    y = torch.tensor([[1, 3], [0, 0]])
    out = mix_log_probs(base, base_weight=0.0, memory_weight=1.0, memory_weights=w, memory_labels=y)
    assert torch.isfinite(out).all()
    assert out[0, 0] == out[0, 2] == LOG_FLOOR
    torch.testing.assert_close(out[0, [1, 3]], torch.tensor([0.75, 0.25]).log())
    torch.testing.assert_close(out[1], torch.full((4,), 0.25).log())  # no neighbours: p_base
    logits = out.clone().requires_grad_(True)
    loss = F.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_without_adapted_logits_the_adapted_part_is_the_base() -> None:
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    out = mix_log_probs(base, base_weight=0.2, memory_weight=0.0)
    torch.testing.assert_close(out, torch.log_softmax(base, -1))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"base_weight": -0.1}, "base_weight"),
        ({"base_weight": 1.5}, "base_weight"),
        ({"memory_weight": float("nan")}, "memory_weight"),
        ({"memory_weight": True}, "memory_weight"),
        ({"base_weight": 0.6, "memory_weight": 0.5}, "sum to 1.1"),
        ({"memory_temperature": 0.0}, "memory_temperature"),
        ({"memory_temperature": -1.0}, "memory_temperature"),
        ({"write_on_fit": "no"}, "write_on_fit"),
    ],
)
def test_bad_mixture_settings_are_refused(kwargs: dict, name: str) -> None:
    with pytest.raises(MisconfigurationException, match=name):
        MbPA(**kwargs)


def test_mix_log_probs_refuses_bad_weights() -> None:
    with pytest.raises(ValueError, match="memory_weight"):
        mix_log_probs(torch.zeros(1, 2), base_weight=0.5, memory_weight=0.7)
    with pytest.raises(ValueError, match="base_weight"):
        mix_log_probs(torch.zeros(1, 2), base_weight=-1.0, memory_weight=0.0)


# ---------------------------------------------------------------------------- a tiny LSTM LM


class TokenWindows(Dataset):
    """Consecutive ``[T]`` windows of one token stream, ``(x, y)`` with ``y`` the next tokens;
    the given positions of ``y`` are padded with -100."""

    def __init__(self, stream: Tensor, length: int, pad: tuple[tuple[int, int], ...] = ()):
        n = (stream.numel() - 1) // length
        self.x = stream[: n * length].view(n, length)
        self.y = stream[1 : n * length + 1].view(n, length).clone()
        for row, col in pad:
            self.y[row, col] = -100

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class StatefulLM(pl.LightningModule):
    """An LSTM language model knowing nothing of MbPA; its test loop carries ``hidden`` across
    batches (a stateful evaluation) and records the logits it sees."""

    def __init__(self, vocab: int = 12, dim: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, dim, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        self.perplexity = torchmetrics.text.Perplexity(ignore_index=-100)
        self.hidden: tuple[Tensor, Tensor] | None = None
        self.seen: list[Tensor] = []

    def features(self, x: Tensor, hidden=None):
        return self.lstm(self.embedding(x), hidden)

    def forward(self, x: Tensor, hidden=None):
        out, hidden = self.features(x, hidden)
        return self.decoder(out), hidden

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits, _ = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)

    def on_test_epoch_start(self) -> None:
        self.hidden, self.seen = None, []

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits, self.hidden = self(x, self.hidden)
        self.seen.append(logits.detach().clone())
        self.perplexity.update(logits, y)
        self.log("test/ppl", self.perplexity)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _stream(n: int, vocab: int = 12, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _reference_cache_run(
    model: StatefulLM,
    loader: DataLoader,
    *,
    k: int,
    capacity: int,
    lb: float,
    lm: float,
    eps: float = 1e-3,
    tau: float | None = None,
    initial: tuple[np.ndarray, np.ndarray] | None = None,
    online: bool = True,
) -> list[np.ndarray]:
    """The log-probabilities a stateful loop should see: brute-force neighbours among the
    memory (``initial``, then the test tokens written after each batch, FIFO), mixed in numpy."""
    keys, labels = initial if initial is not None else (np.zeros((0, 16)), np.zeros(0, np.int64))
    hidden, outputs = None, []
    with torch.no_grad():
        for x, y in loader:
            h, hidden = model.features(x, hidden)
            base = model.decoder(h)
            q = h.reshape(-1, h.shape[-1]).double().numpy()
            flat_base = base.reshape(-1, base.shape[-1]).numpy()
            n = keys.shape[0]
            kk = min(k, n)
            if kk:
                d = ((q[:, None, :] - keys[None].astype(np.float64)) ** 2).sum(-1)
                nearest = np.argsort(d, axis=1, kind="stable")[:, :kk]
                dk = np.take_along_axis(d, nearest, 1)
                w = np_weights(dk, np.ones_like(dk, bool), eps, tau)
                mixed = np_mixture(flat_base, None, w, labels[nearest], lb, lm)
            else:
                mixed = np_mixture(flat_base, None, None, None, lb, lm)
            outputs.append(mixed.reshape(*base.shape))
            if online:
                keep = y.reshape(-1).numpy() != -100
                keys = np.concatenate([keys, q[keep]])[-capacity:]
                labels = np.concatenate([labels, y.reshape(-1).numpy()[keep]])[-capacity:]
    return outputs


# ---------------------------------------------------------------------------- the callback


def test_neural_cache_on_a_stateful_lstm_matches_the_reference_with_padding() -> None:
    """write_on_fit=False + online_writes: the memory is the test history (FIFO, written after
    predicting), the stateful test loop runs unchanged, padded labels are never written."""
    torch.manual_seed(0)
    model = StatefulLM()
    pad = ((1, 4), (3, 0), (3, 1))
    loader = DataLoader(TokenWindows(_stream(241), 6, pad), batch_size=4)
    mbpa = MbPA(
        head="decoder",
        write_on_fit=False,
        online_writes=True,
        memory_size=50,
        k=4,
        base_weight=0.3,
        memory_weight=0.7,
        adaptation_steps=0,
    )
    _trainer(max_epochs=1, callbacks=[mbpa]).fit(model, loader)
    assert len(mbpa.memory) == 0  # write_on_fit=False: fit wrote nothing
    model.eval()
    expected = _reference_cache_run(model, loader, k=4, capacity=50, lb=0.3, lm=0.7)
    _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    assert len(model.seen) == len(expected) == 10
    for seen, ref in zip(model.seen, expected, strict=True):
        np.testing.assert_allclose(seen.numpy(), ref, rtol=1e-4, atol=1e-4)
    assert len(mbpa.memory) == 50  # the cache length
    # a second test run starts from an empty cache again: same outputs, no leak from run one
    _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    for seen, ref in zip(model.seen, expected, strict=True):
        np.testing.assert_allclose(seen.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_online_writes_never_leak_a_tokens_own_label() -> None:
    """Random tokens are unpredictable: a model that saw a token's own label (distance 0) before
    predicting it would reach a perplexity near 1."""
    torch.manual_seed(0)
    model = StatefulLM(vocab=12).eval()
    loader = DataLoader(TokenWindows(_stream(601), 6), batch_size=4)
    mbpa = MbPA(
        head="decoder",
        write_on_fit=False,
        online_writes=True,
        k=8,
        base_weight=0.1,
        memory_weight=0.9,
        adaptation_steps=0,
    )
    ppl = _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)[0]["test/ppl"]
    assert ppl > 6.0  # a leak gives about 1.1; the uniform distribution 12
    leaked = [  # the same reference, writing each batch *before* predicting it
        torch.log_softmax(torch.as_tensor(out), -1)
        for out in _reference_leaky(model, loader, k=8, lb=0.1, lm=0.9)
    ]
    ys = torch.cat([y.reshape(-1) for _, y in loader])
    leaky_ppl = math.exp(F.nll_loss(torch.cat([o.reshape(-1, 12) for o in leaked]), ys).item())
    assert leaky_ppl < 1.5


def _reference_leaky(model, loader, *, k, lb, lm):
    keys, labels, hidden, outputs = np.zeros((0, 16)), np.zeros(0, np.int64), None, []
    with torch.no_grad():
        for x, y in loader:
            h, hidden = model.features(x, hidden)
            q = h.reshape(-1, 16).double().numpy()
            keys, labels = np.concatenate([keys, q]), np.concatenate([labels, y.reshape(-1)])
            d = ((q[:, None] - keys[None]) ** 2).sum(-1)
            nearest = np.argsort(d, 1)[:, : min(k, len(keys))]
            w = np_weights(
                np.take_along_axis(d, nearest, 1), np.ones_like(nearest, bool), 1e-3, None
            )
            base = model.decoder(h).reshape(-1, 12).numpy()
            outputs.append(np_mixture(base, None, w, labels[nearest], lb, lm))
    return outputs


def test_knn_lm_from_the_training_tokens_matches_the_reference() -> None:
    """write_on_fit=True, λa = 0, memory_temperature: kNN-LM over the training datastore."""
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(49, seed=2), 6, ((0, 2),)), batch_size=4)
    mbpa = MbPA(head="decoder", k=5, base_weight=0.6, memory_weight=0.4, memory_temperature=2.0)
    _trainer(max_epochs=1, callbacks=[mbpa]).fit(model, train)
    model.eval()
    memory = mbpa.memory
    initial = (memory.keys.double().numpy(), memory.values.numpy())
    assert initial[0].shape[0] == 120
    expected = _reference_cache_run(
        model, test, k=5, capacity=10**6, lb=0.6, lm=0.4, tau=2.0, initial=initial, online=False
    )
    _trainer(callbacks=[mbpa]).test(model, test, verbose=False)
    for seen, ref in zip(model.seen, expected, strict=True):
        np.testing.assert_allclose(seen.numpy(), ref, rtol=1e-4, atol=1e-4)
    assert len(mbpa.memory) == 120  # no online writes


def test_three_way_mixture_uses_the_adapted_heads() -> None:
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(49, seed=2), 6), batch_size=4)
    settings = dict(head="decoder", k=5, adaptation_steps=3, adaptation_lr=0.5, beta=0.1)
    mbpa = MbPA(**settings, base_weight=0.2, memory_weight=0.3)
    _trainer(max_epochs=1, callbacks=[mbpa]).fit(model, train)
    model.eval()
    memory, hidden, expected = mbpa.memory, None, []
    with torch.no_grad():
        for x, _ in test:
            h, hidden = model.features(x, hidden)
            q = h.reshape(-1, 16)
            nb = memory.search(q, 5)
            w = np_weights(nb.distances.numpy(), nb.mask.numpy(), 1e-3, None)
            base = model.decoder(q)
            adapted = local_adapt(
                model.decoder,
                q,
                nb.keys,
                nb.values,
                torch.as_tensor(w, dtype=torch.float32),
                steps=3,
                lr=0.5,
                beta=0.1,
            )
            mixed = np_mixture(base.numpy(), adapted.numpy(), w, nb.values.numpy(), 0.2, 0.3)
            expected.append(mixed.reshape(*h.shape[:2], -1))
    results = _trainer(callbacks=[mbpa]).test(model, test, verbose=False)[0]
    for seen, ref in zip(model.seen, expected, strict=True):
        np.testing.assert_allclose(seen.numpy(), ref, rtol=1e-4, atol=1e-4)
    # mbpa/adapted_acc measures the mixed output
    ys = torch.cat([y.reshape(-1) for _, y in test])
    acc = (torch.cat([s.reshape(-1, 12) for s in model.seen]).argmax(-1) == ys).float().mean()
    assert results["mbpa/adapted_acc"] == pytest.approx(acc.item())


def test_defaults_skip_the_mixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """base_weight = memory_weight = 0: the mixture code never runs (so the output is today's
    adapted logits, bit for bit), and the output is local_adapt's on the same neighbours."""
    import lightning_mbpa._adapter as adapting

    def refuse(*args, **kwargs):
        raise AssertionError("the mixture ran at the defaults")

    monkeypatch.setattr(adapting, "mix_log_probs", refuse)
    monkeypatch.setattr(adapting, "neighbour_weights", refuse)
    torch.manual_seed(0)
    model = StatefulLM()
    train = DataLoader(TokenWindows(_stream(121, seed=1), 6), batch_size=4)
    test = DataLoader(TokenWindows(_stream(49, seed=2), 6), batch_size=4)
    mbpa = MbPA(head="decoder", k=5, adaptation_steps=3, adaptation_lr=0.5)
    _trainer(max_epochs=1, callbacks=[mbpa]).fit(model, train)
    model.eval()
    memory, hidden, expected = mbpa.memory, None, []
    with torch.no_grad():
        for x, _ in test:
            h, hidden = model.features(x, hidden)
            q = h.reshape(-1, 16)
            nb = memory.search(q, 5)
            w = kernel_weights(nb.distances, nb.mask)
            out = local_adapt(model.decoder, q, nb.keys, nb.values, w, steps=3, lr=0.5, beta=0.0)
            expected.append(out.reshape(*h.shape[:2], -1))
    _trainer(callbacks=[mbpa]).test(model, test, verbose=False)
    for seen, ref in zip(model.seen, expected, strict=True):
        torch.testing.assert_close(seen, ref, rtol=1e-6, atol=1e-6)


def test_memory_only_model_gives_finite_outputs_for_words_it_never_saw() -> None:
    torch.manual_seed(0)
    model = StatefulLM().eval()
    loader = DataLoader(TokenWindows(_stream(121), 6), batch_size=4)
    mbpa = MbPA(head="decoder", write_on_fit=False, online_writes=True, k=3, memory_weight=1.0)
    _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    seen = torch.cat(model.seen)
    assert torch.isfinite(seen).all()
    assert (seen == LOG_FLOOR).any()  # classes none of the 3 neighbours holds
    # the first batch had an empty cache: its memory part is the base distribution
    with torch.no_grad():
        first = model(next(iter(loader))[0])[0]
    torch.testing.assert_close(model.seen[0], torch.log_softmax(first, -1))


def test_write_on_fit_false_without_online_writes_needs_populate() -> None:
    torch.manual_seed(0)
    model = StatefulLM()
    loader = DataLoader(TokenWindows(_stream(49), 6), batch_size=4)
    mbpa = MbPA(head="decoder", write_on_fit=False, k=3, memory_weight=0.5)
    _trainer(max_epochs=1, callbacks=[mbpa]).fit(model, loader)
    assert len(mbpa.memory) == 0
    with pytest.raises(MisconfigurationException, match="write_on_fit=False, online_writes=False"):
        _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    mbpa.populate(model, loader)
    assert len(mbpa.memory) == 48
    _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
    assert len(mbpa.memory) == 48


def test_one_logit_head_refuses_a_mixture() -> None:
    mbpa = MbPA(head="decoder", memory_weight=0.5, write_on_fit=False, online_writes=True)
    model = StatefulLM(vocab=1).eval()
    loader = DataLoader(TokenWindows(torch.zeros(25, dtype=torch.long), 6), batch_size=2)
    with pytest.raises(MisconfigurationException, match=r"memory_weight=0\.5"):
        _trainer(callbacks=[mbpa]).test(model, loader, verbose=False)
