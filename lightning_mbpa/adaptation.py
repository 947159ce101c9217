"""Local adaptation of an output head on a query's nearest memories.

Memory-based Parameter Adaptation (MbPA; Sprechmann et al., ICLR 2018, arXiv 1802.10542)
classifies a query ``q`` with a private copy ``θx`` of the output head ``g_θ``, fitted for a
few gradient steps on the query's K nearest memories ``(h_k, y_k)`` with kernel weights
``w_k``::

    θx ← θx - lr · ∇_θx Σ_k w_k · CE(g_θx(h_k), y_k) - beta · (θx - θ)

starting from the trained ``θ``. This is gradient descent on the MAP objective of ``θx`` under
a Gaussian prior centred on ``θ`` (the ``beta`` term is the prior's pull), and ``θ`` itself is
never modified.

Two exact implementations are chosen automatically (``_dual_form`` and ``_generic_form``):

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
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mbpa._dual_form import _adapt_linear_dual_chunked
from lightning_mbpa._generic_form import _adapt_generic
from lightning_mbpa._head_layers import _leading_linear, _linear_head
from lightning_mbpa._numbers import finite_along_last, is_real

__all__ = [
    "ADAPTATION_LOSSES",
    "MIN_KERNEL_EPS",
    "class_log_prior",
    "kernel_weights",
    "local_adapt",
]

#: The losses local adaptation can minimise on the neighbours (``MbPA(adaptation_loss=...)``):
#: plain cross-entropy, or cross-entropy of the logits plus the memory's log class prior
#: (:func:`class_log_prior`), with the query predicted from the logits alone.
AdaptationLoss = Literal["cross_entropy", "logit_adjusted"]
ADAPTATION_LOSSES: tuple[str, ...] = ("cross_entropy", "logit_adjusted")

#: The smallest ``eps`` of :func:`kernel_weights` (and ``MbPA(kernel_eps=...)``): the smallest
#: normal float32, so that the weight of an exact match, ``1 / eps``, is finite in float32.
MIN_KERNEL_EPS = float(torch.finfo(torch.float32).tiny)

_DEFAULT_MEMORY_BUDGET = 256 * 2**20


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


def class_log_prior(labels: Tensor, num_classes: int) -> Tensor:
    """The log class prior of stored labels, smoothed: ``log π_c`` with
    ``π_c = (n_c + 1) / (N + C)``, ``n_c`` the labels equal to ``c`` among the ``N`` given.

    What ``MbPA(adaptation_loss="logit_adjusted")`` adds to the head's logits on the neighbours
    during local adaptation (``logit_offsets`` of :func:`local_adapt`). The ``+ 1`` keeps a class
    absent from the labels finite. For a single-output head (``num_classes == 1``, labels
    ``{0, 1}``) it is the log-odds ``log((n_1 + 1) / (n_0 + 1))``, one entry.

    Args:
        labels: Integer class indices, any shape, in ``[0, num_classes)`` (``{0, 1}`` when
            ``num_classes == 1``).
        num_classes: Outputs of the head, ``>= 1``.

    Returns:
        ``[num_classes]`` float32 tensor on ``labels``' device.

    Raises:
        ValueError: On a ``num_classes`` below 1, non-integer labels or labels out of range.

    Example:
        >>> class_log_prior(torch.tensor([0, 0, 1]), 3).exp()
        tensor([0.5000, 0.3333, 0.1667])
    """
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool):
        raise ValueError(f"`num_classes` must be an int >= 1, got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be an int >= 1, got {num_classes!r}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must be an integer tensor, got dtype {labels.dtype}.")
    flat = labels.reshape(-1).long()
    high = 2 if num_classes == 1 else num_classes
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= high):
        raise ValueError(
            f"`labels` must lie in [0, {high}) for `num_classes`={num_classes}, got values in "
            f"[{int(flat.min())}, {int(flat.max())}]."
        )
    counts = torch.bincount(flat, minlength=high).to(torch.float64) + 1.0
    log_prior = (counts / counts.sum()).log()
    if num_classes == 1:
        log_prior = log_prior[1:] - log_prior[:1]
    return log_prior.to(torch.float32)


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
    logit_offsets: Tensor | None = None,
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
        logit_offsets: Optional ``[C]`` offsets added to the head's outputs on the neighbours
            inside the loss, ``loss(head_θx(keys[b, k]) + logit_offsets, labels[b, k])``, and
            not to the queries' outputs: with the log class prior of the memory
            (:func:`class_log_prior`) this is the logit-adjusted loss (Menon et al., 2021;
            balanced softmax, Ren et al., 2020), which fits the neighbours' labels with the
            class imbalance factored out. ``None`` (the default): plain loss.

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
    if logit_offsets is not None and (
        not isinstance(logit_offsets, Tensor)
        or logit_offsets.dim() != 1
        or not logit_offsets.is_floating_point()
        or not bool(torch.isfinite(logit_offsets).all())
    ):
        raise ValueError(
            "`logit_offsets` must be a finite floating-point tensor [C] or None, got "
            f"{_describe(logit_offsets)}."
        )
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
        if logit_offsets is not None:
            _check_shape("logit_offsets", logit_offsets, (num_classes,))
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
        offsets = None if logit_offsets is None else logit_offsets.to(queries.device, compute_dtype)
        if dual:
            assert linear is not None  # dual form only for a Linear head
            with torch.no_grad():
                if offsets is not None:
                    # the dual steps move the neighbours' logits by amounts that depend only on
                    # their softmax: starting them from `outputs + offsets` is the adjusted loss
                    if neighbour_outputs is None:
                        neighbour_outputs = _linear_outputs(linear, keys, compute_dtype)
                    neighbour_outputs = neighbour_outputs.to(compute_dtype) + offsets
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
                offsets,
            )
        adapted = adapted.to(base_outputs.dtype)
        active = _without_overflow(adapted, base_outputs, active)
        return torch.where(active[:, None], adapted, base_outputs)


def _linear_outputs(linear: nn.Linear, keys: Tensor, dtype: torch.dtype) -> Tensor:
    """The trained linear head's outputs on the neighbour keys ``[B, K, C]``, in ``dtype``."""
    weight = linear.weight.detach().to(dtype)
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    return torch.nn.functional.linear(keys.to(dtype), weight, bias)


def _without_overflow(adapted: Tensor, base: Tensor, active: Tensor) -> Tensor:
    """``active`` without the queries whose adapted outputs overflowed to NaN/inf where their
    base outputs are finite; those keep the base outputs, with a warning that says why."""
    overflowed = active & ~finite_along_last(adapted)
    if not bool(overflowed.any()):
        return active
    overflowed &= finite_along_last(base)
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
    if not is_real(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite float >= 0, got {lr!r}.")
    if not is_real(beta) or not 0 <= beta <= 1:
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
