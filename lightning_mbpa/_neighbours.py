"""From candidate slots to :class:`Neighbours`: gathered keys, labels and exact distances.

One idea: whatever ranked the candidates (the torch or faiss exact kernel, an approximate faiss
index), the neighbours handed back are read from the stored keys and labels, their squared
distances recomputed exactly as ``||q - h||²`` (a difference: exact for duplicates, unlike
``|q|² + |h|² - 2 q·h``), sorted ascending and padded to ``k`` with masked columns.
:func:`nearest` is a memory's whole search: candidates from its approximate index or exact
kernel, then gathered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lightning_mbpa._profiling import phase

if TYPE_CHECKING:
    from lightning_mbpa._exact_search import ExactSearch
    from lightning_mbpa._faiss_index import _LiveRowIndex
    from lightning_mbpa._storage import KeyStore

Int64Array = npt.NDArray[np.int64]


class Neighbours(NamedTuple):
    """The K nearest memories of each query, as returned by :meth:`EpisodicMemory.search`.

    Every field has ``k`` columns; where the memory holds fewer than ``k`` usable entries the
    missing columns are masked (``mask`` False) and hold the fill values given below. Rows are
    sorted by ascending distance, masked columns last. All fields live on the queries' device.

    Attributes:
        keys: ``[B, k, D]`` stored keys in the queries' dtype (zeros where masked).
        values: ``[B, k]`` int64 labels (0 where masked).
        distances: ``[B, k]`` float32 squared Euclidean distances ``||q - h||²``, exact even for
            approximate indexes (``+inf`` where masked).
        mask: ``[B, k]`` bool, True for a real neighbour.
        indices: ``[B, k]`` int64 slot numbers in the memory (``-1`` where masked).
    """

    keys: Tensor
    values: Tensor
    distances: Tensor
    mask: Tensor
    indices: Tensor


def nearest(
    store: KeyStore,
    exact: ExactSearch,
    ann: _LiveRowIndex | None,
    q32: Tensor,
    k: int,
    queries: Tensor,
) -> Neighbours:
    """The ``k`` nearest entries of ``store`` to checked float32 queries ``q32`` (``queries``
    as given: their device and dtype are the results'), ranked by the approximate index
    ``ann`` once it is trained, else by the exact kernel."""
    b = queries.shape[0]
    if store.size == 0 or b == 0:
        return empty_neighbours(b, k, queries.shape[1], queries.dtype, queries.device)
    kk = min(k, store.size)
    assert store.keys is not None and store.values is not None
    if ann is not None and ann.active:
        q_np = q32.cpu().numpy()
        slots_np, exact_distances = ann.search(q_np, kk)
        keys, values = store.keys.numpy(), store.values.numpy()
        return gather_cpu(keys, values, q_np, slots_np, k, queries, exact_distances)
    assert store.norms is not None
    n = store.size
    slots = exact.candidates(store.keys[:n], store.norms[:n], q32, kk)
    if isinstance(slots, Tensor):
        return gather_on_device(store.keys, store.values, q32, slots, k, queries)
    keys, values = store.keys.numpy(), store.values.numpy()
    return gather_cpu(keys, values, q32.cpu().numpy(), slots, k, queries)


def empty_neighbours(
    b: int, k: int, d: int, dtype: torch.dtype, device: torch.device
) -> Neighbours:
    """``b`` rows of ``k`` masked columns."""
    return Neighbours(
        keys=torch.zeros(b, k, d, dtype=dtype, device=device),
        values=torch.zeros(b, k, dtype=torch.int64, device=device),
        distances=torch.full((b, k), float("inf"), dtype=torch.float32, device=device),
        mask=torch.zeros(b, k, dtype=torch.bool, device=device),
        indices=torch.full((b, k), -1, dtype=torch.int64, device=device),
    )


def gather_cpu(
    stored_keys: npt.NDArray[np.float32],
    stored_values: npt.NDArray[np.int64],
    q: npt.NDArray[np.float32],
    slots: Int64Array,
    k: int,
    queries: Tensor,
    distances: npt.NDArray[np.float32] | None = None,
) -> Neighbours:
    """Neighbours from candidate ``slots`` ``[B, <=k]`` (``-1`` = none) of CPU storage, in numpy
    (single-threaded memory-bound work that would otherwise start an OpenMP parallel region per
    step). ``distances``: the index's own distances of ``slots`` when it computes them exactly
    (by difference, from the stored vectors); otherwise they are computed here. Results come
    back on ``queries``' device, keys in its dtype."""
    with phase("mbpa.gather"):
        b = slots.shape[0]
        if slots.shape[1] < k:
            slots = np.concatenate([slots, np.full((b, k - slots.shape[1]), -1, np.int64)], 1)
        valid = slots >= 0
        all_valid = bool(valid.all())
        safe = slots if all_valid else np.where(valid, slots, 0)
        if distances is None:
            nb_keys, dist = gather_rows_and_distances_np(stored_keys, safe, q)
            assert dist is not None
        else:
            nb_keys, _ = gather_rows_and_distances_np(stored_keys, safe, None)
            dist = np.full(slots.shape, np.inf, dtype=np.float32)
            dist[:, : distances.shape[1]] = distances
        if not all_valid:
            dist[~valid] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")
        moved = np.flatnonzero((order != np.arange(k)).any(1))
        if moved.size:
            # Near-ties computed differently by the index can swap places: reorder those rows
            # (the keys through flat row numbers: one take, not a gather per element).
            o = order[moved]
            dist[moved] = np.take_along_axis(dist[moved], o, 1)
            slots = slots.copy()
            slots[moved] = np.take_along_axis(slots[moved], o, 1)
            flat = nb_keys.reshape(b * k, -1)
            base = moved[:, None] * k
            flat[(base + np.arange(k)).reshape(-1)] = flat[(base + o).reshape(-1)]
            valid = slots >= 0
            safe = np.where(valid, slots, 0)
        values = np.take(stored_values, safe.reshape(-1)).reshape(b, k)
        if not all_valid:
            values[~valid] = 0
            nb_keys[~valid] = 0.0
        out = queries.device
        return Neighbours(
            keys=torch.from_numpy(nb_keys).to(device=out, dtype=queries.dtype),
            values=torch.from_numpy(values).to(out),
            distances=torch.from_numpy(dist).to(out),
            mask=torch.from_numpy(valid).to(out),
            indices=torch.from_numpy(slots).to(out),
        )


def gather_on_device(
    stored_keys: Tensor, stored_values: Tensor, q32: Tensor, slots: Tensor, k: int, queries: Tensor
) -> Neighbours:
    """:func:`gather_cpu` for storage on another device (a GPU), in torch there."""
    with phase("mbpa.gather"):
        dev = stored_keys.device
        slots = slots.to(dev)
        b = slots.shape[0]
        if slots.shape[1] < k:
            slots = torch.cat([slots, slots.new_full((b, k - slots.shape[1]), -1)], 1)
        valid = slots >= 0
        all_valid = bool(valid.all())
        safe = slots if all_valid else slots.clamp_min(0)
        nb_keys = stored_keys.index_select(0, safe.reshape(-1)).view(b, k, -1)  # the returned keys
        dist = exact_squared_distances(q32.to(dev), nb_keys)
        if not all_valid:
            dist.masked_fill_(~valid, float("inf"))
        dist, order = dist.sort(dim=1, stable=True)
        moved = (order != torch.arange(k, device=dev)).any(1)
        if bool(moved.any()):
            # Near-ties computed differently by the index can swap places: reorder only those rows.
            rows = moved.nonzero().squeeze(1)
            slots[rows] = slots[rows].gather(1, order[rows])
            valid = slots >= 0
            safe = slots.clamp_min(0)
            base = (rows * k).unsqueeze(1)
            flat = nb_keys.view(b * k, -1)
            flat[(base + torch.arange(k, device=dev)).reshape(-1)] = flat.index_select(
                0, (base + order[rows]).reshape(-1)
            )
        values = stored_values.index_select(0, safe.reshape(-1)).view(b, k)
        if not all_valid:
            values.masked_fill_(~valid, 0)
            nb_keys.masked_fill_(~valid.unsqueeze(-1), 0.0)
        out = queries.device
        return Neighbours(
            keys=nb_keys.to(device=out, dtype=queries.dtype),
            values=values.to(out),
            distances=dist.to(out),
            mask=valid.to(out),
            indices=slots.to(out),
        )


def exact_squared_distances(queries: Tensor, keys: Tensor) -> Tensor:
    """``||q_b - h_bj||²`` for ``queries`` [B, D] and ``keys`` [B, K, D], as a difference."""
    return (keys - queries.unsqueeze(1)).square_().sum(-1)


def gather_rows_and_distances_np(
    store: npt.NDArray[np.float32], slots: Int64Array, queries: npt.NDArray[np.float32] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """``store[slots]`` ``[B, K, D]`` and, unless ``queries`` is None, the squared distances
    ``||q_b - store[slots[b, k]]||²`` ``[B, K]`` as a difference.

    In blocks of about 1 MiB of keys: each block's distances are computed while its gathered
    keys are still in cache, with one reused temporary."""
    b, k = slots.shape
    d = store.shape[1]
    keys = np.empty((b, k, d), dtype=np.float32)
    if queries is None:
        # mode="clip" (the slots are in range): with the default mode numpy buffers `out`
        np.take(store, slots.reshape(-1), axis=0, out=keys.reshape(-1, d), mode="clip")
        return keys, None
    dist = np.empty((b, k), dtype=np.float32)
    step = max(1, (1 << 18) // max(k * d, 1))
    diff = np.empty((min(step, b), k, d), dtype=np.float32)
    for start in range(0, b, step):
        stop = min(b, start + step)
        block = keys[start:stop]
        # mode="clip" (the slots are in range): with the default mode numpy buffers `out`
        np.take(store, slots[start:stop].reshape(-1), axis=0, out=block.reshape(-1, d), mode="clip")
        tmp = diff[: stop - start]
        np.subtract(block, queries[start:stop, None, :], out=tmp)
        np.einsum("bkd,bkd->bk", tmp, tmp, out=dist[start:stop])
    return keys, dist
