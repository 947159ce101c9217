"""Finding labels and model inputs in arbitrary batches, with no user code.

MbPA writes ``(embedding, label)`` pairs during training; the embedding comes from a hook on
the head, the label from the batch. Batches come in many shapes (tuples, dicts, NamedTuples,
dataclasses, plain objects with attributes), so the look-up here follows the conventions most
Lightning data pipelines use.
Framework-free: no Lightning import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

#: Names under which a batch carries its labels (matched case-insensitively).
LABEL_NAMES: tuple[str, ...] = ("y", "label", "labels", "target", "targets")


def _fields(batch: Any) -> dict[str, Any] | None:
    """The named fields of a NamedTuple or dataclass instance, else ``None``."""
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return dict(zip(batch._fields, batch, strict=False))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return None


def _attributes(batch: Any) -> dict[str, Any] | None:
    """The public instance attributes of a plain object (a custom batch class), else ``None``.

    Tensors, containers, strings, numbers and classes are not plain objects; attributes whose
    name starts with ``_`` are left out.
    """
    if isinstance(batch, (Tensor, Mapping, tuple, list, str, bytes, int, float, type)):
        return None
    names: list[str] = list(getattr(batch, "__dict__", {}))
    for cls in type(batch).__mro__:
        slots = vars(cls).get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    found = {
        name: getattr(batch, name)
        for name in dict.fromkeys(names)
        if not name.startswith("_") and hasattr(batch, name)
    }
    return found or None


def _records(batch: Any) -> dict[str, Any] | None:
    """The named fields of a NamedTuple or dataclass, or the attributes of a plain object."""
    named = _fields(batch)
    return named if named is not None else _attributes(batch)


def _named(batch: Any) -> dict[str, Any] | None:
    if isinstance(batch, Mapping):
        return {str(key): value for key, value in batch.items()}
    return _records(batch)


def find_label_name(batch: Any, label_key: str | int | None = None) -> str | int | None:
    """The key, field name or position under which ``batch`` holds its labels, or ``None``."""
    if label_key is not None:
        return label_key
    named = _named(batch)
    if named is not None:
        lowered = {name.lower(): name for name in named}
        for candidate in LABEL_NAMES:
            if candidate in lowered:
                return lowered[candidate]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return 1
    return None


def get_item(batch: Any, key: str | int) -> Any:
    """``batch[key]`` for sequences and mappings, ``getattr(batch, key)`` for records
    (NamedTuples, dataclasses and plain objects with attributes).

    Raises:
        KeyError: when the batch has no such item.
    """
    if isinstance(batch, Mapping):
        if key in batch:
            return batch[key]
        raise KeyError(key)
    if isinstance(key, int):
        if isinstance(batch, (tuple, list)) and -len(batch) <= key < len(batch):
            return batch[key]
        raise KeyError(key)
    named = _records(batch)
    if named is not None and key in named:
        return named[key]
    if not isinstance(batch, (Tensor, tuple, list, str, bytes)):
        # an object that serves attributes dynamically (``__getattr__``, properties)
        try:
            return getattr(batch, key)
        except AttributeError:
            pass
    raise KeyError(key)


def describe(batch: Any, depth: int = 0) -> str:
    """A short, human-readable description of a batch's structure for error messages."""
    if isinstance(batch, Tensor):
        return f"Tensor(shape={tuple(batch.shape)}, dtype={batch.dtype})"
    if depth > 2:
        return type(batch).__name__
    named = _named(batch)
    if named is not None:
        inner = ", ".join(
            f"{name!r}: {describe(value, depth + 1)}" for name, value in named.items()
        )
        return f"{type(batch).__name__}({inner})"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe(value, depth + 1) for value in batch[:8])
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__}[{inner}{more}]"
    return f"{type(batch).__name__}"


def as_label_tensor(labels: Any, argument: str = "labels") -> Tensor:
    """Turn labels into an int64 tensor: ``[B, 1]`` is squeezed and integral floats are cast.

    Raises:
        ValueError: for labels that are not integers (naming ``argument``).
    """
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"`{argument}` must be integer class labels, got {type(labels).__name__}: {err}"
            ) from err
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"`{argument}` must be integer class labels, got dtype {labels.dtype}.")
    if labels.is_floating_point():
        finite = torch.isfinite(labels)
        if not bool(finite.all()) or not bool((labels == labels.round()).all()):
            bad = labels[~finite | (labels != labels.round())].flatten()[:5].tolist()
            raise ValueError(
                f"`{argument}` must be integer class labels; got non-integral values {bad} "
                f"(dtype {labels.dtype})."
            )
    labels = labels.long()
    if labels.dim() >= 2 and labels.shape[-1] == 1:
        labels = labels.squeeze(-1)
    return labels


def slice_inputs(batch: Any, label_name: str | int | None) -> Any:
    """A batch without its labels: what the model's ``forward`` takes.

    A tuple/list gives its first element (its second when the labels are first), a mapping the mapping without its label key, a
    NamedTuple/dataclass its first non-label field (a plain object its first non-label
    attribute), a tensor itself.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != label_name}
    named = _records(batch)
    if named is not None:
        for name, value in named.items():
            if name != label_name:
                return value
        raise ValueError(f"The batch {describe(batch)} has no field besides its labels.")
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        first_is_label = isinstance(label_name, int) and label_name % len(batch) == 0
        if first_is_label and len(batch) >= 2:  # `(y, x)` with `label_key=0`
            return batch[1]
        return batch[0]
    raise ValueError(f"Cannot find model inputs in a batch of type {describe(batch)}.")


def split_inputs(inputs: Any, batch_size: int) -> tuple[list[Tensor], str]:
    """Per-example tensors of a model input: its tensor leaves and their structure.

    ``inputs`` is a tensor, or tuples, lists and mappings (string keys) of tensors, nested; every
    tensor must have ``batch_size`` rows (one per example). Returns the leaves in
    ``torch.utils._pytree`` order and the structure as a JSON string (storable in a
    ``weights_only`` checkpoint); :func:`join_inputs` puts them back together.

    Raises:
        ValueError: a leaf that is not a tensor, a tensor without ``batch_size`` rows, or a
            container whose structure cannot be stored (e.g. a NamedTuple).
    """
    leaves, spec = pytree.tree_flatten(inputs)
    if not leaves:
        raise ValueError(f"the inputs {describe(inputs)} hold no tensor.")
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise ValueError(
                f"the inputs {describe(inputs)} hold a {type(leaf).__name__}; only tensors can be "
                "sliced per example."
            )
        if leaf.dim() == 0 or leaf.shape[0] != batch_size:
            raise ValueError(
                f"the inputs {describe(inputs)} hold a tensor of shape {tuple(leaf.shape)}; every "
                f"tensor needs one row per example ({batch_size})."
            )
    try:
        structure = pytree.treespec_dumps(spec)
    except (TypeError, NotImplementedError) as err:
        raise ValueError(
            f"the structure of the inputs {describe(inputs)} cannot be stored ({err}); use "
            "tensors in tuples, lists or dicts."
        ) from err
    return leaves, structure


def join_inputs(leaves: list[Tensor], structure: str) -> Any:
    """The model input from :func:`split_inputs`' leaves (any number of rows) and structure."""
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(structure))
