"""Local adaptation of an output head on a query's nearest memories.

Memory-based Parameter Adaptation (MbPA; Sprechmann et al., ICLR 2018, arXiv 1802.10542)
classifies a query ``q`` with a private copy ``θx`` of the output head ``g_θ``, fitted for a
few gradient steps on the query's K nearest memories ``(h_k, y_k)`` with kernel weights
``w_k``::

    θx ← θx - lr · ∇_θx Σ_k w_k · CE(g_θx(h_k), y_k) - beta · (θx - θ)

starting from the trained ``θ``. This is gradient descent on the MAP objective of ``θx`` under
a Gaussian prior centred on ``θ`` (the ``beta`` term is the prior's pull), and ``θ`` itself is
never modified.

Two exact implementations are chosen automatically:

* **Dual form** for an ``nn.Linear`` head. Every gradient of the neighbours' loss with respect
  to ``W`` is a combination of the neighbour keys, so the adapted weights stay in
  ``W0 + A·H`` (``H`` the K keys, ``A`` a ``CxK`` matrix) and the steps run on ``A`` through
  the KxK Gram matrix ``H·Hᵀ``: ``O(B·K²·C)`` per step for a batch of ``B`` queries, no
  per-query weight copy and no autograd.
* **Generic form** for any other head: ``torch.func`` (``functional_call`` + ``vmap`` over the
  queries + ``grad`` of the weighted loss), in chunks of queries sized to a memory budget. When
  the head is an ``nn.Sequential`` opening with an ``nn.Linear`` (an MLP head), that first
  layer stays in the same dual form and only the layers after it are copied per query.

Both are pure torch functions of the module's parameters: the module is never mutated, no
state is kept between calls, and they run unchanged under ``torch.inference_mode()`` (which
Lightning uses for ``test`` and ``predict``), ``torch.no_grad()`` or grad mode.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.profiler import record_function

__all__ = ["MIN_KERNEL_EPS", "kernel_weights", "local_adapt"]

#: The smallest ``eps`` of :func:`kernel_weights` (and ``MbPA(kernel_eps=...)``): the smallest
#: normal float32, so that the weight of an exact match, ``1 / eps``, is finite in float32.
MIN_KERNEL_EPS = float(torch.finfo(torch.float32).tiny)

_DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Per-query working set of the generic path, in multiples of |θ|: θx, its gradient, the
# autograd temporaries of the backward pass and the update's intermediates.
_PARAM_COPIES_PER_QUERY = 6
# On CPU, a chunk's copy of the parameters is kept near this size (cache-friendly).
_CPU_CHUNK_PARAM_BYTES = 8 * 2**20
# The dual path holds Z0 and two [B, K, C] step buffers. On CPU a chunk's buffers are kept
# near this size: the steps then run in cache (~1.4x faster at C=1000, B=256).
_DUAL_BUFFERS = 3
_CPU_DUAL_CHUNK_BYTES = 16 * 2**20


def kernel_weights(distances: Tensor, mask: Tensor, eps: float = 1e-3) -> Tensor:
    """Normalised inverse-distance kernel over each query's neighbours.

    ``w_k = 1 / (eps + d_k)``, normalised to sum to 1 over the valid neighbours of each row
    (the kernel of Neural Episodic Control's DND, used by MbPA).

    Args:
        distances: ``[B, K]`` squared Euclidean distances of each query to its neighbours.
            Negative values (round-off of ``||q||² - 2q·h + ||h||²``) are clamped to 0.
        mask: ``[B, K]`` boolean, ``True`` where the neighbour is valid (e.g. ``False`` for
            padding when the memory holds fewer than K entries).
        eps: Constant bounding the weight of an exact match, at least :data:`MIN_KERNEL_EPS`
            (``1.1755e-38``, the smallest normal float32) so that ``1 / eps`` is finite.

    Returns:
        ``[B, K]`` weights in the floating dtype of ``distances`` (float32 if it is an integer
        tensor). Masked neighbours weigh exactly 0; a row with no valid neighbour is all zeros.
        A row whose unnormalised sum overflows (several exact matches with a tiny ``eps``) is
        normalised by its largest weight first, so the weights stay finite.

    Raises:
        ValueError: On an ``eps`` below :data:`MIN_KERNEL_EPS` or not finite, or shapes/dtypes
            that do not match.

    Example:
        >>> d = torch.tensor([[0.0, 1.0, 5.0]])
        >>> kernel_weights(d, torch.tensor([[True, True, False]]), eps=1.0)
        tensor([[0.6667, 0.3333, 0.0000]])
    """
    if not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < MIN_KERNEL_EPS:
        raise ValueError(
            f"`eps` must be a finite float >= {MIN_KERNEL_EPS!r} (the smallest normal float32, so "
            f"that the weight 1/eps of an exact match is finite), got {eps!r}."
        )
    if distances.dim() != 2:
        raise ValueError(f"`distances` must be 2-D [B, K], got shape {tuple(distances.shape)}.")
    if mask.shape != distances.shape:
        raise ValueError(
            f"`mask` must have the shape of `distances` {tuple(distances.shape)}, "
            f"got {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a bool tensor, got dtype {mask.dtype}.")
    out_dtype = distances.dtype if distances.is_floating_point() else torch.float32
    work_dtype = torch.promote_types(out_dtype, torch.float32)
    inv = 1.0 / (eps + distances.to(work_dtype).clamp(min=0))
    inv = torch.where(mask, inv, torch.zeros((), dtype=work_dtype, device=inv.device))
    total = inv.sum(dim=-1, keepdim=True)
    weights = inv / torch.where(total > 0, total, torch.ones_like(total))
    weights = torch.where(torch.isfinite(total), weights, _normalised_by_largest(inv))
    return weights.to(out_dtype)


def _normalised_by_largest(inv: Tensor) -> Tensor:
    """``inv`` normalised to rows summing to 1 after dividing by each row's largest entry, so
    the sum cannot overflow (every term is in [0, 1])."""
    largest = inv.amax(dim=-1, keepdim=True)
    scaled = inv / torch.where(largest > 0, largest, torch.ones_like(largest))
    total = scaled.sum(dim=-1, keepdim=True)
    return scaled / torch.where(total > 0, total, torch.ones_like(total))


def local_adapt(
    head: nn.Module,
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    steps: int,
    lr: float,
    beta: float,
    *,
    base_outputs: Tensor | None = None,
    neighbour_outputs: Tensor | None = None,
    memory_budget_bytes: int = _DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Outputs of ``head`` on each query after adapting a private copy to its neighbours.

    For every query ``b``, a copy ``θx`` of the head's parameters ``θ`` takes ``steps`` plain
    SGD steps of ``θx ← θx - lr·∇_θx Σ_k w_bk·loss(head_θx(keys[b, k]), labels[b, k])
    - beta·(θx - θ)`` (gradient and pull both evaluated at the current ``θx``), then the
    adapted head is applied to ``queries[b]``. The loss is cross-entropy on class indices, or
    binary cross-entropy with logits on labels ``{0, 1}`` when the head has a single output.

    An exact type ``nn.Linear`` head (alone or as the only layer of an ``nn.Sequential``) uses
    the closed dual form (no autograd); any other head (e.g. ``nn.Sequential`` of Linear /
    LayerNorm / activations / Dropout / BatchNorm) goes through ``torch.func`` in eval mode,
    with an opening ``nn.Linear`` of an ``nn.Sequential`` kept in dual form. All floating-point
    parameters are adapted (including ones with ``requires_grad=False``, so
    ``LightningModule.freeze()`` does not switch MbPA off); buffers are read, never written.
    Computation runs in float32 (float64 for a float64 head) with autocast disabled; the result
    has the dtype of the head's plain forward on ``queries``. Forward hooks registered on
    ``head`` itself are not run (so the function can be called from inside such a hook); hooks
    on its submodules are.

    Args:
        head: The trained output head ``g_θ``. Never modified (its ``training`` flags are
            switched to eval during the generic path and restored afterwards).
        queries: ``[B, D]`` head inputs of the queries.
        keys: ``[B, K, D]`` head inputs of each query's neighbours (memory keys).
        labels: ``[B, K]`` integer class indices of the neighbours, in ``[0, C)`` (``{0, 1}``
            when ``C == 1``). Entries whose weight is 0 are ignored and may hold anything.
        weights: ``[B, K]`` non-negative neighbour weights (e.g. from :func:`kernel_weights`).
            A query whose weights are all 0 is returned unadapted.
        steps: Number of adaptation steps ``T >= 0``. ``0`` returns the unadapted outputs.
        lr: Step size ``>= 0``.
        beta: Pull toward the trained parameters, in ``[0, 1]``. ``0`` is plain weighted
            fine-tuning; ``1`` restarts every step from ``θ``.
        base_outputs: Optional ``[B, C]`` plain outputs of ``head`` on ``queries`` if already
            computed (saves one forward). Returned bit-exactly for unadapted queries.
        neighbour_outputs: Optional ``[B, K, C]`` outputs of the trained head on ``keys``.
            The dual path then skips the ``H·W0ᵀ`` products; the generic path ignores it.
        memory_budget_bytes: Working-memory budget: queries are processed in chunks whose
            estimated footprint (per-query parameter copies on the generic path, ``[K, C]``
            step buffers on the dual path) stays under it. On CPU, chunks are further
            capped to stay cache-sized, which is faster.

    Returns:
        ``[B, C]`` outputs of the adapted heads on the queries, without autograd history. A
        query whose adapted outputs overflow (keys or queries too large for their products to
        be represented, or a huge ``lr``) keeps its base outputs, with a ``UserWarning``.

    Raises:
        ValueError: On shapes that do not match, labels of valid neighbours outside the
            allowed range, negative or non-finite weights, or out-of-range ``steps``, ``lr``,
            ``beta`` or ``memory_budget_bytes``. The message names the argument, the value
            given and what is allowed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(8, 3)
        >>> q, h = torch.randn(4, 8), torch.randn(4, 5, 8)
        >>> y = torch.randint(0, 3, (4, 5))
        >>> d = ((q[:, None] - h) ** 2).sum(-1)
        >>> w = kernel_weights(d, torch.ones_like(d, dtype=torch.bool))
        >>> local_adapt(head, q, h, y, w, steps=5, lr=0.1, beta=1e-3).shape
        torch.Size([4, 3])
    """
    _check_arguments(head, queries, keys, labels, weights, steps, lr, beta, memory_budget_bytes)
    num_queries, num_neighbours = labels.shape
    first, rest = _leading_linear(head)
    linear = _linear_head(head, (first, rest))
    dual = linear is not None
    with contextlib.ExitStack() as stack:
        if type(head) is not nn.Linear:
            stack.enter_context(_eval_mode(head))
        if base_outputs is None:
            with torch.no_grad():  # `head.forward` bypasses hooks on `head` itself; a copy,
                # as an in-place first layer (ReLU(inplace=True)) would change the queries
                base_outputs = head.forward(queries if linear is head else queries.clone())
            if not isinstance(base_outputs, Tensor) or base_outputs.dim() != 2:
                raise ValueError(
                    "`head` must map `queries` [B, D] to a tensor [B, C], got "
                    f"{_describe(base_outputs)}."
                )
        classes = None if linear is None else linear.out_features
        _check_shape("base_outputs", base_outputs, (num_queries, classes))
        num_classes = base_outputs.shape[1]
        if neighbour_outputs is not None:
            _check_shape(
                "neighbour_outputs", neighbour_outputs, (num_queries, num_neighbours, num_classes)
            )
        valid = weights > 0
        _check_labels(labels, valid, num_classes)

        params = {n: p for n, p in head.named_parameters() if p.is_floating_point()}
        active = valid.any(dim=1)
        if steps == 0 or not params or num_queries == 0 or not bool(active.any()):
            return base_outputs.clone()

        compute_dtype = (
            torch.float64
            if any(p.dtype == torch.float64 for p in params.values())
            else torch.float32
        )
        device_type = queries.device.type
        stack.enter_context(_autocast_disabled(device_type))
        labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        if dual:
            assert linear is not None  # dual form only for a Linear head
            with torch.no_grad():
                adapted = _adapt_linear_dual_chunked(
                    linear,
                    queries.to(compute_dtype),
                    keys.to(compute_dtype),
                    labels,
                    weights.to(compute_dtype),
                    valid,
                    steps,
                    float(lr),
                    float(beta),
                    base_outputs.to(compute_dtype),
                    None if neighbour_outputs is None else neighbour_outputs.to(compute_dtype),
                    memory_budget_bytes,
                )
        else:
            adapted = _adapt_generic(
                head,
                first,
                rest,
                queries,
                keys,
                labels,
                weights,
                valid,
                steps,
                float(lr),
                float(beta),
                num_classes,
                compute_dtype,
                memory_budget_bytes,
            )
        adapted = adapted.to(base_outputs.dtype)
        active = _without_overflow(adapted, base_outputs, active)
        return torch.where(active[:, None], adapted, base_outputs)


def _without_overflow(adapted: Tensor, base: Tensor, active: Tensor) -> Tensor:
    """``active`` without the queries whose adapted outputs overflowed to NaN/inf where their
    base outputs are finite; those keep the base outputs, with a warning that says why."""
    overflowed = active & ~torch.isfinite(adapted).all(-1) & torch.isfinite(base).all(-1)
    if not bool(overflowed.any()):
        return active
    warnings.warn(
        f"local_adapt: the adapted outputs of {int(overflowed.sum())} of {active.numel()} "
        f"queries overflowed {adapted.dtype} (NaN or infinite), so they keep the head's base "
        "outputs. The keys and queries are too large for their products (Gram matrix, "
        "logits) to be represented, or the step size is: scale the head's inputs down (e.g. "
        "normalise the embedding) or lower `lr` (MbPA's `adaptation_lr`).",
        category=UserWarning,
        stacklevel=3,
    )
    return active & ~overflowed


# --------------------------------------------------------------------------- dual form


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
    with record_function("mbpa.dual.gram"):
        gram, key_dot_query = _key_products(queries, keys, valid, head.bias is not None)
        # M·diag(-lr·w) (M is symmetric, so diag(-lr·w)·M is its transpose) and (H·q)·diag(-lr·w)
        scaled_weights = -lr * weights
        move_logits = gram * (
            scaled_weights[:, :, None] if class_major else scaled_weights[:, None]
        )
        move_output = key_dot_query * scaled_weights[:, None]  # [B, 1, K]
    with record_function("mbpa.dual.neighbour_logits"):
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
    with record_function("mbpa.dual.steps"):
        for step in range(steps):
            if binary:
                torch.sigmoid(logits, out=residuals).sub_(targets)
            else:
                torch.softmax(logits, dim=class_dim, out=residuals)
                residuals.scatter_add_(class_dim, targets, minus_ones)
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
    with record_function("mbpa.dual.query_output"):
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


# ------------------------------------------------------------------------ generic form


class _HookFreeForward(nn.Module):
    """Calls ``head.forward`` directly, so that hooks on ``head`` itself are not re-entered."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head.forward(x)


def _adapt_generic(
    head: nn.Module,
    first: nn.Linear | None,
    rest: list[nn.Module],
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    valid: Tensor,
    steps: int,
    lr: float,
    beta: float,
    num_classes: int,
    dtype: torch.dtype,
    memory_budget_bytes: int,
) -> Tensor:
    """Per-query adaptation of any head with ``torch.func``, ``vmap``-ed over query chunks.

    A head that is an ``nn.Sequential`` opening with an ``nn.Linear`` keeps that layer in dual
    form, as :func:`_adapt_linear_dual` does for a whole linear head: its weight gradients are
    sums of ``g_k·h_kᵀ`` over the neighbour keys, so the adapted layer is ``W1 + Cᵀ·H`` (``b1 +
    Cᵀ·1``) with a ``[K, H1]`` coefficient ``C`` per query; its outputs on the keys are
    ``U0 + (M + 1)·C`` and a step is ``C ← keep·C - lr·∂loss/∂U``. The rest of the head is
    adapted through ``torch.func`` on those outputs. No per-query copy of ``W1`` is made.
    ``(first, rest)`` is :func:`_leading_linear`'s split of ``head``.
    """
    module = head if first is None else nn.Sequential(*rest)
    wrapper = _HookFreeForward(module)
    with torch.inference_mode(False), torch.enable_grad():
        # Inference tensors cannot be saved for backward: work on normal copies.
        slots = _tensor_slots(wrapper)
        params = {
            n: _as_normal(p.detach(), dtype)
            for n, p in wrapper.named_parameters()
            if p.is_floating_point()
        }
        fixed = {
            n: _as_normal(t.detach(), dtype if t.is_floating_point() else None)
            for n, t in [*wrapper.named_buffers(), *wrapper.named_parameters()]
            if n not in params
        }
        keys = _as_normal(keys, dtype)
        if not bool(valid.all()):
            # 0·loss(NaN) is NaN: keep padding garbage out of the masked neighbours' losses.
            keys = torch.where(valid[..., None], keys, 0.0)
        queries = _as_normal(queries, dtype)
        weights = _as_normal(weights, dtype)
        labels = _as_normal(labels, None)
        dual = first is not None

        # an in-place first layer (ReLU(inplace=True)) must not write into the caller's
        # queries and keys, nor into the inputs a gradient is taken for: it gets a copy
        copy_input = _may_write_its_input(module)

        def forward(theta: dict[str, Tensor], x: Tensor) -> Tensor:
            tensors = {**fixed, **theta}
            return functional_call(
                wrapper,
                {slot: tensors[n] for slot, n in slots.items()},
                (x.clone() if copy_input else x,),
                tie_weights=False,
            )

        def neighbour_loss(
            theta: dict[str, Tensor], inputs_q: Tensor, labels_q: Tensor, weights_q: Tensor
        ) -> Tensor:
            logits = forward(theta, inputs_q)
            if num_classes == 1:
                losses = F.binary_cross_entropy_with_logits(
                    logits[:, 0], labels_q.to(logits.dtype), reduction="none"
                )
            else:
                losses = F.cross_entropy(logits, labels_q, reduction="none")
            return (weights_q * losses).sum()

        # the gradients wrt the parameters and, for a dual first layer, wrt its outputs
        loss_grad: Callable[..., Any] = grad(neighbour_loss, argnums=(0, 1) if dual else 0)
        keep = 1.0 - beta

        def adapt_one(
            query_inputs_q: Tensor,
            inputs_q: Tensor,
            labels_q: Tensor,
            weights_q: Tensor,
            *dual_q: Tensor,
        ) -> Tensor:
            theta = dict(params)
            coef = None  # C, [K, H1], of a dual first layer
            for _ in range(steps):
                if not dual_q:
                    grads = loss_grad(theta, inputs_q, labels_q, weights_q)
                else:
                    step_inputs = (
                        inputs_q if coef is None else torch.addmm(inputs_q, dual_q[0], coef)
                    )
                    grads, input_grad = loss_grad(theta, step_inputs, labels_q, weights_q)
                    if coef is None:
                        coef = input_grad * -lr
                    else:  # C ← keep·C - lr·∂loss/∂U
                        coef = torch.add(coef if beta == 0 else coef * keep, input_grad, alpha=-lr)
                theta = {n: _sgd_pull(p, grads[n], params[n], lr, beta) for n, p in theta.items()}
            if coef is not None:
                query_inputs_q = torch.addmv(query_inputs_q, coef.T, dual_q[1])
            return forward(theta, query_inputs_q[None])[0]

        batched = vmap(adapt_one)
        num_neighbours = keys.shape[1]
        width = keys.shape[2] if first is None else first.out_features
        per_query = (
            _PARAM_COPIES_PER_QUERY * sum(p.numel() for p in params.values())
            + 4 * num_neighbours * (width + num_classes)
            + (num_neighbours * (num_neighbours + 1) if dual else 0)
        )
        chunk = _chunk_size(per_query, params, dtype, keys.device, memory_budget_bytes)
        outputs = []
        for start in range(0, keys.shape[0], chunk):
            part = slice(start, start + chunk)
            products: tuple[Tensor, ...]
            if first is None:
                inputs, query_inputs, products = keys[part], queries[part], ()
            else:  # per chunk: the first layer's outputs count against the budget too
                with torch.no_grad():
                    inputs, query_inputs, products = _first_layer(
                        first, queries[part], keys[part], valid[part], dtype
                    )
            outputs.append(batched(query_inputs, inputs, labels[part], weights[part], *products))
        return torch.cat(outputs).detach()


def _linear_head(
    head: nn.Module | None, split: tuple[nn.Linear | None, list[nn.Module]] | None = None
) -> nn.Linear | None:
    """The ``nn.Linear`` a head is (exact type), or is the only layer of, for the dual form
    (``split``: :func:`_leading_linear`'s result for ``head``, if computed already)."""
    if type(head) is nn.Linear:
        return head
    first, rest = _leading_linear(head) if split is None else split
    return first if first is not None and not rest else None


def _tensor_slots(module: nn.Module) -> dict[str, str]:
    """``{slot: name}``: one dotted name per parameter/buffer attribute of each distinct module,
    mapped to the name ``named_parameters``/``named_buffers`` give its tensor.

    ``functional_call`` swaps tensors in by name and restores them afterwards; with a module
    used twice (``nn.Sequential(layer, act, layer)``) or a tensor shared by two modules, its
    own weight tying restores the wrong tensor and leaves the module changed (torch 2.13).
    Setting each attribute of each distinct module exactly once avoids that.
    """
    canonical: dict[int, str] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        canonical.setdefault(id(t), name)
    slots: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is None or (id(sub), attr) in seen or id(t) not in canonical:
                continue
            seen.add((id(sub), attr))
            slots[f"{prefix}.{attr}" if prefix else attr] = canonical[id(t)]
    return slots


def _leading_linear(head: nn.Module | None) -> tuple[nn.Linear | None, list[nn.Module]]:
    """``(first layer, the layers after it)`` of an ``nn.Sequential`` head whose first layer
    can be adapted in dual form: a plain ``nn.Linear`` (exact type, no hooks of its own, weights
    not shared with later layers), possibly inside nested ``nn.Sequential`` containers and after
    layers that are the identity on ``[N, D]`` rows in eval mode (``nn.Identity``, ``nn.Dropout``,
    ``nn.Flatten()``). ``(None, [])`` otherwise. Hooks on ``head`` itself do not matter:
    they are never run by the adaptation. (Global hooks, ``register_module_forward_hook``,
    are not run for a layer in dual form either.)"""
    if type(head) is not nn.Sequential or "forward" in vars(head):
        return None, []
    layers = _sequential_layers(head)
    start = 0
    while start < len(layers) and _is_row_identity(layers[start]):
        start += 1
    if start == len(layers):
        return None, []
    first = layers[start]
    if type(first) is not nn.Linear or not _is_plain(first):
        return None, []
    rest = layers[start + 1 :]
    own = {id(p) for p in first.parameters()}
    if any(id(p) in own for layer in rest for p in layer.parameters()):
        return None, []
    return first, rest


def _sequential_layers(container: nn.Sequential) -> list[nn.Module]:
    """The layers of an ``nn.Sequential``, nested plain ``nn.Sequential``s flattened."""
    layers: list[nn.Module] = []
    for layer in container:
        if type(layer) is nn.Sequential and _is_plain(layer):
            layers += _sequential_layers(layer)
        else:
            layers.append(layer)
    return layers


def _is_plain(module: nn.Module) -> bool:
    """No hooks of its own and no ``forward`` patched onto the instance: calling it does
    exactly what its class's ``forward`` does."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _may_write_its_input(module: nn.Module) -> bool:
    """``False`` only where the layers that see the input run a ``torch.nn`` layer's own
    ``forward`` and do not work in place (an identity layer hands the input on to the next)."""
    layers = _sequential_layers(module) if type(module) is nn.Sequential else [module]
    for layer in layers:
        if (
            not type(layer).forward.__module__.startswith("torch.nn.modules.")
            or not _is_plain(layer)
            or getattr(layer, "inplace", False)
        ):
            return True
        if not _is_row_identity(layer):
            return False
    return False


def _is_row_identity(layer: nn.Module) -> bool:
    """A layer that returns its ``[N, D]`` input unchanged in eval mode (and is plain)."""
    if not _is_plain(layer):
        return False
    if type(layer) is nn.Flatten:
        return layer.start_dim == 1 and layer.end_dim == -1
    return type(layer) in (nn.Identity, nn.Dropout, nn.AlphaDropout)


def _first_layer(
    first: nn.Linear, queries: Tensor, keys: Tensor, valid: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Outputs of the trained first layer on the keys ``[B, K, H1]`` and queries ``[B, H1]``,
    and the :func:`_key_products` that move them (``[B, K, K]`` and ``[B, K]``)."""
    weight = first.weight.detach().to(dtype)
    bias = None if first.bias is None else first.bias.detach().to(dtype)
    gram, key_dot_query = _key_products(queries, keys, valid, bias is not None)
    key_outputs = F.linear(keys, weight, bias)
    query_outputs = F.linear(queries, weight, bias)
    return key_outputs, query_outputs, (gram, key_dot_query[:, 0, :])


def _sgd_pull(current: Tensor, gradient: Tensor, start: Tensor, lr: float, beta: float) -> Tensor:
    """``θx - lr·g - beta·(θx - θ)``, as ``lerp(θx, θ, beta) - lr·g`` in two memory passes."""
    if beta == 0 or current is start:  # at the first step θx is the shared θ
        return torch.sub(current, gradient, alpha=lr)
    return torch.lerp(current, start, beta).sub_(gradient, alpha=lr)


def _chunk_size(
    per_query: int,
    params: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    memory_budget_bytes: int,
) -> int:
    """Queries per ``vmap`` call: ``per_query`` elements each fit the budget and, on CPU, the
    chunk's copies of ``params`` stay cache-sized."""
    item = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, memory_budget_bytes // (item * per_query))
    num_params = sum(p.numel() for p in params.values())
    if device.type == "cpu" and num_params:
        # Each step streams the chunk's parameter copies several times: keeping one copy
        # cache-sized is 2-4x faster on CPU than filling the budget (GPUs want big chunks).
        chunk = min(chunk, max(1, _CPU_CHUNK_PARAM_BYTES // (item * num_params)))
    return chunk


def _as_normal(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    out = t if dtype is None else t.to(dtype)
    return out.clone() if out.is_inference() else out


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


# -------------------------------------------------------------------------- validation


def _check_arguments(
    head: nn.Module,
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    steps: int,
    lr: float,
    beta: float,
    memory_budget_bytes: int,
) -> None:
    if not isinstance(head, nn.Module):
        raise ValueError(f"`head` must be a torch.nn.Module, got {type(head).__name__}.")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite float >= 0, got {lr!r}.")
    if not _is_real(beta) or not 0 <= beta <= 1:
        raise ValueError(f"`beta` must be a float in [0, 1], got {beta!r}.")
    if (
        not isinstance(memory_budget_bytes, numbers.Integral)
        or isinstance(memory_budget_bytes, bool)
        or memory_budget_bytes < 1
    ):
        raise ValueError(f"`memory_budget_bytes` must be an int >= 1, got {memory_budget_bytes!r}.")
    for name, t in (("queries", queries), ("keys", keys), ("labels", labels), ("weights", weights)):
        if not isinstance(t, Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if queries.dim() != 2 or not queries.is_floating_point():
        raise ValueError(
            f"`queries` must be a floating-point tensor [B, D], got {_describe(queries)}."
        )
    num_queries, dim = queries.shape
    _check_shape("keys", keys, (num_queries, None, dim))
    if not keys.is_floating_point():
        raise ValueError(f"`keys` must be floating-point, got dtype {keys.dtype}.")
    _check_shape("labels", labels, (num_queries, keys.shape[1]))
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must be an integer (int64) tensor, got dtype {labels.dtype}.")
    _check_shape("weights", weights, (num_queries, keys.shape[1]))
    if not weights.is_floating_point():
        raise ValueError(f"`weights` must be floating-point, got dtype {weights.dtype}.")
    bad = ~(torch.isfinite(weights) & (weights >= 0))
    if bool(bad.any()):
        value = weights[bad][0].item()
        raise ValueError(f"`weights` must be finite and >= 0, got {value!r}.")


def _check_labels(labels: Tensor, valid: Tensor, num_classes: int) -> None:
    high = 2 if num_classes == 1 else num_classes
    bad = valid & ((labels < 0) | (labels >= high))
    if bool(bad.any()):
        allowed = (
            "{0, 1} (single-output head, binary cross-entropy)"
            if num_classes == 1
            else (f"[0, {num_classes}) for a head with {num_classes} outputs")
        )
        raise ValueError(
            f"`labels` of weighted neighbours must lie in {allowed}, got {labels[bad][0].item()}."
        )


def _check_shape(name: str, t: Tensor, expected: tuple[int | None, ...]) -> None:
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected, strict=True)
    )
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"`{name}` must have shape [{want}], got {tuple(t.shape)}.")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
