"""A fixed-capacity episodic memory of ``(embedding, label)`` pairs with K-nearest-neighbour lookup.

Memory-based Parameter Adaptation (MbPA; Sprechmann et al., 2018, "Memory-based Parameter
Adaptation", arXiv:1802.10542) writes the embedding ``h = f(x)`` of every training example and its
label into an episodic memory, and at test time adapts the output head on the K stored
embeddings nearest to each query by squared Euclidean distance. This module is that memory and
nothing else: a preallocated float32 key buffer with a FIFO ring (the paper's choice) or reservoir
eviction, searched exactly (a matmul + ``topk`` on the buffer's device with the ``torch`` backend,
the default; ``faiss.knn`` over the buffer itself with the ``faiss`` backend) or through an
approximate faiss index (HNSW, IVF, PQ, ...) that never returns an overwritten entry. Optionally
every entry also carries a *payload* (e.g. the example's model input, kept on the CPU) that
follows it through eviction, so that its key can be recomputed later
(:meth:`EpisodicMemory.update_keys`). It has no
Lightning dependency.

Example:
    >>> import torch
    >>> from lightning_mbpa.memory import EpisodicMemory
    >>> memory = EpisodicMemory(capacity=1000)
    >>> memory.add(torch.randn(8, 16), torch.arange(8))
    tensor([0, 1, 2, 3, 4, 5, 6, 7])
    >>> found = memory.search(torch.randn(2, 16), k=4)
    >>> found.keys.shape, found.values.shape, bool(found.mask.all())
    (torch.Size([2, 4, 16]), torch.Size([2, 4]), True)
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

# isort: split
# torch first: faiss' OpenMP calls then bind to the OpenMP runtime torch already loaded, so both
# libraries share one thread pool and one thread count instead of two pools competing for the
# cores (see the thread table of benchmarks/memory.py). No thread setting is changed here.
import faiss

from lightning_mbpa._faiss_index import Int64Array, _check_index_syntax, _LiveRowIndex, _new_index

__all__ = ["EpisodicMemory", "Neighbours"]

Eviction = Literal["fifo", "reservoir"]
Backend = Literal["auto", "faiss", "torch"]
_EVICTIONS: tuple[str, ...] = get_args(Eviction)
_BACKENDS: tuple[str, ...] = get_args(Backend)

#: The index string meaning exact search over the key buffer itself (no faiss index object).
EXACT_INDEX = "Flat"
#: The keys :meth:`EpisodicMemory.state_dict` returns.
STATE_KEYS = ("keys", "values", "capacity", "dim", "cursor", "num_seen", "generator_state")
#: Optional entry of :meth:`EpisodicMemory.state_dict`: the per-entry payload tensors by name.
PAYLOAD_KEY = "payload"
# Elements of one [B, chunk] distance block in the torch backend.
_TORCH_BLOCK_ELEMENTS = {"cpu": 1 << 24, "other": 1 << 27}
# Columns per group in the CPU top-k selection (see `_smallest`).
_TOPK_GROUP = 32


def _smallest(d: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """The ``kk`` smallest values of each row of ``d`` ``[B, M]`` and their columns, unsorted.

    On the CPU each row is first reduced to the minima of groups of ``_TOPK_GROUP`` columns, and
    only the ``kk`` groups with the smallest minima are searched: every value below the
    ``kk``-th smallest lies in a group whose minimum is below it too, so fewer than ``kk``
    groups rank before those, and a group tied at the ``kk``-th value adds that value (ties may
    pick other columns than ``topk`` would, with the same values). One vectorised pass over the
    row replaces ``topk`` over all of it: the search's selection ~2x faster at 64k columns.
    """
    b, m = d.shape
    size = _TOPK_GROUP
    full = m - m % size
    if d.device.type != "cpu" or full < 4 * kk * size:
        return d.topk(kk, dim=1, largest=False, sorted=False)
    groups = d[:, :full].unflatten(1, (full // size, size))
    _, chosen = groups.amin(dim=2).topk(kk, dim=1, largest=False, sorted=False)
    columns = (chosen[:, :, None] * size + torch.arange(size, device=d.device)).flatten(1)
    values = groups.gather(1, chosen[:, :, None].expand(b, kk, size)).flatten(1)
    if full < m:  # the last, partial group
        values = torch.cat([values, d[:, full:]], 1)
        tail = torch.arange(full, m, device=d.device).expand(b, m - full)
        columns = torch.cat([columns, tail], 1)
    values, pick = values.topk(kk, dim=1, largest=False, sorted=False)
    return values, columns.gather(1, pick)


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


class EpisodicMemory:
    """A fixed-capacity memory of float32 keys and int64 labels with exact or approximate K-NN.

    Keys live in a preallocated, uninitialised ``[capacity, D]`` float32 buffer (``torch.empty``),
    so the operating system only backs the pages that have been written: resident memory grows
    with the fill, not with the capacity.

    Eviction once the memory is full:

    * ``"fifo"``: a ring; the oldest entry is overwritten (the paper's choice). A batch larger than
      the capacity keeps its last ``capacity`` rows.
    * ``"reservoir"``: Algorithm R over everything ever offered: item ``t`` (0-based, counted over
      all calls) takes slot ``t`` while ``t < capacity``, else draws ``j`` uniform in ``[0, t]``
      and replaces slot ``j`` if ``j < capacity``. The memory is then a uniform sample of the whole
      stream. Draws come from a ``torch.Generator`` seeded with ``seed``; within one batch the later
      of two rows drawing the same slot wins, exactly as one-at-a-time insertion would.

    Search (:meth:`search`) returns the ``k`` nearest keys by squared Euclidean distance:

    * ``index="Flat"`` (exact): on the ``faiss`` backend, ``faiss.knn`` directly over the filled
      part of the key buffer (zero copy, nothing to rebuild); on the ``torch`` backend, a chunked
      ``|h|² - 2 q·h`` matmul and top-k on the buffer's device, with ``|h|²`` cached per slot. On
      the CPU each searching thread keeps its block of scores (64 MiB at most unless
      ``B·k > 2**24``: ``B`` rows of ``max(k, 2**24 / B)`` columns) for its next search, until
      the memory is cleared or moved.
    * any other ``faiss.index_factory`` string (``"HNSW32"``, ``"IVF256,Flat"``, ``"IVF256,PQ16"``,
      optionally behind ``"PCA64,"``/``"OPQ16,"``), faiss backend only. The index is built at the
      first write. One that needs training (IVF, PQ) is trained on the stored keys once
      ``39 * (largest number of centroids it learns)`` keys exist (``nlist`` for IVF, ``2**nbits``
      for PQ; capped at ``capacity``; never if ``capacity`` is below the number of centroids);
      until then search is exact. Each write only adds the new rows to the index; overwritten rows
      are hidden by a liveness bitmap passed to faiss as an ``IDSelectorBitmap``. When the dead
      rows outnumber the live ones the index is compacted (reset, keeping its training, and the
      live keys re-added in slot order): the one place a rebuild happens, amortised O(1) per write.
      Distances of the returned neighbours are always recomputed exactly from the stored keys.

    Payload: :meth:`add` may also take a mapping of per-row tensors (``payload``, e.g. the model
    inputs the keys were computed from). They are stored on the CPU in preallocated
    ``[capacity, ...]`` buffers (dtype kept) at the same slots as the keys, so eviction, state
    dicts and pickling keep them aligned with their keys; :attr:`payload` reads them back.
    A memory either stores a payload with every entry or with none (:meth:`clear` resets this).
    :meth:`update_keys` overwrites stored keys in place, e.g. with keys recomputed from the
    payload by a network whose weights have changed.

    Threads: nothing here changes a thread setting. On the CPU the memory-bound steps (writes,
    gathering the neighbours' keys) run single-threaded in numpy; only the distance computation
    (faiss or the torch matmul) is parallel. Importing this module loads torch before faiss, so
    faiss shares torch's OpenMP runtime and follows ``torch.set_num_threads``. On a machine whose
    cores are busy with other work, OpenMP's spin-waiting can make a 2-thread search several times
    slower than a 1-thread one; ``OMP_WAIT_POLICY=passive`` or fewer threads avoid that.

    Args:
        capacity: Maximum number of entries (>= 1).
        dim: Key width; fixed by the first :meth:`add` when None.
        eviction: ``"fifo"`` or ``"reservoir"`` (see above).
        index: ``"Flat"`` for exact search, or a ``faiss.index_factory`` string for an approximate
            index (faiss backend only).
        backend: ``"faiss"``, ``"torch"``, or ``"auto"``: torch for exact search (on the CPU too:
            torch's matmul + top-k measured 2-6x faster than ``faiss.knn`` of the faiss-cpu
            wheel for 16 or more queries, on par for one, on a VM where that wheel's BLAS ran
            slow kernels, and 4-9% faster where it ran fast ones; see the README), faiss for an
            approximate index.
        seed: Seed of the reservoir's random generator.
        device: Where the key buffer lives (default CPU). A GPU needs ``backend`` ``"auto"`` or
            ``"torch"`` and ``index="Flat"``.
        index_params: faiss ``ParameterSpace`` settings applied to an approximate index whenever it
            is (re)built, e.g. ``"nprobe=16"`` for IVF or ``"efSearch=64"`` for HNSW. Empty for
            faiss' defaults.

    Raises:
        ValueError: An argument is out of range; the message names it, the value given and what
            is allowed.

    Example:
        >>> import torch
        >>> memory = EpisodicMemory(capacity=4, dim=2)
        >>> memory.add(torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), torch.tensor([0, 1, 2]))
        tensor([0, 1, 2])
        >>> found = memory.search(torch.tensor([[0.9, 0.0]]), k=2)
        >>> found.values.tolist(), [round(d, 4) for d in found.distances[0].tolist()]
        ([[1, 0]], [0.01, 0.81])
        >>> memory.add(torch.ones(2, 2), torch.tensor([3, 4]))  # fills slot 3, then wraps to slot 0
        tensor([3, 0])
    """

    def __init__(
        self,
        capacity: int,
        dim: int | None = None,
        eviction: Eviction = "fifo",
        index: str = EXACT_INDEX,
        backend: Backend = "auto",
        seed: int = 0,
        device: torch.device | str | None = None,
        index_params: str = "",
    ) -> None:
        if not _is_int(capacity) or capacity < 1:
            raise ValueError(f"`capacity` must be an integer >= 1; got {capacity!r}.")
        if dim is not None and (not _is_int(dim) or dim < 1):
            raise ValueError(
                f"`dim` must be None (fixed by the first write) or an integer >= 1; got {dim!r}."
            )
        if eviction not in _EVICTIONS:
            raise ValueError(f"`eviction` must be one of {_EVICTIONS}; got {eviction!r}.")
        if not isinstance(index, str) or not index.strip():
            raise ValueError(
                f"`index` must be {EXACT_INDEX!r} (exact) or a faiss index_factory string such as"
                f" 'HNSW32' or 'IVF256,Flat'; got {index!r}."
            )
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {_BACKENDS}; got {backend!r}.")
        if not _is_int(seed):
            raise ValueError(f"`seed` must be an integer; got {seed!r}.")
        if not isinstance(index_params, str):
            raise ValueError(
                f"`index_params` must be a faiss ParameterSpace string such as 'nprobe=16'; got {index_params!r}."
            )
        try:
            target = _resolve_device(device)
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

        self._capacity = int(capacity)
        self._eviction: Eviction = eviction
        self._index_string = index
        self._index_params = index_params
        self._backend_arg: Backend = backend
        self._seed = int(seed)
        self._device = target
        self._generator = torch.Generator().manual_seed(self._seed)
        self._dim: int | None = None
        self._keys: Tensor | None = None
        self._values: Tensor | None = None
        self._norms: Tensor | None = None
        self._ann: _LiveRowIndex | None = None
        self._payload: dict[str, Tensor] | None = None
        self._size = 0
        self._num_seen = 0
        # Bumped by every change of the contents: caches derived from the keys compare it.
        self._version = 0
        # Per thread, the CPU torch search's score block, reused across searches: a fresh
        # 64 MiB block is page-faulted in on every use (~20 ms on the development VM, ~0.1 ms
        # per query at 100k keys); per thread, so that concurrent searches never share it.
        # Dropped (every thread's) when the buffers are reallocated or moved.
        self._scratch = threading.local()
        if dim is not None:
            self._allocate(int(dim))

    # ------------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """Maximum number of entries."""
        return self._capacity

    @property
    def dim(self) -> int | None:
        """Key width, or None until the first write fixes it."""
        return self._dim

    @property
    def eviction(self) -> Eviction:
        """``"fifo"`` or ``"reservoir"``."""
        return self._eviction

    @property
    def index_string(self) -> str:
        """The index string given at construction (``"Flat"`` for exact search)."""
        return self._index_string

    @property
    def index_params(self) -> str:
        """faiss ``ParameterSpace`` settings applied to an approximate index."""
        return self._index_params

    @property
    def backend(self) -> Literal["faiss", "torch"]:
        """The backend searches use: ``"auto"`` is torch for exact search, faiss for an
        approximate index."""
        if self._backend_arg == "torch" or (
            self._backend_arg == "auto" and self._index_string == EXACT_INDEX
        ):
            return "torch"
        return "faiss"

    @property
    def device(self) -> torch.device:
        """Where the key buffer lives."""
        return self._device

    @property
    def seed(self) -> int:
        """Seed of the reservoir generator (used again by :meth:`clear`)."""
        return self._seed

    @property
    def keys(self) -> Tensor:
        """A view of the filled part of the key buffer, ``[len, D]`` float32, in slot order."""
        if self._keys is None:
            return torch.empty(0, 0, dtype=torch.float32, device=self._device)
        return self._keys[: self._size]

    @property
    def values(self) -> Tensor:
        """A view of the filled part of the label buffer, ``[len]`` int64, in slot order."""
        if self._values is None:
            return torch.empty(0, dtype=torch.int64, device=self._device)
        return self._values[: self._size]

    @property
    def payload(self) -> dict[str, Tensor]:
        """Views of the filled part of the payload buffers, ``[len, ...]`` on the CPU, in slot
        order, by name; empty when the memory stores no payload."""
        if self._payload is None:
            return {}
        return {name: buffer[: self._size] for name, buffer in self._payload.items()}

    @property
    def version(self) -> int:
        """A counter that every change of the stored entries (write, key update, clear, load,
        move to another device) increases: a cache of anything computed from the keys is current while it holds."""
        return self._version

    @property
    def num_seen(self) -> int:
        """How many rows were ever offered to :meth:`add` (kept or not) since the last clear."""
        return self._num_seen

    @property
    def faiss_index(self) -> Any | None:
        """The approximate faiss index, or None (exact search, or before the first write).

        It holds rows in add order, not slots, and may hold overwritten rows; use it to read or
        tune search settings, not to add or search directly.
        """
        return None if self._ann is None else self._ann.index

    @property
    def is_trained(self) -> bool:
        """False while an approximate index waits for enough keys to train (search is exact)."""
        return self._ann is None or self._ann.active

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self._capacity}, dim={self._dim}, len={self._size},"
            f" eviction={self._eviction!r}, index={self._index_string!r}, backend={self.backend!r},"
            f" device={str(self._device)!r})"
        )

    def check_dim(self, dim: int) -> None:
        """Raises if keys of width ``dim`` cannot be written; changes nothing.

        Lets a caller that buffers writes find out at the first key, not at the first ``add``.

        Raises:
            ValueError: ``dim`` differs from the memory's fixed width, or the approximate index
                cannot index vectors of that width (``"PQ3"`` needs a width divisible by 3).
        """
        if self._dim is not None:
            if dim != self._dim:
                raise ValueError(
                    f"keys of width {dim} cannot be written: the memory holds keys of width "
                    f"{self._dim}."
                )
            return
        if self._index_string != EXACT_INDEX:
            _new_index(self._index_string, dim, self._index_params)

    # ------------------------------------------------------------------ writing

    def add(
        self, keys: Tensor, values: Tensor, payload: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Writes ``N`` ``(key, label)`` pairs, evicting as configured.

        Keys are detached and stored as float32; labels as int64 (integral float labels such as
        ``3.0`` are accepted). Nothing changes when a check fails.

        Args:
            keys: ``[N, D]`` real-valued, finite.
            values: ``[N]`` non-negative integer labels.
            payload: Per-row tensors ``[N, ...]`` by name, stored (detached, on the CPU, dtype
                kept) at the same slots as the keys. Required on every write once the memory
                holds a payload; the names, trailing shapes and dtypes must stay the same.

        Returns:
            ``[N]`` int64 (CPU): the slot each row now occupies, in row order, or ``-1`` for a row
            that is not in the memory after the call (reservoir rows not drawn in, rows of a batch
            larger than the capacity that were overwritten within the batch).

        Raises:
            ValueError: Bad shapes, non-finite keys, negative/non-integer/bool labels, a payload
                that is missing, unexpected or does not match the stored one.
        """
        keys32, labels, new_norms = self._check_add(keys, values)
        self._check_payload(payload, keys32.shape[0])
        n = keys32.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        if self._dim is None:
            self._allocate(keys32.shape[1])
        assert self._keys is not None and self._values is not None and self._norms is not None
        if payload is not None and self._payload is None:
            self._payload = _allocate_payload(payload, self._capacity)

        slot_of_row, runs = self._assign_slots(n)
        slots: Int64Array | None = None
        if self._device.type == "cpu":
            # numpy on the CPU: single-threaded memory copies, immune to OpenMP contention.
            assert new_norms is not None
            new_keys = keys32.cpu().numpy()
            new_labels = labels.cpu().numpy()
            targets = (self._keys.numpy(), self._values.numpy(), self._norms.numpy())
            if runs is not None:  # FIFO and a filling reservoir: at most two slice copies
                for row, slot, length in runs:
                    for target, new in zip(targets, (new_keys, new_labels, new_norms), strict=True):
                        target[slot : slot + length] = new[row : row + length]
            else:
                rows = np.flatnonzero(slot_of_row >= 0)
                slots = slot_of_row[rows]
                for target, new in zip(targets, (new_keys, new_labels, new_norms), strict=True):
                    target[slots] = new[rows]
        else:
            rows = np.flatnonzero(slot_of_row >= 0)
            slots = slot_of_row[rows]
            if rows.size:
                rows_t = torch.from_numpy(rows).to(keys32.device)
                slots_t = torch.from_numpy(slots).to(self._device)
                with torch.no_grad():
                    new = keys32.index_select(0, rows_t).to(self._device)
                    self._keys.index_copy_(0, slots_t, new)
                    kept_labels = labels.index_select(0, rows_t.to(labels.device))
                    self._values.index_copy_(0, slots_t, kept_labels.to(self._device))
                    self._norms.index_copy_(0, slots_t, new.square().sum(1))
        if payload is not None:
            if slots is None:
                rows = np.flatnonzero(slot_of_row >= 0)
                slots = slot_of_row[rows]
            if rows.size:
                _write_payload(self._payload, payload, rows, slots)
        self._num_seen += n
        self._size = min(self._num_seen, self._capacity)
        self._version += 1
        if self._ann is not None:
            if slots is None:
                slots = slot_of_row[slot_of_row >= 0]
            self._ann.update(self._keys_numpy(), slots)
        return torch.from_numpy(slot_of_row)

    def _assign_slots(self, n: int) -> tuple[Int64Array, list[tuple[int, int, int]] | None]:
        """Slot of each of ``n`` new rows (``-1``: not kept), with sequential semantics, and, when
        the kept rows land in at most two contiguous runs of slots (FIFO, a filling reservoir),
        those runs as ``(first row, first slot, length)``; None otherwise."""
        cap, seen = self._capacity, self._num_seen
        if self._eviction == "fifo":
            first = max(0, n - cap)  # earlier rows of an oversized batch are overwritten within it
            start = (seen + first) % cap
            head = min(n - first, cap - start)
            runs = [(first, start, head)]
            if head < n - first:  # wraps around the end of the ring
                runs.append((first + head, 0, n - first - head))
            slot = np.empty(n, dtype=np.int64)
            slot[:first] = -1
            for row, begin, length in runs:
                slot[row : row + length] = np.arange(begin, begin + length, dtype=np.int64)
            return slot, runs
        slot = np.full(n, -1, dtype=np.int64)
        t = np.arange(seen, seen + n, dtype=np.int64)
        filling = t < cap
        slot[filling] = t[filling]
        late = ~filling
        m = int(late.sum())
        if not m:
            return slot, [(0, seen, n)]
        u = torch.rand(m, dtype=torch.float64, generator=self._generator).numpy()
        j = np.floor(u * (t[late] + 1).astype(np.float64)).astype(np.int64)
        slot[late] = np.where(j < cap, j, -1)
        # Two rows drawing the same slot: the later one wins (keep-last dedupe).
        kept = np.flatnonzero(slot >= 0)
        _, last_rev = np.unique(slot[kept][::-1], return_index=True)
        winners = kept[::-1][last_rev]
        deduped = np.full(n, -1, dtype=np.int64)
        deduped[winners] = slot[winners]
        return deduped, None

    def clear(self) -> None:
        """Empties the memory: ``len``, ``num_seen`` and the FIFO cursor go to 0, the reservoir
        generator is re-seeded with ``seed`` and an approximate index goes back to untrained. A
        fixed ``dim`` stays fixed; the buffers are reallocated, so their pages are released. The
        payload is dropped (the next write decides whether there is one)."""
        self._generator = torch.Generator().manual_seed(self._seed)
        self._size = 0
        self._num_seen = 0
        self._version += 1
        self._payload = None
        if self._dim is not None:
            self._allocate(self._dim)

    def update_keys(self, slots: Tensor, keys: Tensor) -> None:
        """Overwrites the stored keys of ``slots`` in place; their labels and payload stay.

        This is how keys are refreshed when the network that computed them has changed: the
        new keys are searched from the next :meth:`search` on (an approximate index re-adds
        the rows and hides the old ones, keeping its training). Nothing changes when a check
        fails.

        Args:
            slots: ``[N]`` distinct integer slots of filled entries (``0 <= slot < len``).
            keys: ``[N, D]`` real-valued, finite.

        Raises:
            ValueError: Slots out of range or repeated, keys of the wrong shape or not finite.
        """
        if not isinstance(slots, Tensor) or slots.ndim != 1 or slots.is_floating_point():
            raise ValueError(
                f"`slots` must be a 1-D integer tensor; got {_describe_tensor(slots)}."
            )
        if slots.dtype == torch.bool or slots.is_complex():
            raise ValueError(f"`slots` must be integer slot numbers; got dtype {slots.dtype}.")
        slots_np = slots.detach().cpu().numpy().astype(np.int64, copy=False)
        if slots_np.size and (slots_np.min() < 0 or slots_np.max() >= self._size):
            raise ValueError(
                f"`slots` must lie in [0, {self._size}) (the filled slots); got values in "
                f"[{slots_np.min()}, {slots_np.max()}]."
            )
        if np.unique(slots_np).size != slots_np.size:
            raise ValueError("`slots` must be distinct; got repeated slots.")
        if not isinstance(keys, Tensor) or keys.ndim != 2 or keys.shape[0] != slots_np.size:
            raise ValueError(
                f"`keys` must have shape [{slots_np.size}, {self._dim}] (one row per slot); got"
                f" {_describe_tensor(keys)}."
            )
        keys32, _, new_norms = self._check_add(keys, torch.zeros(keys.shape[0], dtype=torch.int64))
        if slots_np.size == 0:
            return
        assert self._keys is not None and self._norms is not None
        if self._device.type == "cpu":
            assert new_norms is not None
            self._keys.numpy()[slots_np] = keys32.cpu().numpy()
            self._norms.numpy()[slots_np] = new_norms
        else:
            slots_t = torch.from_numpy(slots_np).to(self._device)
            with torch.no_grad():
                new = keys32.to(self._device)
                self._keys.index_copy_(0, slots_t, new)
                self._norms.index_copy_(0, slots_t, new.square().sum(1))
        self._version += 1
        if self._ann is not None:
            self._ann.update(self._keys_numpy(), slots_np)

    # ------------------------------------------------------------------ searching

    def search(self, queries: Tensor, k: int) -> Neighbours:
        """Finds the ``k`` nearest stored keys of each query by squared Euclidean distance.

        Queries of any floating dtype are searched in float32; results come back on the queries'
        device, keys in the queries' dtype. With fewer than ``k`` entries the extra columns are
        masked; an empty memory returns all-masked results.

        Args:
            queries: ``[B, D]`` floating point, finite.
            k: Number of neighbours (>= 1).

        Returns:
            A :class:`Neighbours`, sorted by ascending distance.

        Raises:
            ValueError: ``k < 1``, queries not ``[B, D]``, not floating point or not finite.
        """
        if not _is_int(k) or k < 1:
            raise ValueError(f"`k` must be an integer >= 1; got {k!r}.")
        k = int(k)
        if not isinstance(queries, Tensor):
            raise ValueError(f"`queries` must be a torch.Tensor; got {type(queries).__name__}.")
        width = "D" if self._dim is None else str(self._dim)
        if queries.ndim != 2 or (self._dim is not None and queries.shape[1] != self._dim):
            raise ValueError(
                f"`queries` must have shape [B, {width}] (the memory's key width); got shape"
                f" {tuple(queries.shape)}."
            )
        if not queries.is_floating_point():
            raise ValueError(f"`queries` must be floating point; got dtype {queries.dtype}.")
        q32 = queries.detach().to(torch.float32).contiguous()
        if not _all_finite(q32):
            raise ValueError("`queries` must be finite; got NaN or infinite values.")

        b = queries.shape[0]
        if self._size == 0 or b == 0:
            return _empty_neighbours(b, k, queries.shape[1], queries.dtype, queries.device)
        kk = min(k, self._size)
        if self.backend == "torch":
            slots = self._torch_candidates(q32.to(self._device), kk)
            if self._device.type != "cpu":
                return self._gather(q32, slots, k, queries)
            slots_np = slots.numpy()
        elif self._ann is not None and self._ann.active:
            slots_np, exact = self._ann.search(q32.cpu().numpy(), kk)
            return self._gather_cpu(q32.cpu().numpy(), slots_np, k, queries, exact)
        else:
            _, slots_np = faiss.knn(
                q32.cpu().numpy(), self._keys_numpy(), kk, metric=faiss.METRIC_L2
            )
        return self._gather_cpu(q32.cpu().numpy(), slots_np, k, queries)

    def _torch_candidates(self, q: Tensor, kk: int) -> Tensor:
        """Exact top-``kk`` slots by ``|h|² - 2 q·h`` (the ``|q|²`` term ranks nothing), chunked,
        sorted by that value (so that the exact distances rarely need reordering)."""
        assert self._keys is not None and self._norms is not None
        n, b = self._size, q.shape[0]
        budget = _TORCH_BLOCK_ELEMENTS["cpu" if q.device.type == "cpu" else "other"]
        chunk = max(kk, budget // max(b, 1))
        best_d: Tensor | None = None
        best_i: Tensor | None = None
        cpu = q.device.type == "cpu"
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            d = torch.addmm(
                self._norms[start:stop].unsqueeze(0),
                q,
                self._keys[start:stop].T,
                alpha=-2.0,
                out=self._score_block(b, stop - start) if cpu else None,
            )
            d, i = _smallest(d, min(kk, stop - start))
            i += start
            if best_d is None or best_i is None:
                best_d, best_i = d, i
            else:
                best_d, pick = torch.cat([best_d, d], 1).topk(
                    kk, dim=1, largest=False, sorted=False
                )
                best_i = torch.cat([best_i, i], 1).gather(1, pick)
        assert best_d is not None and best_i is not None
        return best_i.gather(1, best_d.argsort(dim=1))

    def _score_block(self, rows: int, columns: int) -> Tensor:
        """This thread's ``[rows, columns]`` float32 CPU score block (grown when too small)."""
        block = getattr(self._scratch, "scores", None)
        if block is None or block.numel() < rows * columns:
            with torch.inference_mode(False):  # written in and out of inference mode
                block = torch.empty(rows * columns, dtype=torch.float32)
            self._scratch.scores = block
        return block[: rows * columns].view(rows, columns)

    def _gather_cpu(
        self,
        q: npt.NDArray[np.float32],
        slots: Int64Array,
        k: int,
        queries: Tensor,
        distances: npt.NDArray[np.float32] | None = None,
    ) -> Neighbours:
        """:meth:`_gather` for CPU storage, in numpy (single-threaded memory-bound work that
        would otherwise start an OpenMP parallel region per step). ``distances``: the index's
        own distances of ``slots`` when it computes them exactly (by difference, from the
        stored vectors); otherwise they are computed here."""
        assert self._keys is not None and self._values is not None
        b = slots.shape[0]
        if slots.shape[1] < k:
            slots = np.concatenate([slots, np.full((b, k - slots.shape[1]), -1, np.int64)], 1)
        valid = slots >= 0
        all_valid = bool(valid.all())
        safe = slots if all_valid else np.where(valid, slots, 0)
        if distances is None:
            nb_keys, dist = _gather_rows_and_distances_np(self._keys.numpy(), safe, q)
        else:
            nb_keys, _ = _gather_rows_and_distances_np(self._keys.numpy(), safe, None)
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
        values = np.take(self._values.numpy(), safe.reshape(-1)).reshape(b, k)
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

    def _gather(self, q32: Tensor, slots: Tensor, k: int, queries: Tensor) -> Neighbours:
        """Neighbours from candidate slots (``-1`` = none): exact distances, sorted, padded to k."""
        assert self._keys is not None and self._values is not None
        dev = self._device
        slots = slots.to(dev)
        b = slots.shape[0]
        if slots.shape[1] < k:
            slots = torch.cat([slots, slots.new_full((b, k - slots.shape[1]), -1)], 1)
        valid = slots >= 0
        all_valid = bool(valid.all())
        safe = slots if all_valid else slots.clamp_min(0)
        nb_keys = self._keys.index_select(0, safe.reshape(-1)).view(b, k, -1)  # the returned keys
        dist = _exact_squared_distances(q32.to(dev), nb_keys)
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
        values = self._values.index_select(0, safe.reshape(-1)).view(b, k)
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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The memory as plain tensors, loadable with ``torch.load(..., weights_only=True)``.

        Only the filled part is stored, as compact copies: ``keys`` ``[len, D]`` float32,
        ``values`` ``[len]`` int64, int64 scalars ``capacity``, ``dim`` (``-1`` when not fixed),
        ``cursor`` (the next FIFO slot) and ``num_seen``, and ``generator_state`` (uint8), so a
        restored memory continues exactly as this one would. A memory with a payload adds
        ``payload``: a dict of the filled payload tensors by name (CPU). Approximate indexes are
        not stored; :meth:`load_state_dict` rebuilds them from the keys.
        """
        d = -1 if self._dim is None else self._dim
        state: dict[str, Any] = {
            "keys": self.keys.clone() if self._keys is not None else torch.empty(0, 0),
            "values": self.values.clone(),
            "capacity": torch.tensor(self._capacity, dtype=torch.int64),
            "dim": torch.tensor(d, dtype=torch.int64),
            "cursor": torch.tensor(self._num_seen % self._capacity, dtype=torch.int64),
            "num_seen": torch.tensor(self._num_seen, dtype=torch.int64),
            "generator_state": self._generator.get_state(),
        }
        if self._payload is not None:
            state[PAYLOAD_KEY] = {name: t.clone() for name, t in self.payload.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output; everything is checked before anything changes.

        Raises:
            ValueError: A missing/unexpected entry, a capacity or dim that differs from this
                memory's, inconsistent shapes or counters, non-finite keys, negative labels or a
                bad generator state. The memory is left as it was.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"`state` must be a mapping from {STATE_KEYS}; got {type(state).__name__}."
            )
        missing = [key for key in STATE_KEYS if key not in state]
        unexpected = [key for key in state if key not in (*STATE_KEYS, PAYLOAD_KEY)]
        if missing or unexpected:
            raise ValueError(
                f"`state` must hold exactly {STATE_KEYS} (and optionally {PAYLOAD_KEY!r}); missing"
                f" {missing}, unexpected {unexpected}."
            )
        for key in STATE_KEYS:
            if not isinstance(state[key], Tensor):
                raise ValueError(
                    f"`state[{key!r}]` must be a tensor; got {type(state[key]).__name__}."
                )
        scalars = {}
        for key in ("capacity", "dim", "cursor", "num_seen"):
            t = state[key]
            if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(
                    f"`state[{key!r}]` must be an integer scalar tensor; got dtype {t.dtype}, shape {tuple(t.shape)}."
                )
            scalars[key] = int(t.item())
        capacity, dim, cursor, num_seen = (
            scalars[k] for k in ("capacity", "dim", "cursor", "num_seen")
        )
        if capacity != self._capacity:
            raise ValueError(
                f"`state['capacity']`={capacity} differs from this memory's capacity={self._capacity};"
                f" construct the memory with capacity={capacity} to load it."
            )
        if dim != -1 and dim < 1:
            raise ValueError(f"`state['dim']` must be -1 (not fixed) or >= 1; got {dim}.")
        if self._dim is not None and dim not in (-1, self._dim):
            raise ValueError(
                f"`state['dim']`={dim} differs from this memory's fixed dim={self._dim}."
            )
        if num_seen < 0:
            raise ValueError(f"`state['num_seen']` must be >= 0; got {num_seen}.")
        size = min(num_seen, capacity)
        if cursor != num_seen % capacity:
            raise ValueError(
                f"`state['cursor']`={cursor} is inconsistent with num_seen={num_seen} and capacity={capacity}"
                f" (expected {num_seen % capacity})."
            )
        keys, values = state["keys"], state["values"]
        width = dim if dim != -1 else (self._dim if self._dim is not None else "D")
        if (
            keys.dtype != torch.float32
            or keys.ndim != 2
            or keys.shape[0] != size
            or (dim != -1 and keys.shape[1] != dim)
        ):
            raise ValueError(
                f"`state['keys']` must be float32 of shape [{size}, {width}] (len = min(num_seen, capacity));"
                f" got {keys.dtype} of shape {tuple(keys.shape)}."
            )
        if dim == -1 and size > 0:
            raise ValueError(f"`state['dim']` is -1 (not fixed) but the state holds {size} keys.")
        if values.dtype != torch.int64 or values.shape != (size,):
            raise ValueError(
                f"`state['values']` must be int64 of shape [{size}]; got {values.dtype} of shape {tuple(values.shape)}."
            )
        if size and not _all_finite(keys):
            raise ValueError("`state['keys']` must be finite; got NaN or infinite values.")
        if size and bool((values < 0).any()):
            raise ValueError("`state['values']` must be non-negative labels; got negative values.")
        gen_state = state["generator_state"]
        probe = torch.Generator()
        try:
            probe.set_state(gen_state.detach().cpu())
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"`state['generator_state']` is not a CPU torch.Generator state: {exc}"
            ) from exc
        payload = state.get(PAYLOAD_KEY)
        if payload is not None:
            _check_payload_rows(
                payload,
                size,
                f"`state[{PAYLOAD_KEY!r}]",
                f"{size} rows (len = min(num_seen, capacity))",
            )
        ann = None
        if self._index_string != EXACT_INDEX and dim != -1:
            ann = _LiveRowIndex(self._index_string, dim, self._index_params, self._capacity)

        # Everything checked: commit. Fresh buffers release the pages of the old contents.
        new_dim = dim if dim != -1 else self._dim
        if new_dim is not None:
            self._allocate(new_dim)
        self._generator = probe
        self._num_seen = num_seen
        self._size = size
        self._version += 1
        self._payload = None
        if payload is not None:
            self._payload = _allocate_payload(payload, self._capacity)
            for name, tensor in payload.items():
                self._payload[name][:size].copy_(tensor)
        if size:
            assert self._keys is not None and self._values is not None and self._norms is not None
            with torch.no_grad():
                self._keys[:size].copy_(keys)
                self._values[:size].copy_(values)
                if self._device.type == "cpu":
                    self._norms.numpy()[:size] = _squared_norms_np(self._keys[:size].numpy())
                else:
                    self._norms[:size].copy_(self._keys[:size].square().sum(1))
        if ann is not None:
            self._ann = ann
            ann.update(self._keys_numpy(), np.arange(size, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = {
            key: {n: t.cpu() for n, t in value.items()} if key == PAYLOAD_KEY else value.cpu()
            for key, value in self.state_dict().items()
        }
        return {"config": self._config(), "state": state}

    def __setstate__(self, payload: dict[str, Any]) -> None:
        self.__init__(**payload["config"])  # type: ignore[misc]
        self.load_state_dict(payload["state"])

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``EpisodicMemory(**memory.config)`` is an empty twin."""
        return self._config()

    def _config(self) -> dict[str, Any]:
        return {
            "capacity": self._capacity,
            "dim": self._dim,
            "eviction": self._eviction,
            "index": self._index_string,
            "backend": self._backend_arg,
            "seed": self._seed,
            "device": str(self._device),
            "index_params": self._index_params,
        }

    def to(self, device: torch.device | str) -> EpisodicMemory:
        """Moves the storage to ``device`` and returns ``self``.

        Only the filled part is copied. With ``backend="faiss"`` or an approximate index the
        storage stays on the CPU (this is then a no-op; searches still return results on the
        queries' device).
        """
        target = _resolve_device(device)
        if (
            self._backend_arg == "faiss"
            or self._index_string != EXACT_INDEX
            or target == self._device
        ):
            return self
        if self._keys is not None and self._values is not None and self._norms is not None:
            n = self._size
            keys = torch.empty_like(self._keys, device=target)
            values = torch.empty_like(self._values, device=target)
            norms = torch.empty_like(self._norms, device=target)
            keys[:n].copy_(self._keys[:n])
            values[:n].copy_(self._values[:n])
            norms[:n].copy_(self._norms[:n])
            self._keys, self._values, self._norms = keys, values, norms
        self._device = target
        self._version += 1
        self._scratch = threading.local()
        return self

    # ------------------------------------------------------------------ internals

    def _allocate(self, dim: int) -> None:
        """Fresh (untouched) buffers for ``dim`` and, for an approximate index, a fresh index.

        The index is built first: an invalid index string raises before anything changes.
        """
        ann = None
        if self._index_string != EXACT_INDEX:
            ann = _LiveRowIndex(self._index_string, dim, self._index_params, self._capacity)
        # Buffers are never inference tensors, even when the first write happens in inference mode.
        # Plain `torch.empty`: pages are backed as they are written, and on the CPU this
        # deliberately does not ask for transparent huge pages (`numpy.empty` does, through
        # `madvise`, for large arrays): the system's THP setting decides. A huge page is faulted
        # in 2 MiB at a time, cheap where free memory is backed already; but on a virtual machine
        # that hands freed memory back to its host (virtio-balloon free page reporting) each fresh
        # huge page cost ~5 ms: the bulk writes that fill a 10 MB memory during one epoch
        # (`benchmarks/end_to_end.py`'s MLP) took 6-29 ms in four runs with huge pages, 7.6-8.0 ms
        # with 4 KiB pages.
        with torch.inference_mode(False):
            self._keys = torch.empty(
                (self._capacity, dim), dtype=torch.float32, device=self._device
            )
            self._values = torch.empty((self._capacity,), dtype=torch.int64, device=self._device)
            self._norms = torch.empty((self._capacity,), dtype=torch.float32, device=self._device)
        self._dim = dim
        self._ann = ann
        self._scratch = threading.local()

    def _keys_numpy(self) -> npt.NDArray[np.float32]:
        """Zero-copy numpy view of the filled keys (CPU storage only)."""
        assert self._keys is not None
        return self._keys[: self._size].numpy()

    def _check_add(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, np.ndarray | None]:
        """Validated ``(keys as float32, labels as int64, squared key norms)``; raises before any
        mutation. The norms (numpy, for CPU storage only; None otherwise) double as the
        finiteness check: a NaN or inf key makes its norm non-finite."""
        if not isinstance(keys, Tensor):
            raise ValueError(f"`keys` must be a torch.Tensor; got {type(keys).__name__}.")
        if not isinstance(values, Tensor):
            raise ValueError(f"`values` must be a torch.Tensor; got {type(values).__name__}.")
        width = "D" if self._dim is None else str(self._dim)
        if keys.ndim != 2 or (self._dim is not None and keys.shape[1] != self._dim):
            raise ValueError(
                f"`keys` must have shape [N, {width}] (the memory's key width); got shape {tuple(keys.shape)}."
            )
        if keys.shape[1] == 0:
            raise ValueError(
                f"`keys` must have at least one column; got shape {tuple(keys.shape)}."
            )
        if keys.dtype == torch.bool or keys.is_complex():
            raise ValueError(f"`keys` must be real-valued; got dtype {keys.dtype}.")
        if values.ndim != 1 or values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"`values` must have shape [N] with N = {keys.shape[0]} (the number of keys); got shape"
                f" {tuple(values.shape)}."
            )
        if values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"`values` must be integer labels; got dtype {values.dtype}.")
        keys32 = keys.detach().to(torch.float32)
        norms = None
        if self._device.type == "cpu":
            norms = _squared_norms_np(keys32.cpu().numpy())
            finite = bool(np.isfinite(norms).all()) or _all_finite(keys32)  # squares can overflow
        else:
            finite = _all_finite(keys32)
        if not finite:
            raise ValueError("`keys` must be finite (as float32); got NaN or infinite values.")
        labels = values.detach()
        if labels.is_floating_point():
            ok = torch.isfinite(labels) & (labels == labels.floor()) & (labels < 2.0**63)
            if not bool(ok.all()):
                bad = labels[~ok][:3].tolist()
                raise ValueError(
                    f"`values` must be integer labels; got non-integral values such as {bad}."
                )
        if _any_negative(labels):
            bad = labels[labels < 0][:3].tolist()
            raise ValueError(f"`values` must be non-negative labels; got {bad}.")
        return keys32, labels.to(torch.int64), norms

    def _check_payload(self, payload: Mapping[str, Tensor] | None, n: int) -> None:
        """Raises before any mutation if ``payload`` does not fit this memory's payload."""
        if payload is None:
            if self._payload is not None:
                raise ValueError(
                    f"`payload` is required: this memory stores a payload with every entry (names"
                    f" {sorted(self._payload)}); clear() it to store entries without one."
                )
            return
        _check_payload_rows(payload, n, "`payload", f"N = {n} rows (one per key)")
        if self._payload is None:
            if self._size > 0:
                raise ValueError(
                    f"`payload` cannot be added to a memory that already holds {self._size} entries"
                    " without one; clear() it first."
                )
            return
        if set(payload) != set(self._payload):
            raise ValueError(
                f"`payload` must have the names {sorted(self._payload)} of the stored payload; got"
                f" {sorted(payload)}."
            )
        for name, tensor in payload.items():
            stored = self._payload[name]
            if tensor.shape[1:] != stored.shape[1:] or tensor.dtype != stored.dtype:
                raise ValueError(
                    f"`payload[{name!r}]` must have rows of shape {tuple(stored.shape[1:])} and dtype"
                    f" {stored.dtype} like the stored payload; got {tuple(tensor.shape[1:])},"
                    f" {tensor.dtype}."
                )


def _allocate_payload(like: Mapping[str, Tensor], capacity: int) -> dict[str, Tensor]:
    """Untouched CPU buffers ``[capacity, ...]`` with the row shape and dtype of each tensor."""
    with torch.inference_mode(False):
        return {
            name: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device="cpu")
            for name, t in like.items()
        }


def _write_payload(
    buffers: dict[str, Tensor] | None,
    payload: Mapping[str, Tensor],
    rows: Int64Array,
    slots: Int64Array,
) -> None:
    """``buffers[name][slots] = payload[name][rows]`` for every name."""
    assert buffers is not None
    slots_t = torch.from_numpy(slots)
    for name, tensor in payload.items():
        source = tensor.detach()
        if rows.size != source.shape[0]:
            source = source.index_select(0, torch.from_numpy(rows).to(source.device))
        with torch.no_grad():
            buffers[name].index_copy_(0, slots_t, source.cpu())


def _check_payload_rows(payload: Any, n: int, label: str, rows: str) -> None:
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
                f" got {_describe_tensor(tensor)}."
            )
        if tensor.shape[0] != n:
            raise ValueError(
                f"{label}[{name!r}]` must have {rows}; got shape {tuple(tensor.shape)}."
            )


def _describe_tensor(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _empty_neighbours(
    b: int, k: int, d: int, dtype: torch.dtype, device: torch.device
) -> Neighbours:
    return Neighbours(
        keys=torch.zeros(b, k, d, dtype=dtype, device=device),
        values=torch.zeros(b, k, dtype=torch.int64, device=device),
        distances=torch.full((b, k), float("inf"), dtype=torch.float32, device=device),
        mask=torch.zeros(b, k, dtype=torch.bool, device=device),
        indices=torch.full((b, k), -1, dtype=torch.int64, device=device),
    )


def _exact_squared_distances(queries: Tensor, keys: Tensor) -> Tensor:
    """``||q_b - h_bj||²`` for ``queries`` [B, D] and ``keys`` [B, K, D] (GPU path), as a difference:
    exact for duplicates, unlike ``|q|² + |h|² - 2 q·h``."""
    return (keys - queries.unsqueeze(1)).square_().sum(-1)


def _gather_rows_and_distances_np(
    store: npt.NDArray[np.float32], slots: Int64Array, queries: npt.NDArray[np.float32] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """``store[slots]`` ``[B, K, D]`` and, unless ``queries`` is None, the squared distances
    ``||q_b - store[slots[b, k]]||²`` ``[B, K]`` as a difference (exact for duplicates, unlike
    ``|q|² + |h|² - 2 q·h``).

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


def _squared_norms_np(keys: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.einsum("nd,nd->n", keys, keys)


def _all_finite(x: Tensor) -> bool:
    """Whether a float tensor holds no NaN/inf (numpy on the CPU: no OpenMP region)."""
    if x.device.type == "cpu":
        a = x.numpy()
        # A NaN or inf anywhere makes the sum non-finite; a finite sum proves all are finite.
        # Only a sum that overflows needs the element-wise check.
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
    return bool(torch.isfinite(x).all())


def _any_negative(x: Tensor) -> bool:
    """Whether a real tensor holds a value < 0 (numpy on the CPU: a few µs less per write)."""
    if x.device.type == "cpu" and x.numel():
        return bool(x.numpy().min() < 0)
    return bool((x < 0).any())


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    target = torch.device("cpu") if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())
    return target
