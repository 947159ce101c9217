"""The dual form of :func:`~lightning_mbpa.local_adapt`, for an ``nn.Linear`` head.

Every gradient of the neighbours' loss with respect to ``W`` is a combination of the neighbour
keys, so the adapted weights stay in ``W0 + A·H`` (``H`` the K keys, ``A`` a ``CxK`` matrix) and
the steps run on ``A`` through the KxK Gram matrix ``H·Hᵀ``: ``O(B·K²·C)`` per step for a batch
of ``B`` queries, no per-query weight copy and no autograd. Pure torch; the head is never
mutated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mbpa._profiling import phase

# The dual path holds Z0 and two [B, K, C] step buffers. On CPU a chunk's buffers are kept
# near this size: the steps then run in cache (~1.4x faster at C=1000, B=256).
_DUAL_BUFFERS = 3
_CPU_DUAL_CHUNK_BYTES = 16 * 2**20


def _adapt_linear_dual_chunked(
    head: nn.Linear,
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    valid: Tensor,
    steps: int,
    lr: float,
    beta: float,
    base: Tensor,
    neighbour_outputs: Tensor | None,
    memory_budget_bytes: int,
) -> Tensor:
    """:func:`_adapt_linear_dual` over chunks of queries that fit the budget (and CPU caches)."""
    num_neighbours = keys.shape[1]
    # Z0, the step buffers, the Gram matrix and its scaled copy (the keys are the caller's).
    per_query = (
        keys.element_size() * num_neighbours * (_DUAL_BUFFERS * base.shape[1] + 2 * num_neighbours)
    )
    chunk = max(1, memory_budget_bytes // per_query)
    if keys.device.type == "cpu":
        chunk = min(chunk, max(1, _CPU_DUAL_CHUNK_BYTES // per_query))
    if chunk >= queries.shape[0]:
        return _adapt_linear_dual(
            head, queries, keys, labels, weights, valid, steps, lr, beta, base, neighbour_outputs
        )
    chunks = queries.split(chunk)
    pieces = zip(
        chunks,
        keys.split(chunk),
        labels.split(chunk),
        weights.split(chunk),
        valid.split(chunk),
        base.split(chunk),
        [None] * len(chunks) if neighbour_outputs is None else neighbour_outputs.split(chunk),
        strict=True,
    )
    return torch.cat(
        [
            _adapt_linear_dual(head, q, k, y, w, v, steps, lr, beta, b, nb)
            for q, k, y, w, v, b, nb in pieces
        ]
    )


def _adapt_linear_dual(
    head: nn.Linear,
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    valid: Tensor,
    steps: int,
    lr: float,
    beta: float,
    base: Tensor,
    neighbour_outputs: Tensor | None,
) -> Tensor:
    """Exact adaptation of a linear head with ``W = W0 + A·H`` and ``b = b0 + δb``.

    With ``G = w·(p - onehot(y))`` (the gradient of the weighted loss wrt the neighbour
    logits) the step is ``A ← (1 - beta)·A - lr·Gᵀ`` and ``δb ← (1 - beta)·δb - lr·Σ_k G_k``:
    the same recursion as the row sums of ``A``, so ``δb = A·1`` at every step. The bias is
    thus the weight of a constant feature 1, and both are handled by adding 1 to the Gram
    matrix ``M = H·Hᵀ`` and to ``H·q``: neighbour logits ``Z = Z0 + (M + 1)·Aᵀ``, output
    ``base + A·(H·q + 1)``.

    ``A`` itself is never formed: both of its products follow the same recursion, so each step
    updates the neighbour logits ``Z ← (1 - beta)·Z + beta·Z0 - lr·M·diag(w)·(p - onehot(y))``
    and the query's output offset ``u ← (1 - beta)·u - lr·(H·q)·diag(w)·(p - onehot(y))`` with
    one in-place ``baddbmm`` each (the last step needs only ``u``).

    With few classes a step's ``[K, C]`` tensors are held transposed, ``[C, K]``: the softmax
    then reduces over a middle dimension with the K neighbours contiguous, which is vectorised
    (over a last dimension of 10 it is ~20x slower); with many classes the last dimension is
    the faster one.
    """
    num_classes = base.shape[1]
    class_major = num_classes < _CLASS_MAJOR_BELOW
    with phase("mbpa.dual.gram"):
        gram, key_dot_query = _key_products(queries, keys, valid, head.bias is not None)
        # M·diag(-lr·w) (M is symmetric, so diag(-lr·w)·M is its transpose) and (H·q)·diag(-lr·w)
        scaled_weights = -lr * weights
        move_logits = gram * (
            scaled_weights[:, :, None] if class_major else scaled_weights[:, None]
        )
        move_output = key_dot_query * scaled_weights[:, None]  # [B, 1, K]
    with phase("mbpa.dual.neighbour_logits"):
        if neighbour_outputs is not None:
            logits0 = neighbour_outputs.transpose(1, 2) if class_major else neighbour_outputs
        else:
            weight0 = head.weight.detach().to(keys.dtype)
            bias0 = None if head.bias is None else head.bias.detach().to(keys.dtype)
            if class_major:  # Z0ᵀ = W0·Hᵀ + b0
                logits0 = torch.matmul(weight0, keys.transpose(1, 2))
                if bias0 is not None:
                    logits0 += bias0[:, None]
            else:
                logits0 = F.linear(keys, weight0, bias0)
    # per neighbour: [B, 1, K] class-major, [B, K, 1] otherwise
    along = (lambda t: t[:, None, :]) if class_major else (lambda t: t[:, :, None])
    if not bool(valid.all()):  # as in `_key_products`
        logits0 = torch.where(along(valid), logits0, 0.0)
    binary = num_classes == 1
    class_dim = 1 if class_major else 2
    targets = along(labels)
    if binary:
        targets = targets.to(keys.dtype)
    else:
        minus_ones = torch.full(targets.shape, -1.0, dtype=keys.dtype, device=keys.device)
    keep = 1.0 - beta
    if beta != 0:  # read every step: contiguous
        logits0 = logits0.contiguous()
    # Z, updated in place (never the caller's `neighbour_outputs`), and the step's
    # p - onehot(y), both recycled across steps (a fresh large CPU allocation is page-faulted
    # in on every step, which costs as much as the arithmetic)
    logits = logits0.clone(memory_format=torch.contiguous_format)
    residuals = torch.empty_like(logits)
    output = base[:, :, None] if class_major else base[:, None, :]
    offset = torch.zeros_like(output)
    for step in range(steps):
        with phase("mbpa.dual.softmax"):  # the residuals p - onehot(y)
            if binary:
                torch.sigmoid(logits, out=residuals).sub_(targets)
            else:
                torch.softmax(logits, dim=class_dim, out=residuals)
                residuals.scatter_add_(class_dim, targets, minus_ones)
        with phase("mbpa.dual.update"):
            if class_major:  # the transposed recursions: Zᵀ, uᵀ
                offset.baddbmm_(residuals, move_output.transpose(1, 2), beta=keep)
            else:
                offset.baddbmm_(move_output, residuals, beta=keep)
            if step + 1 == steps:
                break
            if class_major:
                logits.baddbmm_(residuals, move_logits, beta=keep)
            else:
                logits.baddbmm_(move_logits, residuals, beta=keep)
            if beta != 0:
                logits.add_(logits0, alpha=beta)
    with phase("mbpa.dual.query_output"):
        return (output + offset)[:, :, 0] if class_major else (output + offset)[:, 0, :]


# Below this many classes, the dual path's steps run class-major (see `_adapt_linear_dual`).
_CLASS_MAJOR_BELOW = 64


def _key_products(
    queries: Tensor, keys: Tensor, valid: Tensor, bias: bool
) -> tuple[Tensor, Tensor]:
    """The Gram matrix of each query's neighbour keys ``M = H·Hᵀ`` ``[B, K, K]`` and their
    products with the query ``H·q`` ``[B, 1, K]``, with 1 added for a layer with a bias (its
    constant feature). Entries of masked neighbours are 0: they never move the coefficients
    (their gradients are 0), and zeroing what they touch keeps padding garbage (inf/NaN keys)
    from leaking through 0·NaN."""
    gram = torch.bmm(keys, keys.transpose(1, 2))
    key_dot_query = torch.bmm(queries[:, None, :], keys.transpose(1, 2))
    if bias:
        gram += 1.0
        key_dot_query += 1.0
    if not bool(valid.all()):
        gram = torch.where(valid[:, :, None] & valid[:, None, :], gram, 0.0)
        key_dot_query = torch.where(valid[:, None, :], key_dot_query, 0.0)
    return gram, key_dot_query
