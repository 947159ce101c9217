"""Independent references for the tests: numpy brute-force search, a per-query adaptation loop.

Written the way every public MbPA reimplementation does it (a deep copy of the head and a fresh
SGD optimiser per query), deliberately sharing no code with the library.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and squared L2 distances of the ``k`` nearest keys, ascending."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None, :, :].astype(np.float64)) ** 2).sum(
        -1
    )
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def adapt_one(
    head: nn.Module,
    query: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    steps: int,
    lr: float,
    beta: float,
    offsets: Tensor | None = None,
) -> Tensor:
    """``steps`` of θx ← θx − lr·∇Σ w·CE − beta·(θx − θ) on a deep copy; returns head_θx(query).

    With ``offsets`` the loss is ``CE(head(h) + offsets, y)`` (the logit-adjusted loss) and the
    query is still predicted without them."""
    local = copy.deepcopy(head).eval()
    theta = [p.detach().clone() for p in local.parameters()]
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            before = [p.detach().clone() for p in local.parameters()]
            opt.zero_grad()
            logits = local(keys) if offsets is None else local(keys) + offsets
            if logits.shape[-1] == 1:
                losses = F.binary_cross_entropy_with_logits(
                    logits[:, 0], labels.to(logits.dtype), reduction="none"
                )
            else:
                losses = F.cross_entropy(logits, labels, reduction="none")
            (weights * losses).sum().backward()
            opt.step()
            with torch.no_grad():
                for p, p_before, p0 in zip(local.parameters(), before, theta, strict=True):
                    p.sub_(beta * (p_before - p0))
    with torch.no_grad():
        return local(query[None])[0]


def kernel(distances: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    w = 1.0 / (eps + distances)
    return w / w.sum(axis=1, keepdims=True)
