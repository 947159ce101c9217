"""Input checks of :class:`~lightning_mbpa.memory.EpisodicMemory`: every one raises before anything
changes.

One idea: turn what a caller hands the memory (constructor arguments, keys and labels, payloads,
queries, a state dict) into validated values, or a ``ValueError`` naming the argument, the value
given and what is allowed. Nothing here holds state or mutates a memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lightning_mbpa._faiss_index import _check_index_syntax, _LiveRowIndex
from lightning_mbpa._numbers import is_int

Eviction = Literal["fifo", "reservoir", "class_balanced"]
Backend = Literal["auto", "faiss", "torch"]
EVICTIONS: tuple[str, ...] = get_args(Eviction)
BACKENDS: tuple[str, ...] = get_args(Backend)

#: The index string meaning exact search over the key buffer itself (no faiss index object).
EXACT_INDEX = "Flat"
#: The keys :meth:`EpisodicMemory.state_dict` returns.
STATE_KEYS = ("keys", "values", "capacity", "dim", "cursor", "num_seen", "generator_state")
#: Optional entry of :meth:`EpisodicMemory.state_dict`: the per-entry payload tensors by name.
PAYLOAD_KEY = "payload"
#: Optional entry of :meth:`EpisodicMemory.state_dict` (class-balanced eviction): ``[len]`` int64,
#: when each slot was written (its row's 0-based count over all writes).
INSERTED_KEY = "inserted"


def check_config(
    capacity: int,
    dim: int | None,
    eviction: str,
    index: str,
    backend: str,
    seed: int,
    device: torch.device | str | None,
    index_params: str,
) -> torch.device:
    """Checks the constructor arguments of a memory; returns the resolved device."""
    if not is_int(capacity) or capacity < 1:
        raise ValueError(f"`capacity` must be an integer >= 1; got {capacity!r}.")
    if dim is not None and (not is_int(dim) or dim < 1):
        raise ValueError(
            f"`dim` must be None (fixed by the first write) or an integer >= 1; got {dim!r}."
        )
    if eviction not in EVICTIONS:
        raise ValueError(f"`eviction` must be one of {EVICTIONS}; got {eviction!r}.")
    if not isinstance(index, str) or not index.strip():
        raise ValueError(
            f"`index` must be {EXACT_INDEX!r} (exact) or a faiss index_factory string such as"
            f" 'HNSW32' or 'IVF256,Flat'; got {index!r}."
        )
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    if not is_int(seed):
        raise ValueError(f"`seed` must be an integer; got {seed!r}.")
    if not isinstance(index_params, str):
        raise ValueError(
            f"`index_params` must be a faiss ParameterSpace string such as 'nprobe=16'; got {index_params!r}."
        )
    try:
        target = resolve_device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"`device` must be None or a torch device such as 'cpu' or 'cuda:0'; got {device!r} ({exc})."
        ) from exc
    exact = index == EXACT_INDEX
    if not exact and backend == "torch":
        raise ValueError(
            f"`index`={index!r} is an approximate faiss index, which needs `backend`='faiss' or"
            f" 'auto'; `backend`='torch' only supports `index`={EXACT_INDEX!r} (exact search)."
        )
    if index_params and exact:
        raise ValueError(
            f"`index_params`={index_params!r} only applies to an approximate index; `index` is"
            f" {EXACT_INDEX!r} (exact search has no parameters)."
        )
    if target.type != "cpu" and (backend == "faiss" or not exact):
        raise ValueError(
            f"`device`={str(target)!r} needs the torch backend with `index`={EXACT_INDEX!r}; got"
            f" `backend`={backend!r}, `index`={index!r}, which keep the storage on the CPU."
        )
    if not exact:
        if dim is None:
            _check_index_syntax(index, index_params)
        else:
            _LiveRowIndex(index, int(dim), index_params, int(capacity))  # validates eagerly
    return target


@dataclass(slots=True)
class CheckedRows:
    """Rows that passed :meth:`EpisodicMemory.check_rows`: what :meth:`EpisodicMemory.add_checked`
    writes without looking at the data again.

    Attributes:
        keys: ``[N, D]`` float32, detached.
        values: ``[N]`` int64 labels, detached.
        norms: ``[N]`` float32 squared key norms (numpy) for CPU storage, else None.
        finite: Whether every key is finite as float32.
        low, high: The smallest and largest label (``0`` and ``-1`` when ``N == 0``). A memory
            writes only rows with ``low >= 0``; a caller may drop rows first
            (:meth:`select`), e.g. those labelled with an ignore index.
        payload: Per-row tensors ``[N, ...]`` by name, checked against the memory's payload.
        listed: The labels as a Python list when the check made one (short CPU label tensors),
            else None.
    """

    keys: Tensor
    values: Tensor
    norms: npt.NDArray[np.float32] | None
    finite: bool
    low: int
    high: int
    payload: Mapping[str, Tensor] | None = None
    listed: list[int] | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def select(self, keep: Tensor) -> CheckedRows:
        """The rows where ``keep`` (``[N]`` bool) holds, with their flags recomputed."""
        keys = self.keys[keep.to(self.keys.device)]
        values = self.values[keep.to(self.values.device)]
        norms = None if self.norms is None else self.norms[keep.cpu().numpy()]
        payload = None
        if self.payload is not None:
            payload = {name: t[keep.to(t.device)] for name, t in self.payload.items()}
        low, high, listed = label_bounds(values)
        finite = keys_are_finite(keys, norms)
        return CheckedRows(keys, values, norms, finite, low, high, payload, listed)

    def problem(self) -> str | None:
        """Why a memory must not write these rows (non-finite keys, negative labels), or None."""
        if not self.finite:
            return "`keys` must be finite (as float32); got NaN or infinite values."
        if self.low < 0:
            bad = self.values[self.values < 0][:3].tolist()
            return f"`values` must be non-negative labels; got {bad}."
        return None


def common_rows(keys: Tensor, values: Tensor, dim: int | None) -> CheckedRows | None:
    """The checked rows of the common write, every training batch's: CPU float32 keys
    ``[N, D]`` (``0 < N <= 1024``, of width ``dim`` unless None, without grad) and ``[N]`` int64
    CPU labels, measured in one pass each without norms (the pending buffer computes them in
    bulk); None for anything else, which :func:`check_rows` then checks in full."""
    if (
        type(keys) is Tensor
        and type(values) is Tensor
        and keys.dtype is torch.float32
        and values.dtype is torch.int64
        and keys.is_cpu
        and values.is_cpu
        and not keys.requires_grad
    ):
        shape = keys.shape
        n = shape[0]
        if (
            0 < n <= 1024
            and len(shape) == 2
            and shape[1]
            and (dim is None or shape[1] == dim)
            and values.shape == shape[:1]
        ):
            as_list = values.tolist()
            finite = all_finite(keys)
            low, high = min(as_list), max(as_list)
            return CheckedRows(keys, values, None, finite, low, high, None, as_list)
    return None


def check_rows(
    keys: Tensor, values: Tensor, dim: int | None, on_cpu: bool, norms: bool = True
) -> CheckedRows:
    """Keys and labels as :class:`CheckedRows`: types, shapes and integral labels are checked
    here (``ValueError``); finiteness and the label range are measured, in one pass over each
    tensor, and left to the caller (``CheckedRows.problem``).

    With ``norms`` (and CPU storage) the squared key norms are computed, and double as the
    finiteness check: a NaN or inf key makes its norm non-finite. Without, one dot product over
    the keys decides it (rows for the pending buffer, whose norms are computed in bulk)."""
    if not norms:
        rows = common_rows(keys, values, dim)
        if rows is not None:
            return rows
    if not isinstance(keys, Tensor):
        raise ValueError(f"`keys` must be a torch.Tensor; got {type(keys).__name__}.")
    if not isinstance(values, Tensor):
        raise ValueError(f"`values` must be a torch.Tensor; got {type(values).__name__}.")
    shape = keys.shape
    if len(shape) != 2 or (dim is not None and shape[1] != dim):
        width = "D" if dim is None else str(dim)
        raise ValueError(
            f"`keys` must have shape [N, {width}] (the memory's key width); got shape {tuple(shape)}."
        )
    if shape[1] == 0:
        raise ValueError(f"`keys` must have at least one column; got shape {tuple(shape)}.")
    if keys.dtype is not torch.float32 and (keys.dtype == torch.bool or keys.is_complex()):
        raise ValueError(f"`keys` must be real-valued; got dtype {keys.dtype}.")
    if values.dim() != 1 or values.shape[0] != shape[0]:
        raise ValueError(
            f"`values` must have shape [N] with N = {shape[0]} (the number of keys); got shape"
            f" {tuple(values.shape)}."
        )
    labels = values  # integer tensors never require grad
    if labels.dtype is not torch.int64:
        labels = labels.detach()
        if labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"`values` must be integer labels; got dtype {labels.dtype}.")
        if labels.is_floating_point():
            ok = torch.isfinite(labels) & (labels == labels.floor()) & (labels < 2.0**63)
            if not bool(ok.all()):
                bad = labels[~ok][:3].tolist()
                raise ValueError(
                    f"`values` must be integer labels; got non-integral values such as {bad}."
                )
        labels = labels.to(torch.int64)
    keys32 = keys.detach() if keys.requires_grad else keys
    if keys32.dtype is not torch.float32:
        keys32 = keys32.to(torch.float32)
    squares = None
    if on_cpu:
        if not keys32.is_cpu:
            keys32 = keys32.cpu()
        if not labels.is_cpu:
            labels = labels.cpu()
        if norms:
            keys_np = keys32.numpy()
            squares = np.einsum("nd,nd->n", keys_np, keys_np)
    low, high, listed = label_bounds(labels)
    finite = keys_are_finite(keys32, squares)
    return CheckedRows(keys32, labels, squares, finite, low, high, None, listed)


def label_bounds(labels: Tensor) -> tuple[int, int, list[int] | None]:
    """``(min, max, the labels as a list or None)`` of int64 labels, ``(0, -1, [])`` when
    there are none (one pass, one sync)."""
    n = labels.shape[0]
    if n == 0:
        return 0, -1, []
    if labels.is_cpu:
        if n <= 1024:  # Python on a short list beats two numpy reductions
            listed = labels.tolist()
            return min(listed), max(listed), listed
        array = labels.numpy()
        return int(array.min()), int(array.max()), None
    low, high = torch.aminmax(labels)
    return int(low), int(high), None


def keys_are_finite(keys32: Tensor, norms: npt.NDArray[np.float32] | None) -> bool:
    """Whether float32 keys hold no NaN/inf: from their squared norms when given (a sum that
    overflows falls back to the element-wise check)."""
    if norms is not None:  # a finite norm proves its row finite (`isfinite`: no overflow warning)
        return bool(np.isfinite(norms).all()) or all_finite(keys32)
    return all_finite(keys32)


def check_keys_and_labels(
    keys: Tensor, values: Tensor, dim: int | None, on_cpu: bool
) -> tuple[Tensor, Tensor, npt.NDArray[np.float32] | None]:
    """Validated ``(keys as float32, labels as int64, squared key norms)``; raises for
    non-finite keys and negative labels too."""
    rows = check_rows(keys, values, dim, on_cpu)
    problem = rows.problem()
    if problem is not None:
        raise ValueError(problem)
    return rows.keys, rows.values, rows.norms


def check_payload(
    payload: Mapping[str, Tensor] | None, n: int, stored: Mapping[str, Tensor] | None, size: int
) -> None:
    """Raises if ``payload`` (``n`` rows) does not fit the ``stored`` payload buffers of a memory
    holding ``size`` entries (None: the memory stores no payload)."""
    if payload is None:
        if stored is not None:
            raise ValueError(
                f"`payload` is required: this memory stores a payload with every entry (names"
                f" {sorted(stored)}); clear() it to store entries without one."
            )
        return
    check_payload_rows(payload, n, "`payload", f"N = {n} rows (one per key)")
    if stored is None:
        if size > 0:
            raise ValueError(
                f"`payload` cannot be added to a memory that already holds {size} entries"
                " without one; clear() it first."
            )
        return
    if set(payload) != set(stored):
        raise ValueError(
            f"`payload` must have the names {sorted(stored)} of the stored payload; got"
            f" {sorted(payload)}."
        )
    for name, tensor in payload.items():
        buffer = stored[name]
        if tensor.shape[1:] != buffer.shape[1:] or tensor.dtype != buffer.dtype:
            raise ValueError(
                f"`payload[{name!r}]` must have rows of shape {tuple(buffer.shape[1:])} and dtype"
                f" {buffer.dtype} like the stored payload; got {tuple(tensor.shape[1:])},"
                f" {tensor.dtype}."
            )


def check_payload_rows(payload: Any, n: int, label: str, rows: str) -> None:
    """``payload`` is a non-empty mapping of str names to tensors of ``n`` rows each."""
    if not isinstance(payload, Mapping) or not payload:
        raise ValueError(
            f"{label}` must be a non-empty mapping from names to tensors; got"
            f" {type(payload).__name__}."
        )
    for name, tensor in payload.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor) or tensor.ndim < 1:
            raise ValueError(
                f"{label}[{name!r}]` must be a tensor of one row per entry under a str name;"
                f" got {describe_tensor(tensor)}."
            )
        if tensor.shape[0] != n:
            raise ValueError(
                f"{label}[{name!r}]` must have {rows}; got shape {tuple(tensor.shape)}."
            )


def check_key_update(
    slots: Tensor, keys: Tensor, size: int, dim: int | None, on_cpu: bool
) -> tuple[npt.NDArray[np.int64], Tensor, npt.NDArray[np.float32] | None]:
    """Validated ``(slots, keys as float32, squared key norms)`` of a key update: distinct filled
    slots and one finite key of the memory's width per slot."""
    slots_np = check_slots(slots, size)
    if not isinstance(keys, Tensor) or keys.ndim != 2 or keys.shape[0] != slots_np.size:
        raise ValueError(
            f"`keys` must have shape [{slots_np.size}, {dim}] (one row per slot); got"
            f" {describe_tensor(keys)}."
        )
    labels = torch.zeros(keys.shape[0], dtype=torch.int64)
    keys32, _, norms = check_keys_and_labels(keys, labels, dim, on_cpu)
    return slots_np, keys32, norms


def check_slots(slots: Tensor, size: int) -> npt.NDArray[np.int64]:
    """``slots`` as distinct int64 slot numbers of filled entries (``0 <= slot < size``)."""
    if not isinstance(slots, Tensor) or slots.ndim != 1 or slots.is_floating_point():
        raise ValueError(f"`slots` must be a 1-D integer tensor; got {describe_tensor(slots)}.")
    if slots.dtype == torch.bool or slots.is_complex():
        raise ValueError(f"`slots` must be integer slot numbers; got dtype {slots.dtype}.")
    slots_np: npt.NDArray[np.int64] = slots.detach().cpu().numpy().astype(np.int64, copy=False)
    if slots_np.size and (slots_np.min() < 0 or slots_np.max() >= size):
        raise ValueError(
            f"`slots` must lie in [0, {size}) (the filled slots); got values in "
            f"[{slots_np.min()}, {slots_np.max()}]."
        )
    if np.unique(slots_np).size != slots_np.size:
        raise ValueError("`slots` must be distinct; got repeated slots.")
    return slots_np


def check_queries(queries: Tensor, k: int, dim: int | None) -> Tensor:
    """The queries as a contiguous, detached float32 tensor, after checking them and ``k``."""
    if not is_int(k) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1; got {k!r}.")
    if not isinstance(queries, Tensor):
        raise ValueError(f"`queries` must be a torch.Tensor; got {type(queries).__name__}.")
    width = "D" if dim is None else str(dim)
    if queries.ndim != 2 or (dim is not None and queries.shape[1] != dim):
        raise ValueError(
            f"`queries` must have shape [B, {width}] (the memory's key width); got shape"
            f" {tuple(queries.shape)}."
        )
    if not queries.is_floating_point():
        raise ValueError(f"`queries` must be floating point; got dtype {queries.dtype}.")
    q32 = queries.detach().to(torch.float32).contiguous()
    if not all_finite(q32):
        raise ValueError("`queries` must be finite; got NaN or infinite values.")
    return q32


@dataclass(frozen=True)
class CheckedState:
    """A :meth:`EpisodicMemory.state_dict` that passed :func:`check_state`."""

    dim: int  # -1: not fixed
    size: int
    num_seen: int
    keys: Tensor
    values: Tensor
    generator: torch.Generator
    payload: Mapping[str, Tensor] | None
    inserted: Tensor | None = None


def check_state(state: Any, capacity: int, dim: int | None) -> CheckedState:
    """Checks a state dict against a memory of ``capacity`` and fixed ``dim`` (None: not fixed)."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"`state` must be a mapping from {STATE_KEYS}; got {type(state).__name__}."
        )
    missing = [key for key in STATE_KEYS if key not in state]
    unexpected = [key for key in state if key not in (*STATE_KEYS, PAYLOAD_KEY, INSERTED_KEY)]
    if missing or unexpected:
        raise ValueError(
            f"`state` must hold exactly {STATE_KEYS} (and optionally {PAYLOAD_KEY!r}, "
            f"{INSERTED_KEY!r}); missing"
            f" {missing}, unexpected {unexpected}."
        )
    for key in STATE_KEYS:
        if not isinstance(state[key], Tensor):
            raise ValueError(f"`state[{key!r}]` must be a tensor; got {type(state[key]).__name__}.")
    scalars = {}
    for key in ("capacity", "dim", "cursor", "num_seen"):
        t = state[key]
        if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"`state[{key!r}]` must be an integer scalar tensor; got dtype {t.dtype}, shape {tuple(t.shape)}."
            )
        scalars[key] = int(t.item())
    stored_capacity, stored_dim, cursor, num_seen = (
        scalars[k] for k in ("capacity", "dim", "cursor", "num_seen")
    )
    if stored_capacity != capacity:
        raise ValueError(
            f"`state['capacity']`={stored_capacity} differs from this memory's capacity={capacity};"
            f" construct the memory with capacity={stored_capacity} to load it."
        )
    if stored_dim != -1 and stored_dim < 1:
        raise ValueError(f"`state['dim']` must be -1 (not fixed) or >= 1; got {stored_dim}.")
    if dim is not None and stored_dim not in (-1, dim):
        raise ValueError(f"`state['dim']`={stored_dim} differs from this memory's fixed dim={dim}.")
    if num_seen < 0:
        raise ValueError(f"`state['num_seen']` must be >= 0; got {num_seen}.")
    size = min(num_seen, capacity)
    if cursor != num_seen % capacity:
        raise ValueError(
            f"`state['cursor']`={cursor} is inconsistent with num_seen={num_seen} and capacity={capacity}"
            f" (expected {num_seen % capacity})."
        )
    keys, values = state["keys"], state["values"]
    width = stored_dim if stored_dim != -1 else (dim if dim is not None else "D")
    if (
        keys.dtype != torch.float32
        or keys.ndim != 2
        or keys.shape[0] != size
        or (stored_dim != -1 and keys.shape[1] != stored_dim)
    ):
        raise ValueError(
            f"`state['keys']` must be float32 of shape [{size}, {width}] (len = min(num_seen, capacity));"
            f" got {keys.dtype} of shape {tuple(keys.shape)}."
        )
    if stored_dim == -1 and size > 0:
        raise ValueError(f"`state['dim']` is -1 (not fixed) but the state holds {size} keys.")
    if values.dtype != torch.int64 or values.shape != (size,):
        raise ValueError(
            f"`state['values']` must be int64 of shape [{size}]; got {values.dtype} of shape {tuple(values.shape)}."
        )
    if size and not all_finite(keys):
        raise ValueError("`state['keys']` must be finite; got NaN or infinite values.")
    if size and bool((values < 0).any()):
        raise ValueError("`state['values']` must be non-negative labels; got negative values.")
    generator = torch.Generator()
    try:
        generator.set_state(state["generator_state"].detach().cpu())
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"`state['generator_state']` is not a CPU torch.Generator state: {exc}"
        ) from exc
    payload = state.get(PAYLOAD_KEY)
    if payload is not None:
        check_payload_rows(
            payload,
            size,
            f"`state[{PAYLOAD_KEY!r}]",
            f"{size} rows (len = min(num_seen, capacity))",
        )
    inserted = state.get(INSERTED_KEY)
    if inserted is not None:
        ok = isinstance(inserted, Tensor) and inserted.dtype == torch.int64
        ok = ok and inserted.shape == (size,)
        if ok and size:
            ticks = inserted.detach().cpu()
            ok = bool((ticks >= 0).all()) and bool((ticks < num_seen).all())
            ok = ok and int(torch.unique(ticks).numel()) == size
        if not ok:
            raise ValueError(
                f"`state[{INSERTED_KEY!r}]` must be int64 of shape [{size}] holding distinct "
                f"write counts in [0, num_seen={num_seen}); got {describe_tensor(inserted)}."
            )
    return CheckedState(stored_dim, size, num_seen, keys, values, generator, payload, inserted)


def squared_norms_np(keys: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``|h|²`` of each row, in float32."""
    norms: npt.NDArray[np.float32] = np.einsum("nd,nd->n", keys, keys)
    return norms


#: Sizes up to which OpenBLAS runs a dot product on one thread (above it, on its own threads).
_ONE_THREAD_DOT = 10_000


def all_finite(x: Tensor) -> bool:
    """Whether a float tensor holds no NaN/inf (numpy on the CPU: no OpenMP region)."""
    if x.is_cpu:
        a = x.numpy()
        if a.size <= _ONE_THREAD_DOT:
            # One BLAS dot of the values with themselves (the cheapest call between two
            # training steps: it reads them once): a NaN or inf makes it non-finite, and a
            # finite sum of squares proves every value finite. Only squares that overflow need
            # the element-wise check. `vdot`, unlike `dot`, `sum` and the ufuncs, leaves numpy's
            # floating-point error handling alone: huge finite values warn or raise nowhere.
            flat = a.reshape(-1)
            return math.isfinite(np.vdot(flat, flat)) or bool(np.isfinite(a).all())
        return bool(np.isfinite(a).all())
    return bool(torch.isfinite(x).all())


def any_negative(x: Tensor) -> bool:
    """Whether a real tensor holds a value < 0 (numpy on the CPU: a few µs less per write)."""
    if x.device.type == "cpu" and x.numel():
        return bool(x.numpy().min() < 0)
    return bool((x < 0).any())


def describe_tensor(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def resolve_device(device: torch.device | str | None) -> torch.device:
    target = torch.device("cpu") if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())
    return target
