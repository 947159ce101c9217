"""Output mixtures: MbPA's adapted head mixed with the base model and the memory's own vote.

Every language-modelling result of Sprechmann et al. ("Memory-based Parameter Adaptation",
ICLR 2018, arXiv:1802.10542) mixes three distributions over the vocabulary,

    p = λa·p_adapted + λb·p_base + λm·p_memory,   p_memory(y) = Σ_k w_k·[y_k = y],

where ``p_memory`` is the label distribution of a query's K neighbours under normalised weights
``w_k``. Two well-known models are special cases with ``λa = 0``: the neural cache (Grave et al.,
"Improving Neural Language Models with a Continuous Cache", ICLR 2017, arXiv:1612.04426; the
memory is the recent test history) and kNN-LM (Khandelwal et al., "Generalization through
Memorization: Nearest Neighbor Language Models", ICLR 2020, arXiv:1911.00172; the memory holds
every training token and ``w = softmax(−d/τ)`` over squared distances ``d``).

Pure torch functions, no Lightning import; :class:`~lightning_mbpa.MbPA` calls them from its head
hook when ``base_weight`` or ``memory_weight`` is set.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from lightning_mbpa.adaptation import kernel_weights

#: Log-probabilities are floored at ``log`` of float32's smallest normal number (≈ −87.34), so a
#: class that no component gives mass to (e.g. a word absent from the neighbours of a memory-only
#: model) gets a large finite loss instead of ``-inf`` (whose cross-entropy gradient is NaN).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)

# 1 − base_weight − memory_weight below this is taken as exactly 0 (float round-off of sums such
# as 1 − 0.3 − 0.7), and sums above 1 by at most this much are accepted.
_TOLERANCE = 1e-9


def mixture_weights(base_weight: float, memory_weight: float) -> tuple[float, float, float]:
    """``(λa, λb, λm)``: the adapted head's weight ``1 − base_weight − memory_weight`` and the two
    given weights, checked.

    Raises:
        ValueError: If a weight is not a real number in [0, 1] or the two sum above 1; the
            message names the argument and its value.

    Example:
        >>> mixture_weights(0.25, 0.5)
        (0.25, 0.25, 0.5)
    """
    for name, value in (("base_weight", base_weight), ("memory_weight", memory_weight)):
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(float(value))
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(f"`{name}`={value!r} is invalid: expected a float in [0, 1].")
    total = float(base_weight) + float(memory_weight)
    if total > 1.0 + _TOLERANCE:
        raise ValueError(
            f"`base_weight`={base_weight!r} and `memory_weight`={memory_weight!r} sum to "
            f"{total:g}: expected a sum of at most 1 (the adapted head gets 1 minus the sum)."
        )
    adapted = 1.0 - total
    if adapted < _TOLERANCE:
        adapted = 0.0
    return adapted, float(base_weight), float(memory_weight)


def neighbour_weights(
    distances: Tensor,
    mask: Tensor,
    *,
    kernel_eps: float = 1e-3,
    temperature: float | None = None,
) -> Tensor:
    """Normalised weights of each query's K neighbours, for ``p_memory``.

    Args:
        distances: ``[B, K]`` squared Euclidean distances (negative round-off is clamped to 0).
        mask: ``[B, K]`` bool, True for a real neighbour.
        kernel_eps: ``ε`` of MbPA's kernel ``w_k ∝ 1 / (ε + d_k)``, used when ``temperature`` is
            None.
        temperature: ``τ`` of kNN-LM's ``w = softmax(−d/τ)`` over the valid neighbours; None
            uses MbPA's kernel.

    Returns:
        ``[B, K]`` float32 (float64 for float64 distances) weights summing to 1 over each row's
        valid neighbours; masked neighbours weigh 0 and a row without any is all zeros.

    Example:
        >>> d = torch.tensor([[0.0, 1.0, 5.0]])
        >>> neighbour_weights(d, torch.tensor([[True, True, False]]), temperature=1.0)
        tensor([[0.7311, 0.2689, 0.0000]])
    """
    if distances.dim() != 2 or mask.shape != distances.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"`distances` must be [B, K] with a bool `mask` of the same shape, got "
            f"{tuple(distances.shape)} and {tuple(mask.shape)} ({mask.dtype})."
        )
    if temperature is None:
        return kernel_weights(distances, mask, kernel_eps).to(_work_dtype(distances))
    if not _positive(temperature):
        raise ValueError(f"`temperature`={temperature!r} is invalid: expected a float > 0.")
    dtype = _work_dtype(distances)
    scores = -distances.to(dtype).clamp_min(0) / float(temperature)
    scores = scores.masked_fill(~mask, -math.inf)
    any_valid = mask.any(dim=-1, keepdim=True)
    # a row without neighbours would be softmax of all −inf (NaN): give it zeros instead
    weights = torch.softmax(scores.masked_fill(~any_valid, 0.0), dim=-1)
    return torch.where(mask & any_valid, weights, torch.zeros((), dtype=dtype))


def mix_log_probs(
    base_logits: Tensor,
    *,
    base_weight: float,
    memory_weight: float,
    adapted_logits: Tensor | None = None,
    memory_weights: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """``log(λa·p_adapted + base_weight·p_base + memory_weight·p_memory)``, ``[B, C]``.

    ``λa = 1 − base_weight − memory_weight``. Computed in log space, in float32 (float64 for
    float64 logits): the dense part ``λa·p_adapted + λb·p_base`` over every class, then the
    memory's mass added at the (at most K) classes its neighbours hold; floored at
    :data:`LOG_FLOOR` (≈ −87.34) so that a class no component gives mass to stays finite.

    Args:
        base_logits: ``[B, C]`` logits of the trained head (``p_base = softmax``), C >= 2.
        base_weight: ``λb`` in [0, 1].
        memory_weight: ``λm`` in [0, 1]; ``base_weight + memory_weight <= 1``.
        adapted_logits: ``[B, C]`` logits of the adapted heads. None: ``p_adapted = p_base``
            (no adaptation steps).
        memory_weights: ``[B, K]`` normalised neighbour weights (:func:`neighbour_weights`).
            A row whose weights are all 0 (no neighbours: empty memory, all masked) uses
            ``p_base`` as its memory part. None: no neighbours for any row.
        memory_labels: ``[B, K]`` class indices of the neighbours (needed with
            ``memory_weights``).

    Returns:
        ``[B, C]`` log-probabilities of the mixture (floored as said above).

    Raises:
        ValueError: On weights outside [0, 1] or summing above 1, or mismatched shapes.

    Example:
        >>> base = torch.tensor([[0.0, 0.0]])
        >>> w, y = torch.tensor([[1.0]]), torch.tensor([[1]])
        >>> mix_log_probs(base, base_weight=0.5, memory_weight=0.5,
        ...               memory_weights=w, memory_labels=y).exp()
        tensor([[0.2500, 0.7500]])
    """
    adapted_weight, base_weight, memory_weight = mixture_weights(base_weight, memory_weight)
    if base_logits.dim() != 2 or base_logits.shape[1] < 2:
        raise ValueError(
            f"`base_logits` must be [B, C] with C >= 2 classes, got {tuple(base_logits.shape)}."
        )
    dtype = _work_dtype(base_logits)
    if adapted_logits is None:
        base_weight, adapted_weight = base_weight + adapted_weight, 0.0
    elif adapted_logits.shape != base_logits.shape:
        raise ValueError(
            f"`adapted_logits` must have the shape of `base_logits` {tuple(base_logits.shape)}, "
            f"got {tuple(adapted_logits.shape)}."
        )
    if memory_weight > 0 and memory_weights is None:
        base_weight, memory_weight = base_weight + memory_weight, 0.0
    empty = None
    if memory_weight > 0:
        assert memory_weights is not None
        if memory_labels is None or memory_weights.shape[0] != base_logits.shape[0]:
            raise ValueError(
                "`memory_weights` needs `memory_labels` of its shape, with one row per row "
                f"of `base_logits` ({base_logits.shape[0]})."
            )
        if memory_weights.dim() != 2 or memory_labels.shape != memory_weights.shape:
            raise ValueError(
                f"`memory_weights` and `memory_labels` must both be [B, K], got "
                f"{tuple(memory_weights.shape)} and {tuple(memory_labels.shape)}."
            )
        empty = ~(memory_weights > 0).any(dim=-1, keepdim=True)
    # The dense part, λa·p_adapted + λb·p_base (a row without neighbours adds its memory share
    # λm to λb), in log space; then the memory's mass, which sits on the K neighbours' labels
    # only, is added at those classes: no [B, C] memory distribution, no log of its zeros.
    # Every [B, C] tensor below is this function's own: changed in place unless autograd
    # tracks the inputs (then it may need them unchanged), so no second one is paged in.
    in_place = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (base_logits, adapted_logits, memory_weights)
    )
    mixed = None
    if adapted_weight > 0:
        assert adapted_logits is not None
        log_adapted = torch.log_softmax(adapted_logits.to(dtype), -1)
        mixed = _plus(log_adapted, math.log(adapted_weight), in_place)
    log_base_weight: Tensor | float | None = None
    if empty is not None and bool(empty.any()):
        row_weight = empty.to(dtype) * memory_weight + base_weight
        log_base_weight = row_weight.log()  # −inf where 0: no base term there
    elif base_weight > 0:
        log_base_weight = math.log(base_weight)
    if log_base_weight is not None:
        log_base = torch.log_softmax(base_logits.to(dtype), dim=-1)
        weighted_base = _plus(log_base, log_base_weight, in_place)
        if mixed is None:
            mixed = weighted_base
        elif in_place:
            mixed = torch.logaddexp(mixed, weighted_base, out=mixed)
        else:
            mixed = torch.logaddexp(mixed, weighted_base)
    if mixed is None:  # the memory alone, every row with neighbours
        mixed = torch.full(base_logits.shape, -math.inf, dtype=dtype, device=base_logits.device)
    if memory_weight > 0:
        assert memory_weights is not None and memory_labels is not None
        labels = memory_labels.long().clamp(0, base_logits.shape[1] - 1)
        # (a row without neighbours has only zero weights: its mass is 0 everywhere)
        mass, first = _mass_at_labels(labels, memory_weights.to(dtype))
        held = mass > 0  # (a masked neighbour's label may hold no mass: log 0 is avoided)
        gathered = mixed.gather(1, labels)
        log_mass = (memory_weight * torch.where(held, mass, 1.0)).log()
        at_labels = torch.where(held, torch.logaddexp(gathered, log_mass), gathered)
        # a label held by several neighbours is written once per neighbour, with equal values;
        # only its first copy carries the gradient (else it would count once per copy)
        at_labels = torch.where(first, at_labels, at_labels.detach())
        if in_place:
            mixed.scatter_(1, labels, at_labels)
        else:
            mixed = mixed.scatter(1, labels, at_labels)
    return mixed.clamp_min_(LOG_FLOOR) if in_place else mixed.clamp_min(LOG_FLOOR)


def _plus(t: Tensor, value: Tensor | float, in_place: bool) -> Tensor:
    """``t + value``, in ``t`` if ``in_place``."""
    return t.add_(value) if in_place else t + value


def _mass_at_labels(labels: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """For each of the ``[B, K]`` neighbours, the memory's mass at its label,
    ``Σ_j w_j·[y_j = y_k]``, and whether it is the first neighbour (in label order) of its
    label; by sorting each row's labels, ``O(B·K·log K)``."""
    ordered, order = labels.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1  # each sorted neighbour's label group
    totals = torch.zeros_like(weights).scatter_add(1, group, weights.gather(1, order))
    mass = torch.empty_like(weights).scatter(1, order, totals.gather(1, group))
    first = torch.empty_like(starts).scatter(1, order, starts)
    return mass, first


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _positive(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and float(value) > 0
    )
