"""Small checks shared by the callback's parts: argument types, labels, finite keys.

Framework-free apart from the exception type the callback raises for configuration errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa._numbers import finite_along_last

#: Labels to skip (torch ``cross_entropy``'s ``ignore_index``).
IGNORE_INDEX = -100


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the callback's configuration error for argument ``name`` unless ``ok``."""
    if not ok:
        raise MisconfigurationException(f"MbPA(`{name}`={value!r}) is invalid: expected {allowed}.")


def sentence(err: BaseException) -> str:
    """An error's message ending with a full stop, to be followed by another sentence."""
    text = str(err).rstrip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def finite_rows(keys: Tensor) -> Tensor:
    """``[N]`` bool: rows that are finite, also once stored as float32."""
    return finite_along_last(keys.float() if keys.dtype == torch.float64 else keys)


def small_cpu(values: Tensor) -> bool:
    """A CPU tensor small enough that Python on ``tolist()`` beats tensor ops (~10 µs each
    between two training steps, when caches are cold)."""
    return values.device.type == "cpu" and values.numel() <= 1024


def keys_finite(keys: Tensor) -> bool:
    """``finite_rows(keys).all()``, in one reduction when it holds (run for every batch): a NaN
    or inf anywhere makes the sum non-finite; only a sum that overflows needs the row check."""
    keys = keys if keys.dtype == torch.float32 else keys.float()
    return math.isfinite(keys.sum().item()) or bool(torch.isfinite(keys).all())


def labels_outside(values: Tensor, classes: int | None) -> tuple[str, list[int]] | None:
    """``(what the labels must be, up to 5 offending values)`` if the head cannot predict some.

    >>> labels_outside(torch.tensor([0, 3, 5]), 4)
    ('class indices in [0, 4) (4 outputs)', [5])
    >>> labels_outside(torch.tensor([0, 1]), 1) is None  # one logit: binary labels
    True
    """
    high = None if classes is None else (2 if classes == 1 else classes)
    if values.numel() == 0:
        return None
    if small_cpu(values) and not values.is_floating_point():  # every batch: no tensor ops
        listed = values.tolist()
        if min(listed) >= 0 and (high is None or max(listed) < high):
            return None
    bad = values < 0 if high is None else (values < 0) | (values >= high)
    if not bool(bad.any()):
        return None
    if high is None:
        return "non-negative class indices", values[bad].unique()[:5].tolist()
    outputs = f"{classes} output{'s' if classes != 1 else ''}"
    return f"class indices in [0, {high}) ({outputs})", values[bad].unique()[:5].tolist()
