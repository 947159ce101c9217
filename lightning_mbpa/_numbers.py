"""Type tests for numbers a user passes in, and finiteness of tensors, shared by every module
(no Lightning import)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def is_int(x: object) -> bool:
    """An integer (``int`` or a numpy integer) that is not a ``bool``."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """A finite real number (``int``, ``float`` or a numpy scalar) that is not a ``bool``."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def finite_along_last(x: Tensor) -> Tensor:
    """``torch.isfinite(x).all(-1)`` in two reductions over ``x`` (``amax``/``amin`` propagate
    NaN, and an infinite value is the row's maximum or minimum) instead of a bool copy of it."""
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1))
