"""Guards for queries the adapter cannot compare with the memory.

The memory stores keys and computes distances in float32: head inputs beyond its range keep the
base prediction (:func:`~lightning_mbpa._checks.finite_rows` finds them), and so do queries whose
squared distances to their neighbours overflow it. Framework-free: no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The largest float32: the memory stores keys and computes distances in float32.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def unstorable_queries_message(bad: Tensor, stage: str | None) -> str:
    """The warning for the ``[B]`` queries ``bad`` that are not finite once in float32 (they
    keep the base prediction)."""
    return (
        f"MbPA: {int(bad.sum())} of {bad.numel()} {stage} queries hold NaN or infinite head "
        f"inputs, or values beyond the float32 range (±{FLOAT32_MAX:.4g}) in which the memory "
        "stores and searches keys; they keep the model's base prediction."
    )


def drop_overflowed_neighbours(distances: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(mask, rows)``: neighbours whose squared distance overflowed float32 masked out, and
    the ``[B]`` queries left with no neighbour by it (``None`` if there are none).

    A neighbour at an infinite distance would get a kernel weight of 0 anyway, and its key
    must not reach the Gram matrix. When every neighbour of a query overflowed, the query is
    so far from (or so large next to) the memory that its nearest keys cannot be ranked in
    float32: it keeps the base prediction, and the caller says so.
    """
    finite = torch.isfinite(distances)
    if bool(finite[mask].all()):
        return mask, None
    kept = mask & finite
    lost = mask.any(-1) & ~kept.any(-1)
    return kept, (lost if bool(lost.any()) else None)


def overflowed_neighbours_message(lost: Tensor, stage: str | None) -> str:
    """The warning for :func:`drop_overflowed_neighbours`' queries with no neighbour left."""
    return (
        f"MbPA: {int(lost.sum())} of {lost.numel()} {stage} queries keep the model's base "
        "prediction: the squared distances to their nearest memories overflow float32 (above "
        f"{FLOAT32_MAX:.4g}), so the head inputs (keys and queries) are too large to be compared. "
        "Scale the head's inputs down, e.g. normalise the embedding the head sees."
    )
