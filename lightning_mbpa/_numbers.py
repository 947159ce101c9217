"""Type tests for numbers a user passes in, shared by every module (no Lightning import)."""

from __future__ import annotations

import math
import numbers


def is_int(x: object) -> bool:
    """An integer (``int`` or a numpy integer) that is not a ``bool``."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """A finite real number (``int``, ``float`` or a numpy scalar) that is not a ``bool``."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
