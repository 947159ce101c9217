"""Guards for what users hand MbPA that the algorithm itself does not expect.

Each guard is a small function the callback calls at one place: a training step that skipped
the head, head inputs beyond the range the memory stores keys in (float32), and neighbours whose
squared distances overflow it. Framework-free: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: The largest float32: the memory stores keys and computes distances in float32.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def skipped_training_step(captured: Sequence[object], head_has_run: bool) -> bool:
    """A training step that did not call the head after the head ran in earlier steps.

    A ``training_step`` returning ``None`` (Lightning then skips the optimizer step) or one
    that trains another part of the model for a batch has nothing to write; only a head that
    never ran is a misconfiguration.
    """
    return not captured and head_has_run


def unstorable_query_rows(queries: Tensor) -> Tensor | None:
    """``[B]`` bool: queries that hold NaN or infinity, or values beyond the float32 range
    (finite in float64) that the memory searches in; ``None`` when every query is usable."""
    rows = queries if queries.dtype == torch.float32 else queries.float()
    finite = torch.isfinite(rows).all(-1)
    return None if bool(finite.all()) else ~finite


def unstorable_queries_message(bad: Tensor, stage: str | None) -> str:
    """The warning for :func:`unstorable_query_rows`' queries, which keep the base prediction."""
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
