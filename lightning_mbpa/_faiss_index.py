"""Approximate faiss indexes over a memory whose entries get overwritten.

faiss indexes such as HNSW cannot delete a vector, so :class:`_LiveRowIndex` keeps the index's
rows in add order with a liveness bitmap: an overwritten slot's old row stays in the index and is
hidden at search time by an ``IDSelectorBitmap``, and the index is compacted when dead rows
outnumber live ones. Used by :class:`~lightning_mbpa.EpisodicMemory` for every index string other
than ``"Flat"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch  # noqa: F401  (loaded before faiss, see below)

# isort: split
# torch first: faiss' OpenMP calls then bind to the OpenMP runtime torch already loaded, so both
# libraries share one thread pool and one thread count instead of two pools competing for the
# cores (see the thread table of benchmarks/memory.py). No thread setting is changed here.
import faiss as _faiss

# faiss' bundled type stubs lack most of its SWIG API (search parameter classes, attributes of
# HNSW and PQ indexes), so the module is used untyped here.
faiss: Any = _faiss

Int64Array = npt.NDArray[np.int64]

#: faiss' k-means asks for at least this many training points per centroid.
TRAIN_POINTS_PER_CENTROID = 39
# A dimension divisible by many sub-quantizer counts, used to parse an index string before the
# memory's dimension is known (only parse errors are reported that early).
_PROBE_DIM = 2520


class _LiveRowIndex:
    """An approximate faiss index over *rows* (add order) with a liveness bitmap for overwrites.

    faiss indexes like HNSW cannot delete, so an overwritten slot's old row stays in the index and
    is hidden at search time by an ``IDSelectorBitmap`` over live rows. ``row_to_slot`` and
    ``slot_to_row`` translate between the index's row ids and memory slots. Compaction (reset,
    keeping the training, and re-add live keys in slot order) runs when dead rows outnumber live
    ones.
    """

    def __init__(self, factory: str, dim: int, params: str, capacity: int) -> None:
        index = _new_index(factory, dim, params)
        self.index = index
        self.capacity = capacity
        # HNSW and IVF over uncompressed vectors compute L2 by difference from the stored
        # vectors (faiss' fvec_L2sqr), as exact as recomputing them; PQ/SQ codes and
        # pre-transforms (PCA, OPQ) give approximations.
        self.exact_distances = isinstance(
            faiss.downcast_index(index), (faiss.IndexHNSWFlat, faiss.IndexIVFFlat)
        )
        self.train_at = _train_threshold(index, capacity)
        self.active = bool(index.is_trained)
        self.slot_to_row = np.full(capacity, -1, dtype=np.int64)
        self.row_to_slot = np.empty(0, dtype=np.int64)
        self.live = np.zeros(0, dtype=bool)
        self.rows = 0
        self.dead = 0
        self._bitmap: npt.NDArray[np.uint8] | None = None

    def update(self, keys: npt.NDArray[np.float32], slots: Int64Array) -> None:
        """Reflects a write of ``slots`` (unique) given all filled keys ``keys`` (slot order)."""
        size = keys.shape[0]
        if not self.active:
            if self.train_at is not None and size >= self.train_at:
                self.index.train(keys)
                self.active = True
                self.compact(keys)
            return
        if slots.size == 0:
            return
        old = self.slot_to_row[slots]
        old = old[old >= 0]
        self.live[old] = False
        self.dead += old.size
        new_rows = np.arange(self.rows, self.rows + slots.size, dtype=np.int64)
        self._reserve(self.rows + slots.size)
        self.index.add(np.ascontiguousarray(keys[slots]))
        self.row_to_slot[new_rows] = slots
        self.slot_to_row[slots] = new_rows
        self.live[new_rows] = True
        self.rows += slots.size
        self._bitmap = None
        if self.dead > self.rows - self.dead:
            self.compact(keys)

    def compact(self, keys: npt.NDArray[np.float32]) -> None:
        """The one rebuild: reset the index (training kept) and add the live keys in slot order."""
        size = keys.shape[0]
        self.index.reset()
        if size:
            self.index.add(keys)
        self._reserve(size)
        self.row_to_slot[:size] = np.arange(size)
        self.slot_to_row[:] = -1
        self.slot_to_row[:size] = np.arange(size)
        self.live[:] = False
        self.live[:size] = True
        self.rows = size
        self.dead = 0
        self._bitmap = None

    def search(
        self, queries: npt.NDArray[np.float32], k: int
    ) -> tuple[Int64Array, npt.NDArray[np.float32] | None]:
        """Slots ``[B, k]`` of the approximate nearest live rows (``-1`` where fewer were found),
        and their squared distances if the index computes them exactly (else None)."""
        if self.dead == 0:
            # Every row is live: the selector would accept everything, and costs HNSW ~1.5x.
            dist, rows = self.index.search(queries, k)
        else:
            if self._bitmap is None:
                self._bitmap = np.packbits(self.live[: self.rows], bitorder="little")
            bitmap = self._bitmap
            selector = faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap))
            params, keep_alive = _search_params(self.index, selector, "")
            dist, rows = self.index.search(queries, k, params=params)
            del keep_alive
        found = rows >= 0
        slots = np.full(rows.shape, -1, dtype=np.int64)
        slots[found] = self.row_to_slot[rows[found]]
        return slots, (dist if self.exact_distances else None)

    def _reserve(self, n: int) -> None:
        if n <= self.row_to_slot.size:
            return
        grown = max(n, 2 * self.row_to_slot.size, 1024)
        row_to_slot = np.full(grown, -1, dtype=np.int64)
        row_to_slot[: self.rows] = self.row_to_slot[: self.rows]
        live = np.zeros(grown, dtype=bool)
        live[: self.rows] = self.live[: self.rows]
        self.row_to_slot, self.live = row_to_slot, live


def _new_index(factory: str, dim: int, params: str) -> Any:
    """An empty faiss index for ``dim``-wide vectors, with ``params`` applied.

    Raises:
        ValueError: ``factory`` cannot index that width, cannot filter out overwritten rows,
            or ``params`` do not apply to it.
    """
    try:
        index = faiss.index_factory(dim, factory)
    except RuntimeError as exc:
        raise ValueError(
            f"`index`={factory!r} is not a valid faiss index_factory string for dim={dim}: {exc}"
        ) from exc
    _check_usable(index, factory, params)
    return index


def _check_usable(index: Any, factory: str, params: str) -> None:
    """Raises ValueError if the index cannot filter out overwritten rows or ``params`` do not
    apply to it (applying them)."""
    _search_params(index, None, factory)
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise ValueError(
                f"`index_params`={params!r} cannot be applied to `index`={factory!r}: {exc}"
            ) from exc


def _search_params(index: Any, selector: Any, factory: str) -> tuple[Any, Any]:
    """faiss search parameters carrying ``selector`` and the index's own search settings.

    A params object overrides the index's settings, so ``nprobe``/``efSearch``/... are copied from
    it. Returns ``(params, objects to keep alive during the search)``.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner, keep = _search_params(index.index, selector, factory)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
        return params, (inner, keep, selector)
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(nprobe=index.nprobe, max_codes=index.max_codes)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(
            efSearch=index.hnsw.efSearch,
            check_relative_distance=index.hnsw.check_relative_distance,
            bounded_queue=index.hnsw.search_bounded_queue,
        )
    elif isinstance(index, faiss.IndexPQ):
        params = faiss.SearchParametersPQ(
            search_type=index.search_type, polysemous_ht=index.polysemous_ht
        )
    elif isinstance(index, (faiss.IndexScalarQuantizer, faiss.IndexFlat)):
        params = faiss.SearchParameters()
    else:
        raise ValueError(
            f"`index`={factory!r} builds a faiss {type(index).__name__}, which cannot skip overwritten"
            " entries; use 'Flat' (exact) or an HNSW, IVF, PQ or SQ index string (optionally behind a"
            " PCA/OPQ transform)."
        )
    if selector is not None:
        params.sel = selector
    return params, selector


def _train_threshold(index: Any, capacity: int) -> int | None:
    """Keys needed before training (0: no training needed; None: never, search stays exact)."""
    if index.is_trained:
        return 0
    centroids = max(_centroids(index), 1)
    if capacity < centroids:
        return None
    return min(TRAIN_POINTS_PER_CENTROID * centroids, capacity)


def _centroids(index: Any) -> int:
    """Largest number of centroids any component of ``index`` learns (0 if none)."""
    index = faiss.downcast_index(index)
    best = 0
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                best = max(best, 1 << 8)
        best = max(best, _centroids(index.index))
    if isinstance(index, faiss.IndexIVF):
        best = max(best, int(index.nlist))
    if isinstance(index, faiss.IndexHNSW):
        best = max(best, _centroids(index.storage))
    pq = getattr(index, "pq", None)
    if pq is not None:
        best = max(best, int(pq.ksub))
    return best


def _check_index_syntax(factory: str, params: str) -> None:
    """Rejects an index string faiss cannot parse, before the key width is known."""
    try:
        index = faiss.index_factory(_PROBE_DIM, factory)
    except RuntimeError as exc:
        if "could not parse" in str(exc):
            raise ValueError(
                f"`index`={factory!r} is not a valid faiss index_factory string: {exc}"
            ) from exc
        return  # may depend on the dimension: checked again at the first write
    _check_usable(index, factory, params)
