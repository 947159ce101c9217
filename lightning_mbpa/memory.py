"""A fixed-capacity episodic memory of ``(embedding, label)`` pairs with K-nearest-neighbour lookup.

Memory-based Parameter Adaptation (MbPA; Sprechmann et al., 2018, "Memory-based Parameter
Adaptation", arXiv:1802.10542) writes the embedding ``h = f(x)`` of every training example and its
label into an episodic memory, and at test time adapts the output head on the K stored
embeddings nearest to each query by squared Euclidean distance. This module is that memory and
nothing else (:class:`EpisodicMemory`); it has no Lightning dependency. Its parts, each owning
one piece of state, are private modules (``docs/design/memory.md`` lists them).

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

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_mbpa._eviction import SlotAssigner
from lightning_mbpa._exact_search import (  # noqa: F401  (re-exported for tests and benchmarks)
    _TOPK_GROUP,
    _TORCH_BLOCK_ELEMENTS,
    ExactSearch,
    _smallest,
)
from lightning_mbpa._faiss_index import _LiveRowIndex, _new_index
from lightning_mbpa._kernel_choice import forget_kernel_choices, kernel_choices
from lightning_mbpa._memory_checks import (
    EXACT_INDEX,
    PAYLOAD_KEY,
    STATE_KEYS,
    Backend,
    CheckedRows,
    Eviction,
    check_config,
    check_key_update,
    check_payload,
    check_queries,
    check_rows,
    check_state,
    common_rows,
    resolve_device,
)
from lightning_mbpa._memory_state import check_class_balanced_state, memory_state, restore_state
from lightning_mbpa._neighbours import Neighbours, nearest
from lightning_mbpa._storage import KeyStore
from lightning_mbpa._writing import PendingRows, refusal, write_placed, write_rows

__all__ = [
    "EXACT_INDEX",
    "PAYLOAD_KEY",
    "STATE_KEYS",
    "CheckedRows",
    "EpisodicMemory",
    "Neighbours",
    "forget_kernel_choices",
    "kernel_choices",
]


class EpisodicMemory:
    """A fixed-capacity memory of float32 keys and int64 labels with exact or approximate K-NN.

    Keys live in a preallocated, uninitialised ``[capacity, D]`` float32 buffer, so resident
    memory grows with the fill, not with the capacity. Eviction once the memory is full:

    * ``"fifo"``: a ring; the oldest entry is overwritten (the paper's choice).
    * ``"reservoir"``: Algorithm R: the memory is a uniform sample of everything ever offered,
      drawn with a ``torch.Generator`` seeded with ``seed``.
    * ``"class_balanced"``: the oldest entry of the class that holds the most entries (among
      equally large classes the item's own, else the smallest label): per-class counts stay as
      equal as the stream allows.

    Every eviction treats a batch row by row, exactly as one-at-a-time insertion would.
    :meth:`search` returns the ``k`` nearest keys by squared Euclidean distance, exactly
    (``index="Flat"``) or through an approximate faiss index that never returns an overwritten
    entry; the distances returned are always exact. Each entry may carry a *payload* (per-row
    tensors such as the model input, kept on the CPU) that follows it through eviction, so that
    its key can be recomputed later (:meth:`update_keys`). Nothing here changes a thread
    setting. How the buffers, eviction, search kernels and threads work in detail:
    [Memory layout](design/memory.md).

    Args:
        capacity: Maximum number of entries (>= 1).
        dim: Key width; fixed by the first :meth:`add` when None.
        eviction: ``"fifo"``, ``"reservoir"`` or ``"class_balanced"`` (see above).
        index: ``"Flat"`` for exact search, or a ``faiss.index_factory`` string for an approximate
            index (faiss backend only).
        backend: ``"faiss"``, ``"torch"``, or ``"auto"``: faiss for an approximate index; for
            exact search torch on a GPU and, on the CPU, whichever of the torch kernel and
            ``faiss.knn`` is faster on the machine at hand (neither is everywhere: it depends on
            the CPU, the BLAS each library ships, the thread count and the number of queries).
            The first search of each new shape (keys, queries and ``k`` rounded down to powers
            of two, the width, the thread count) times both kernels twice, alternating, over at
            most 32768 of the stored keys and the actual queries: about 4 searches of up to
            32768 keys, once per shape and process (when that covered every key, the faster
            one's result is the search's). The decision is logged at DEBUG level on the
            ``lightning_mbpa.memory`` logger (:func:`kernel_choices` lists them). Searches of
            fewer than ``2**25`` multiply-adds (keys x width x queries) use torch untimed.
            ``"torch"`` or ``"faiss"`` skips the calibration.
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
        target = check_config(capacity, dim, eviction, index, backend, seed, device, index_params)
        self._capacity = int(capacity)
        self._eviction: Eviction = eviction
        self._index_string = index
        self._index_params = index_params
        self._backend_arg: Backend = backend
        self._seed = int(seed)
        # The parts, each owning its state: buffers, slot assignment, exact search (the kernel in
        # use, the torch kernel's per-thread score blocks), and (approximate search only) the
        # faiss index over the stored keys.
        self._store = KeyStore(self._capacity, target)
        self._slots = SlotAssigner(eviction, self._capacity, self._seed)
        self._exact = ExactSearch(backend)
        self._ann: _LiveRowIndex | None = None
        self._pending = PendingRows()  # small writes waiting for one bulk write
        # Bumped by every change of the contents: caches derived from the keys compare it.
        self._version = 0
        if dim is not None:
            self._allocate(int(dim))

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as primitives: ``EpisodicMemory(**memory.config)`` builds an
        identically configured, empty memory.

        Keys: ``capacity``, ``dim`` (as fixed by the first write, else as given), ``eviction``,
        ``index``, ``backend`` (as given, e.g. ``"auto"``), ``seed``, ``device`` (a str, where the
        storage lives now) and ``index_params``. A new dict on every read.
        """
        return {
            "capacity": self._capacity,
            "dim": self._store.dim,
            "eviction": self._eviction,
            "index": self._index_string,
            "backend": self._backend_arg,
            "seed": self._seed,
            "device": str(self._store.device),
            "index_params": self._index_params,
        }

    @property
    def capacity(self) -> int:
        """Maximum number of entries."""
        return self._capacity

    @property
    def dim(self) -> int | None:
        """Key width, or None until the first write fixes it."""
        return self._store.dim

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
    def backend(self) -> Literal["auto", "faiss", "torch"]:
        """The backend searches use: faiss for an approximate index; for exact search the one
        given, and with ``"auto"`` torch on a GPU and, on the CPU, the kernel the most recent
        search used (the one the next search of that shape uses): ``"auto"`` until then."""
        if self._index_string != EXACT_INDEX:
            return "faiss"
        return self._exact.kernel(self._store.device) or "auto"

    @property
    def device(self) -> torch.device:
        """Where the key buffer lives."""
        return self._store.device

    @property
    def seed(self) -> int:
        """Seed of the reservoir generator (used again by :meth:`clear`)."""
        return self._seed

    @property
    def keys(self) -> Tensor:
        """A view of the filled part of the key buffer, ``[len, D]`` float32, in slot order."""
        self._settle()
        if self._store.keys is None:
            return torch.empty(0, 0, dtype=torch.float32, device=self._store.device)
        return self._store.keys[: self._store.size]

    @property
    def values(self) -> Tensor:
        """A view of the filled part of the label buffer, ``[len]`` int64, in slot order."""
        self._settle()
        if self._store.values is None:
            return torch.empty(0, dtype=torch.int64, device=self._store.device)
        return self._store.values[: self._store.size]

    @property
    def payload(self) -> dict[str, Tensor]:
        """Views of the filled part of the payload buffers, ``[len, ...]`` on the CPU, in slot
        order, by name; empty when the memory stores no payload."""
        self._settle()
        if self._store.payload is None:
            return {}
        return {name: buffer[: self._store.size] for name, buffer in self._store.payload.items()}

    @property
    def version(self) -> int:
        """A counter that every change of the stored entries (write, key update, clear, load,
        move to another device) increases: a cache of anything computed from the keys is current while it holds."""
        self._settle()
        return self._version

    @property
    def num_seen(self) -> int:
        """How many rows were ever offered to :meth:`add` (kept or not) since the last clear."""
        self._settle()
        return self._slots.num_seen

    @property
    def faiss_index(self) -> Any | None:
        """The approximate faiss index, or None (exact search, or before the first write).

        It holds rows in add order, not slots, and may hold overwritten rows; use it to read or
        tune search settings, not to add or search directly.
        """
        self._settle()
        return None if self._ann is None else self._ann.index

    @property
    def is_trained(self) -> bool:
        """False while an approximate index waits for enough keys to train (search is exact)."""
        self._settle()
        return self._ann is None or self._ann.active

    @property
    def _keys(self) -> Tensor | None:
        """The whole preallocated key buffer (None before the width is fixed)."""
        self._settle()
        return self._store.keys

    @property
    def _norms(self) -> Tensor | None:
        """The whole preallocated buffer of squared key norms (None before the width is fixed)."""
        self._settle()
        return self._store.norms

    def __len__(self) -> int:
        self._settle()
        return self._store.size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self._capacity}, dim={self.dim}, len={len(self)},"
            f" eviction={self._eviction!r}, index={self._index_string!r}, backend={self.backend!r},"
            f" device={str(self.device)!r})"
        )

    def check_dim(self, dim: int) -> None:
        """Raises if keys of width ``dim`` cannot be written; changes nothing.

        Lets a caller that buffers writes find out at the first key, not at the first ``add``.

        Raises:
            ValueError: ``dim`` differs from the memory's fixed width, or the approximate index
                cannot index vectors of that width (``"PQ3"`` needs a width divisible by 3).
        """
        if self.dim is not None:
            if dim != self.dim:
                raise ValueError(
                    f"keys of width {dim} cannot be written: the memory holds keys of width "
                    f"{self.dim}."
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
        ``3.0`` are accepted). Nothing changes when a check fails. The same as
        ``add_checked(check_rows(keys, values, payload))``.

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
        return self.add_checked(self._check_rows(keys, values, payload, norms=True))

    def check_rows(
        self, keys: Tensor, values: Tensor, payload: Mapping[str, Tensor] | None = None
    ) -> CheckedRows:
        """Checks rows for :meth:`add_checked` or :meth:`append_checked` in one pass over the
        data, for a caller that looks at them before writing (``MbPA`` drops rows with an ignore
        label by :meth:`CheckedRows.select`, compares the labels with the head's classes and
        refuses non-finite batches), so that nothing is checked twice. Changes nothing.

        Shapes, dtypes, integral labels and the payload's layout raise here; whether the keys are
        finite and the labels non-negative is measured (``finite``, ``low``) and enforced when
        the rows are written.

        Raises:
            ValueError: As :meth:`add`, but for non-finite keys and negative labels.
        """
        store = self._store
        if payload is None and store.payload is None:  # the common case, in one call
            pending = store.on_cpu and self._index_string == EXACT_INDEX
            return check_rows(keys, values, store.dim, store.on_cpu, not pending)
        return self._check_rows(keys, values, payload, norms=True)

    def add_checked(self, rows: CheckedRows) -> Tensor:
        """Writes rows :meth:`check_rows` checked for this memory without looking at the data
        again, as :meth:`add` (which is ``add_checked(check_rows(...))``) would; returns the slots.

        Raises:
            ValueError: The rows hold non-finite keys or negative labels (nothing is written), or
                no longer fit the memory (cleared or reloaded since they were checked).
        """
        self._settle()
        if not self._accept(rows):
            return torch.empty(0, dtype=torch.int64)
        slot_of_row = write_placed(self._store, self._slots, self._ann, rows)
        self._version += 1
        return torch.from_numpy(slot_of_row)

    def append_checked(self, rows: CheckedRows) -> None:
        """Writes checked rows as :meth:`add_checked` does, but small CPU writes to an exact
        memory without a payload may first wait in a pending buffer (about 1 MiB of keys) that
        is written in one bulk write before anything reads or changes the memory (every property,
        search, ``len``, ``state_dict``, pickle and write sees them). The memory ends exactly as
        one :meth:`add` per call would leave it; a failing check raises now, nothing pending.

        Raises:
            ValueError: As :meth:`add_checked`.
        """
        pending = self._pending
        if rows.payload is not None or not self._buffers() or not pending.fits(rows):
            self.add_checked(rows)
        elif self._accept(rows):
            self._pend(rows)

    def append_if_valid(
        self, keys: Tensor, values: Tensor, labels_below: int | None = None
    ) -> bool:
        """Appends rows as ``append_checked(check_rows(keys, values))`` would, in one pass, when
        they are the common small write and pass every check; otherwise changes nothing and
        returns False, and the caller takes the general path (:meth:`check_rows`,
        :meth:`append_checked`), which raises or refuses with the reason.

        The common write: CPU float32 keys ``[N, D]`` (``N`` at most 1024, less than the pending
        buffer) without grad for an exact CPU memory that holds keys of width ``D`` already and
        no payload, ``[N]`` int64 CPU labels, every key finite and every label in
        ``[0, labels_below)`` (``[0, inf)`` when None).
        """
        store = self._store
        dim = store.dim
        if dim is None or store.payload is not None or not self._buffers():
            return False
        rows = common_rows(keys, values, dim)
        if (
            rows is None
            or not rows.finite
            or rows.low < 0
            or (labels_below is not None and rows.high >= labels_below)
        ):
            return False
        if not self._pending.fits(rows):
            return False
        self._pend(rows)
        return True

    def _pend(self, rows: CheckedRows) -> None:
        """Appends accepted rows to the pending buffer, writing the pending ones first when the
        new ones do not fit behind them."""
        pending = self._pending
        if pending.count and not pending.room(len(rows), rows.keys.shape[1]):
            self._settle()
        pending.append(rows)

    def _check_rows(
        self, keys: Tensor, values: Tensor, payload: Mapping[str, Tensor] | None, norms: bool
    ) -> CheckedRows:
        store = self._store
        rows = check_rows(keys, values, store.dim, store.on_cpu, norms)
        if payload is not None or store.payload is not None:
            check_payload(payload, len(rows), store.payload, store.size)
            rows = dataclasses.replace(rows, payload=payload)
        return rows

    def _accept(self, rows: CheckedRows) -> bool:
        """Raises unless checked rows may be written now (:func:`refusal`); allocates the
        storage for the first ones. False: there are none."""
        store = self._store
        problem = refusal(rows, store, self._pending.count)
        if problem is not None:
            raise ValueError(problem)
        if not len(rows):
            return False
        if store.dim is None:
            self._allocate(rows.keys.shape[1])
        if rows.payload is not None and store.payload is None:
            store.allocate_payload(rows.payload)
        return True

    def _buffers(self) -> bool:
        """Whether small writes may wait in the pending buffer: exact search on CPU storage."""
        return self._index_string == EXACT_INDEX and self._store.on_cpu

    def _settle(self) -> None:
        """Writes the pending rows, in one bulk write, before anything reads or changes them."""
        if self._pending.count:
            write_rows(self._store, self._slots, self._ann, self._pending.take())
            self._version += 1

    def clear(self) -> None:
        """Empties the memory: ``len``, ``num_seen`` and the FIFO cursor go to 0, the reservoir
        generator is re-seeded with ``seed`` and an approximate index goes back to untrained. A
        fixed ``dim`` stays fixed; the buffers are reallocated, so their pages are released. The
        payload is dropped (the next write decides whether there is one)."""
        self._pending.drop()
        self._slots.reset()
        self._store.size = 0
        self._version += 1
        self._store.payload = None
        if self._store.dim is not None:
            self._allocate(self._store.dim)

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
        self._settle()
        store = self._store
        slots_np, keys32, new_norms = check_key_update(
            slots, keys, store.size, store.dim, store.on_cpu
        )
        if slots_np.size == 0:
            return
        store.update_keys(slots_np, keys32, new_norms)
        self._version += 1
        if self._ann is not None:
            self._ann.update(store.keys_numpy(), slots_np)

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
        self._settle()
        q32 = check_queries(queries, k, self._store.dim)
        return nearest(self._store, self._exact, self._ann, q32, int(k), queries)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The memory as plain tensors, loadable with ``torch.load(..., weights_only=True)``.

        Only the filled part is stored, as compact copies: ``keys`` ``[len, D]`` float32,
        ``values`` ``[len]`` int64, int64 scalars ``capacity``, ``dim`` (``-1`` when not fixed),
        ``cursor`` (the next FIFO slot) and ``num_seen``, and ``generator_state`` (uint8), so a
        restored memory continues exactly as this one would. A memory with a payload adds
        ``payload``: a dict of the filled payload tensors by name (CPU); class-balanced
        eviction adds ``inserted``, ``[len]`` int64: the write count (0-based over all writes)
        of each slot's entry. Approximate indexes are
        not stored; :meth:`load_state_dict` rebuilds them from the keys.
        """
        self._settle()
        return memory_state(self._store, self._slots, self._capacity)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output; everything is checked before anything changes.

        Raises:
            ValueError: A missing/unexpected entry, a capacity or dim that differs from this
                memory's, inconsistent shapes or counters, non-finite keys, negative labels or a
                bad generator state. The memory is left as it was.
        """
        self._settle()
        checked = check_state(state, self._capacity, self.dim)
        check_class_balanced_state(checked, self._eviction)
        ann = None
        if self._index_string != EXACT_INDEX and checked.dim != -1:
            ann = _LiveRowIndex(self._index_string, checked.dim, self._index_params, self._capacity)
        # Everything checked: commit. Fresh buffers release the pages of the old contents.
        new_dim = checked.dim if checked.dim != -1 else self.dim
        if new_dim is not None:
            self._allocate(new_dim)
        restore_state(self._store, self._slots, checked)
        self._version += 1
        if ann is not None:
            self._ann = ann
            ann.update(self._store.keys_numpy(), np.arange(checked.size, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = {
            key: {n: t.cpu() for n, t in value.items()} if key == PAYLOAD_KEY else value.cpu()
            for key, value in self.state_dict().items()
        }
        return {"config": self.config, "state": state}

    def __setstate__(self, payload: dict[str, Any]) -> None:
        self.__init__(**payload["config"])  # type: ignore[misc]
        self.load_state_dict(payload["state"])

    def to(self, device: torch.device | str) -> EpisodicMemory:
        """Moves the storage to ``device`` and returns ``self``.

        Only the filled part is copied. With ``backend="faiss"`` or an approximate index the
        storage stays on the CPU (this is then a no-op; searches still return results on the
        queries' device).
        """
        self._settle()
        target = resolve_device(device)
        if (
            self._backend_arg == "faiss"
            or self._index_string != EXACT_INDEX
            or target == self._store.device
        ):
            return self
        self._store.move_to(target)
        self._version += 1
        self._exact.reset()
        return self

    # ------------------------------------------------------------------ internals

    def _allocate(self, dim: int) -> None:
        """Fresh (untouched) buffers for ``dim`` and, for an approximate index, a fresh index.

        The index is built first: an invalid index string raises before anything changes.
        """
        ann = None
        if self._index_string != EXACT_INDEX:
            ann = _LiveRowIndex(self._index_string, dim, self._index_params, self._capacity)
        self._store.allocate(dim)
        self._ann = ann
        self._exact.reset()
