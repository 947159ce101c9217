"""Getting checked rows into an episodic memory's storage: at once, or through a pending buffer.

One idea: rows that passed the memory's checks (:class:`~lightning_mbpa._memory_checks.CheckedRows`)
take their slots (:class:`~lightning_mbpa._eviction.SlotAssigner`) and are copied into the
buffers (:class:`~lightning_mbpa._storage.KeyStore`) without being looked at again. Many small
writes (a training step's batch each) may instead be appended to :class:`PendingRows`, a buffer
of about 1 MiB of keys that the memory writes in one bulk write before anything reads or changes
it. Slot assignment is sequential (FIFO, reservoir and class-balanced eviction all treat a batch
row by row, in order), so one bulk write of several batches leaves the memory exactly as one
write per batch would; only the per-write costs (slot arrays, the norms' kernel call, the copies'
calls) are paid once per buffer instead of once per batch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from lightning_mbpa._eviction import Int64Array, SlotAssigner
from lightning_mbpa._faiss_index import _LiveRowIndex
from lightning_mbpa._memory_checks import CheckedRows, check_payload, squared_norms_np
from lightning_mbpa._storage import KeyStore

#: Bytes of float32 keys the pending buffer holds; a write at least this large goes in directly.
PENDING_BYTES = 1 << 20


def refusal(rows: CheckedRows, store: KeyStore, pending: int) -> str | None:
    """Why checked rows may not be written to ``store`` (with ``pending`` rows waiting): non-finite
    keys, negative labels, or (since they were checked) another key width or payload."""
    problem = rows.problem()
    if problem is not None:
        return problem
    n, dim = rows.keys.shape
    if store.dim is not None and dim != store.dim:
        return (
            f"`keys` must have shape [N, {store.dim}] (the memory's key width); got shape"
            f" {tuple(rows.keys.shape)}."
        )
    if rows.payload is not None or store.payload is not None:
        try:
            check_payload(rows.payload, n, store.payload, store.size + pending)
        except ValueError as err:
            return str(err)
    return None


def write_rows(
    store: KeyStore, slots: SlotAssigner, ann: _LiveRowIndex | None, rows: CheckedRows
) -> Int64Array | None:
    """Writes checked rows (at least one; the storage allocated for their width) where the
    eviction puts them; returns the slot of each row (``-1``: not kept), or None when the rows
    went to ``N`` consecutive slots of CPU storage (then no slot array is built)."""
    n = len(rows)
    norms = rows.norms
    if store.on_cpu and norms is None:  # checked for other storage, or for the pending buffer
        norms = squared_norms_np(rows.keys.cpu().numpy())
    start = slots.contiguous_start(n)
    if start is not None and store.on_cpu and ann is None:
        assert norms is not None
        # the common write: a FIFO ring that does not wrap, a filling reservoir
        store.write_run(rows.keys, rows.values, norms, start)
        slots.advance(n)
        store.size = slots.size
        return None
    labels = rows.values
    slot_of_row, runs = slots.assign(
        n, labels.cpu().numpy() if slots.eviction == "class_balanced" else None
    )
    written = store.write(rows.keys, labels, norms, slot_of_row, runs)
    slots.advance(n)
    store.size = slots.size
    if ann is not None:
        if written is None:
            written = slot_of_row[slot_of_row >= 0]
        ann.update(store.keys_numpy(), written)
    return slot_of_row


def write_placed(
    store: KeyStore, slots: SlotAssigner, ann: _LiveRowIndex | None, rows: CheckedRows
) -> Int64Array:
    """:func:`write_rows`, and the rows' payload at their slots; returns the slot of each row
    (``-1``: not kept)."""
    slot_of_row = write_rows(store, slots, ann, rows)
    if slot_of_row is None:  # n consecutive slots
        n = len(rows)
        start = (slots.num_seen - n) % store.capacity
        slot_of_row = np.arange(start, start + n, dtype=np.int64)
    if rows.payload is not None:
        store.write_payload(rows.payload, slot_of_row)
    return slot_of_row


class PendingRows:
    """Checked CPU rows accepted by a memory and not yet in its storage, in arrival order.

    ``keys`` is a preallocated numpy buffer (about :data:`PENDING_BYTES` of keys) of which
    ``count`` rows are pending; ``values`` their labels, as a list (a batch's labels arrive as
    one from the checks: extending it is cheaper than another array copy). The memory decides when rows may wait here
    (:meth:`fits`) and writes them (:meth:`take`) before anything reads or changes it.
    """

    def __init__(self) -> None:
        self.keys: npt.NDArray[np.float32] | None = None
        self.values: list[int] = []
        self.count = 0

    def fits(self, rows: CheckedRows) -> bool:
        """Whether ``rows`` may wait here at all: CPU rows of less than the buffer's bytes."""
        n, dim = rows.keys.shape
        return n * dim * 4 < PENDING_BYTES and rows.keys.is_cpu and rows.values.is_cpu

    def room(self, n: int, dim: int) -> bool:
        """Whether ``n`` more rows of width ``dim`` fit behind the pending ones."""
        keys = self.keys
        return keys is not None and keys.shape[1] == dim and self.count + n <= keys.shape[0]

    def append(self, rows: CheckedRows) -> None:
        """Copies ``rows`` behind the pending ones (the caller made :meth:`room`, or the buffer
        is empty)."""
        keys = rows.keys.numpy()
        n, dim = keys.shape
        buffer = self.keys
        if buffer is None or buffer.shape[1] != dim or self.count + n > buffer.shape[0]:
            assert self.count == 0
            buffer = self.keys = np.empty((max(1, PENDING_BYTES // (4 * dim)), dim), np.float32)
        start, end = self.count, self.count + n
        buffer[start:end] = keys
        self.values.extend(rows.values.tolist() if rows.listed is None else rows.listed)
        self.count = end

    def take(self) -> CheckedRows:
        """The pending rows, as checked rows over the buffer (valid until the next append),
        and an empty buffer."""
        assert self.keys is not None
        n, self.count = self.count, 0
        keys = self.keys[:n]
        values = torch.from_numpy(np.array(self.values, dtype=np.int64))  # (torch.tensor(list) is slower)
        self.values = []
        return CheckedRows(torch.from_numpy(keys), values, squared_norms_np(keys), True, 0, 0)

    def drop(self) -> None:
        """Forget the pending rows and free the buffer."""
        self.keys, self.values, self.count = None, [], 0
