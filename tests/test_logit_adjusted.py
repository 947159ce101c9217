"""``adaptation_loss="logit_adjusted"``: local adaptation on the logits plus the memory's log class
prior, the query predicted without it; against a per-query loop sharing no code with the
library, and the callback's default left as it was."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa import MbPA, class_log_prior, kernel_weights, local_adapt
from tests.helpers import TinyClassifier, TwoLayerHead, blobs, loader, trainer
from tests.reference import adapt_one, brute_force, kernel


def reference_log_prior(labels: list[int], num_classes: int) -> np.ndarray:
    """``log((n_c + 1) / (N + C))`` counted in Python; log-odds for one output."""
    high = 2 if num_classes == 1 else num_classes
    counts = np.array([labels.count(c) + 1.0 for c in range(high)])
    log_prior = np.log(counts / counts.sum())
    return log_prior[1:] - log_prior[:1] if num_classes == 1 else log_prior


def adjusted_adapt_one(
    head: nn.Module,
    query: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    offsets: Tensor,
    steps: int,
    lr: float,
    beta: float,
) -> Tensor:
    """A deep copy and a fresh SGD optimiser per query; the loss is ``CE(head(h) + offsets, y)``;
    returns ``head_θx(query)`` without the offsets."""
    return adapt_one(head, query, keys, labels, weights, steps, lr, beta, offsets=offsets)


# ---------------------------------------------------------------- class_log_prior


@pytest.mark.parametrize(
    ("labels", "num_classes"),
    [([0, 0, 1], 3), ([2, 2, 2, 2, 0], 4), ([], 3), ([1, 0, 0, 0], 1), ([1, 1], 1)],
)
def test_class_log_prior_equals_counting(labels, num_classes):
    got = class_log_prior(torch.tensor(labels, dtype=torch.int64), num_classes)
    assert got.dtype == torch.float32 and got.shape == (num_classes,)
    np.testing.assert_allclose(got.numpy(), reference_log_prior(labels, num_classes), rtol=1e-6)
    assert torch.isfinite(got).all()  # an absent class stays finite


@pytest.mark.parametrize(
    ("labels", "num_classes", "match"),
    [
        (torch.tensor([0, 3]), 3, r"`labels` must lie in \[0, 3\)"),
        (torch.tensor([0, 2]), 1, r"\[0, 2\)"),
        (torch.tensor([-1]), 2, "got values in"),
        (torch.tensor([0.0]), 2, "integer tensor"),
        (torch.tensor([0]), 0, "`num_classes` must be an int >= 1, got 0"),
    ],
)
def test_class_log_prior_refuses_bad_input(labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        class_log_prior(labels, num_classes)


# ---------------------------------------------------------------- local_adapt(logit_offsets=...)


def neighbourhoods(num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(6, 5, generator=g)
    keys = torch.randn(6, 7, 5, generator=g)
    high = 2 if num_classes == 1 else num_classes
    labels = torch.randint(0, high, (6, 7), generator=g)
    d = ((queries[:, None] - keys) ** 2).sum(-1)
    mask = torch.ones_like(d, dtype=torch.bool)
    mask[0, 4:] = False  # a query with fewer neighbours
    return queries, keys, labels, kernel_weights(d, mask)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_logit_offsets_equal_the_per_query_reference(num_classes, head_kind, beta):
    torch.manual_seed(0)
    if head_kind == "linear":  # the dual form
        head: nn.Module = nn.Linear(5, num_classes)
    else:  # the generic form, with its first layer in dual form
        head = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, num_classes))
    queries, keys, labels, weights = neighbourhoods(num_classes)
    offsets = torch.linspace(-2.0, 1.5, num_classes)
    got = local_adapt(head, queries, keys, labels, weights, 4, 0.5, beta, logit_offsets=offsets)
    for b in range(len(queries)):
        keep = weights[b] > 0
        want = adjusted_adapt_one(
            head,
            queries[b],
            keys[b][keep],
            labels[b][keep],
            weights[b][keep],
            offsets,
            4,
            0.5,
            beta,
        )
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    plain = local_adapt(head, queries, keys, labels, weights, 4, 0.5, beta)
    assert not torch.allclose(got, plain, atol=1e-3)  # the offsets change what is fitted


def test_constant_offsets_change_nothing():
    """A shift of every logit by the same amount leaves the softmax, so the adapted outputs,
    as they are: a memory whose classes are equally frequent gets plain cross-entropy."""
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    queries, keys, labels, weights = neighbourhoods(3)
    offsets = torch.full((3,), float(np.log(1 / 3)))
    got = local_adapt(head, queries, keys, labels, weights, 5, 0.5, 0.0, logit_offsets=offsets)
    plain = local_adapt(head, queries, keys, labels, weights, 5, 0.5, 0.0)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        (torch.zeros(4), r"`logit_offsets` must have shape \[3\], got \(4,\)"),
        (torch.zeros(1, 3), "finite floating-point tensor"),
        (torch.tensor([0.0, float("inf"), 0.0]), "finite floating-point tensor"),
        (torch.zeros(3, dtype=torch.int64), "finite floating-point tensor"),
    ],
)
def test_bad_logit_offsets_are_refused(offsets, match):
    head = nn.Linear(5, 3)
    queries, keys, labels, weights = neighbourhoods(3)
    with pytest.raises(ValueError, match=match):
        local_adapt(head, queries, keys, labels, weights, 2, 0.1, 0.0, logit_offsets=offsets)


# ---------------------------------------------------------------- MbPA(adaptation_loss=...)


def imbalanced_blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class 0 kept at about 10% of its examples: a rare class in the memory."""
    x, y = blobs(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    keep = (y != 0) | (torch.rand(n, generator=g) < 0.1)
    return x[keep], y[keep]


SETTINGS = dict(k=8, adaptation_steps=5, adaptation_lr=0.5, beta=0.1)


def fitted(model: TinyClassifier, **kwargs):
    torch.manual_seed(0)
    x, y = imbalanced_blobs(160, seed=0)
    cb = MbPA(**SETTINGS, **kwargs)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    return model, cb


def reference_logits(model: TinyClassifier, cb: MbPA, xt: Tensor, adjusted: bool) -> Tensor:
    keys = cb.memory.state_dict()["keys"].numpy()
    values = cb.memory.state_dict()["values"]
    num_classes = 4
    offsets = torch.from_numpy(reference_log_prior(values.tolist(), num_classes)).float()
    if not adjusted:
        offsets = torch.zeros(num_classes)
    with torch.no_grad():
        queries = model.encoder(xt)
    idx, dist = brute_force(keys, queries.numpy(), cb.k)
    weights = torch.from_numpy(kernel(dist, cb.kernel_eps)).float()
    out = []
    for b in range(len(xt)):
        nb = torch.from_numpy(idx[b])
        out.append(
            adjusted_adapt_one(
                model.head,
                queries[b],
                torch.from_numpy(keys)[nb],
                values[nb],
                weights[b],
                offsets,
                cb.adaptation_steps,
                cb.adaptation_lr,
                cb.beta,
            )
        )
    return torch.stack(out)


@pytest.mark.parametrize("model_class", [TinyClassifier, TwoLayerHead])
def test_callback_predictions_equal_the_reference(model_class):
    model, cb = fitted(model_class(), head="head", adaptation_loss="logit_adjusted")
    assert cb.adaptation_loss == "logit_adjusted"
    counts = torch.bincount(cb.memory.values, minlength=4)
    assert counts[0] * 4 < counts[1:].min()  # class 0 is rare in the memory
    xt, yt = blobs(24, seed=1)
    got = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))  # type: ignore[arg-type]
    torch.testing.assert_close(got, reference_logits(model, cb, xt, True), rtol=1e-4, atol=1e-4)
    cb.adaptation_loss = "cross_entropy"  # read when a stage starts
    plain = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))  # type: ignore[arg-type]
    torch.testing.assert_close(plain, reference_logits(model, cb, xt, False), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_default_is_cross_entropy_and_bad_values_are_refused():
    assert MbPA().adaptation_loss == "cross_entropy"
    with pytest.raises(
        MisconfigurationException,
        match=r"adaptation_loss.*'balanced'.*\['cross_entropy', 'logit_adjusted'\]",
    ):
        MbPA(adaptation_loss="balanced")  # type: ignore[arg-type]


def test_the_prior_follows_the_memory_and_the_option_survives_pickling():
    """The log prior is cached per memory version: entries written between two stages change
    it, and the second stage equals the reference with the new counts."""
    model, cb = fitted(TinyClassifier(), adaptation_loss="logit_adjusted")
    xt, yt = blobs(16, seed=2)
    first = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))  # type: ignore[arg-type]
    with torch.no_grad():
        extra = model.encoder(blobs(40, seed=3)[0])
    cb.memory.add(extra, torch.zeros(40, dtype=torch.int64))  # class 0 is no longer rare
    second = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))  # type: ignore[arg-type]
    torch.testing.assert_close(second, reference_logits(model, cb, xt, True), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)
    restored = pickle.loads(pickle.dumps(cb))
    assert restored.adaptation_loss == "logit_adjusted"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logit_adjusted_on_gpu_matches_the_cpu_computation():
    """The prior is counted on the memory's device (CUDA) and added there."""
    model, cb = fitted(TinyClassifier(), adaptation_loss="logit_adjusted")
    cuda_cb = MbPA(**SETTINGS, adaptation_loss="logit_adjusted")
    cuda_cb.memory.load_state_dict(cb.memory.state_dict())
    xt, yt = blobs(24, seed=1)
    on_cpu = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))  # type: ignore[arg-type]
    on_gpu = torch.cat(
        trainer(callbacks=[cuda_cb], accelerator="gpu").predict(model, loader(xt, yt))  # type: ignore[arg-type]
    ).cpu()
    assert cuda_cb.memory.keys.device.type == "cuda"
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
