"""The EWC baseline (examples/ewc.py) on a 2-parameter model, against hand-computed values.

The model's logits are ``[w·x, b]`` (two classes, parameters ``w`` and ``b``), so every
per-example gradient of the log-likelihood has a closed form, evaluated here with plain Python
floats (no autograd): ``∂/∂w log p(y|x) = x·(1[y=0] − p0)``, ``∂/∂b log p(y|x) = 1[y=1] − p1``.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from examples.ewc import EWC
from tests.helpers import trainer

LAMBDA = 3.0
LR = 0.5
TASK1 = ([0.5, -1.0, 2.0, 1.5], [0, 1, 0, 1])
TASK2 = ([1.0, -0.5, 0.25, -2.0], [1, 1, 0, 0])


class TwoParameters(pl.LightningModule):
    """logits = [w·x, b]: two parameters, two classes."""

    def __init__(self, w: float = 0.5, b: float = -0.3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.w * x[:, 0], self.b.expand(len(x))], dim=1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def task_loader(task: tuple[list[float], list[int]]) -> DataLoader:
    x = torch.tensor(task[0], dtype=torch.float64).unsqueeze(1)
    return DataLoader(TensorDataset(x, torch.tensor(task[1])), batch_size=len(task[1]))


def log_likelihood_grad(w: float, b: float, x: float, y: int) -> tuple[float, float]:
    z0, z1 = w * x, b
    p0 = math.exp(z0) / (math.exp(z0) + math.exp(z1))
    p1 = 1.0 - p0
    return x * ((y == 0) - p0), (y == 1) - p1


def hand_fisher(w: float, b: float, task: tuple[list[float], list[int]]) -> tuple[float, float]:
    grads = [log_likelihood_grad(w, b, x, y) for x, y in zip(*task, strict=True)]
    n = len(grads)
    return sum(g[0] ** 2 for g in grads) / n, sum(g[1] ** 2 for g in grads) / n


def hand_sgd(w: float, b: float, task, steps: int, penalties) -> tuple[float, float]:
    """Full-batch SGD on the mean cross-entropy plus λ/2 Σ F(θ − θ*)², in plain floats."""
    for _ in range(steps):
        grads = [log_likelihood_grad(w, b, x, y) for x, y in zip(*task, strict=True)]
        gw = -sum(g[0] for g in grads) / len(grads)
        gb = -sum(g[1] for g in grads) / len(grads)
        for (fw, fb), (aw, ab) in penalties:
            gw += LAMBDA * fw * (w - aw)
            gb += LAMBDA * fb * (b - ab)
        w, b = w - LR * gw, b - LR * gb
    return w, b


def weights(model: TwoParameters) -> tuple[float, float]:
    return model.w.item(), model.b.item()


def test_fisher_anchor_penalty_and_gradient_match_the_formulas() -> None:
    model, ewc = TwoParameters(), EWC(ewc_lambda=LAMBDA)

    # task 1: plain SGD (no finished task yet, no penalty), then the Fisher at the end weights
    trainer(max_epochs=2, callbacks=[ewc]).fit(model, task_loader(TASK1))
    w1, b1 = hand_sgd(0.5, -0.3, TASK1, steps=2, penalties=[])
    assert weights(model) == pytest.approx((w1, b1), abs=1e-12)
    f1 = hand_fisher(w1, b1, TASK1)
    assert len(ewc.fishers) == len(ewc.anchors) == 1
    assert float(ewc.fishers[0]["w"]) == pytest.approx(f1[0], rel=1e-10)
    assert float(ewc.fishers[0]["b"]) == pytest.approx(f1[1], rel=1e-10)
    assert (float(ewc.anchors[0]["w"]), float(ewc.anchors[0]["b"])) == weights(model)

    # task 2: from step 2 on, θ ≠ θ*₁ and the penalty's gradient λF₁(θ − θ*₁) joins the loss's
    trainer(max_epochs=3, callbacks=[ewc]).fit(model, task_loader(TASK2))
    w2, b2 = hand_sgd(w1, b1, TASK2, steps=3, penalties=[(f1, (w1, b1))])
    without = hand_sgd(w1, b1, TASK2, steps=3, penalties=[])
    assert weights(model) == pytest.approx((w2, b2), abs=1e-12)
    assert abs(w2 - without[0]) + abs(b2 - without[1]) > 1e-3  # the penalty did something
    f2 = hand_fisher(w2, b2, TASK2)
    assert len(ewc.fishers) == 2
    assert float(ewc.fishers[1]["w"]) == pytest.approx(f2[0], rel=1e-10)
    assert float(ewc.fishers[1]["b"]) == pytest.approx(f2[1], rel=1e-10)

    # accumulated over both tasks, at arbitrary weights: value and gradient
    with torch.no_grad():
        model.w.fill_(0.9)
        model.b.fill_(0.2)
    expected = (
        LAMBDA
        / 2
        * sum(
            f[0] * (0.9 - a[0]) ** 2 + f[1] * (0.2 - a[1]) ** 2
            for f, a in ((f1, (w1, b1)), (f2, (w2, b2)))
        )
    )
    assert ewc.penalty(model).item() == pytest.approx(expected, rel=1e-10)
    model.w.grad = torch.tensor(0.25, dtype=torch.float64)  # a loss gradient already there
    model.b.grad = None  # no gradient yet: the penalty's alone
    ewc.add_penalty_gradient(model)
    grad_w = 0.25 + LAMBDA * (f1[0] * (0.9 - w1) + f2[0] * (0.9 - w2))
    grad_b = LAMBDA * (f1[1] * (0.2 - b1) + f2[1] * (0.2 - b2))
    assert model.w.grad is not None and model.b.grad is not None
    assert float(model.w.grad) == pytest.approx(grad_w, rel=1e-10)
    assert float(model.b.grad) == pytest.approx(grad_b, rel=1e-10)


class PairMean(nn.Module):
    """A Linear applied to two rows per example (then averaged): no closed form, vmap path."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(x.view(len(x), 2, 3))).mean(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)),  # closed form
        lambda: nn.Linear(6, 4),  # the model is the layer
        PairMean,  # torch.func
    ],
)
def test_fisher_matches_a_per_example_autograd_loop(make) -> None:
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(23, 6, dtype=torch.float64), torch.randint(0, 4, (23,))
    fisher = EWC().fisher(model, DataLoader(TensorDataset(x, y), batch_size=5))

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        (-F.cross_entropy(model(xi[None]), yi[None])).backward()
        for n, p in model.named_parameters():
            assert p.grad is not None
            expected[n] += p.grad.pow(2) / len(x)
    assert fisher.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-10, atol=1e-14)


def test_zero_lambda_is_plain_fine_tuning() -> None:
    with_ewc, plain = TwoParameters(), TwoParameters()
    ewc = EWC(ewc_lambda=0.0)
    for task in (TASK1, TASK2):
        trainer(max_epochs=2, callbacks=[ewc]).fit(with_ewc, task_loader(task))
        trainer(max_epochs=2).fit(plain, task_loader(task))
    assert weights(with_ewc) == weights(plain)
    assert ewc.penalty(with_ewc).item() == 0.0


def test_state_dict_round_trip() -> None:
    model, ewc = TwoParameters(), EWC(ewc_lambda=LAMBDA)
    trainer(max_epochs=1, callbacks=[ewc]).fit(model, task_loader(TASK1))
    restored = EWC(ewc_lambda=LAMBDA)
    restored.load_state_dict(ewc.state_dict())
    origin = TwoParameters(0.0, 0.0)
    assert restored.penalty(origin).item() == ewc.penalty(origin).item() > 0


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "10"])
def test_bad_lambda_is_refused_naming_it(value: object) -> None:
    with pytest.raises(MisconfigurationException, match=r"`ewc_lambda`=.*finite float >= 0"):
        EWC(ewc_lambda=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_fisher_batch_size_is_refused_naming_it(value: object) -> None:
    with pytest.raises(MisconfigurationException, match=r"`fisher_batch_size`=.*int >= 1"):
        EWC(fisher_batch_size=value)  # type: ignore[arg-type]
