"""Memory-based Parameter Adaptation (Sprechmann et al., 2018) for PyTorch Lightning.

``lightning_mbpa`` gives any Lightning classifier MbPA through one callback, :class:`MbPA`,
over two framework-free cores: the episodic memory (:class:`EpisodicMemory`) and the batched
local adaptation (:func:`local_adapt`, :func:`kernel_weights`). Attributes are imported
lazily, so ``import lightning_mbpa.memory`` does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_mbpa.adaptation import class_log_prior, kernel_weights, local_adapt
    from lightning_mbpa.callback import MbPA
    from lightning_mbpa.memory import EpisodicMemory, Neighbours
    from lightning_mbpa.mixture import mix_log_probs, neighbour_weights

_EXPORTS = {
    "EpisodicMemory": "lightning_mbpa.memory",
    "Neighbours": "lightning_mbpa.memory",
    "class_log_prior": "lightning_mbpa.adaptation",
    "kernel_weights": "lightning_mbpa.adaptation",
    "local_adapt": "lightning_mbpa.adaptation",
    "MbPA": "lightning_mbpa.callback",
    "mix_log_probs": "lightning_mbpa.mixture",
    "neighbour_weights": "lightning_mbpa.mixture",
}

__all__ = [
    "EpisodicMemory",
    "MbPA",
    "Neighbours",
    "class_log_prior",
    "kernel_weights",
    "local_adapt",
    "mix_log_probs",
    "neighbour_weights",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_mbpa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
