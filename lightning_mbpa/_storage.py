"""The preallocated buffers of an episodic memory: keys, labels, squared key norms and payload.

One idea: :class:`KeyStore` owns fixed-capacity buffers and writes rows into given slots; it
knows nothing about which slot a row should take (eviction) or how the keys are searched. Keys
live in an uninitialised ``[capacity, D]`` float32 buffer (``torch.empty``), so the operating
system only backs the pages that have been written: resident memory grows with the fill, not
with the capacity. The squared norm ``|h|²`` of every key is kept beside it for exact search.
A payload (per-entry tensors such as the inputs the keys were computed from) lives on the CPU
at the same slots, so it follows its key through eviction.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lightning_mbpa._eviction import Int64Array, Run
from lightning_mbpa._memory_checks import squared_norms_np


class KeyStore:
    """Key, label and norm buffers of ``capacity`` rows on ``device``, plus the CPU payload.

    ``keys``/``values``/``norms`` are None until :meth:`allocate` fixes the key width ``dim``;
    ``payload`` is None while the memory stores no payload. ``size`` rows (slots ``0..size-1``)
    are filled.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.on_cpu = device.type == "cpu"  # read on every write
        self.dim: int | None = None
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.norms: Tensor | None = None
        self.payload: dict[str, Tensor] | None = None
        self.size = 0
        # (the key buffer, numpy views of the key, label and norm buffers) for `write_run`
        self._views: (
            tuple[Tensor, npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]
            | None
        ) = None

    def allocate(self, dim: int) -> None:
        """Fresh, untouched buffers for keys of width ``dim`` (the old contents are released)."""
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
            self.keys = torch.empty((self.capacity, dim), dtype=torch.float32, device=self.device)
            self.values = torch.empty((self.capacity,), dtype=torch.int64, device=self.device)
            self.norms = torch.empty((self.capacity,), dtype=torch.float32, device=self.device)
        self.dim = dim
        self._views = None  # the old buffers' pages are released

    def allocate_payload(self, like: Mapping[str, Tensor]) -> None:
        """Untouched CPU buffers ``[capacity, ...]`` with the row shape and dtype of each tensor."""
        with torch.inference_mode(False):
            self.payload = {
                name: torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype, device="cpu")
                for name, t in like.items()
            }

    def keys_numpy(self) -> npt.NDArray[np.float32]:
        """Zero-copy numpy view of the filled keys (CPU storage only)."""
        assert self.keys is not None
        return self.keys[: self.size].numpy()

    def write(
        self,
        keys32: Tensor,
        labels: Tensor,
        norms: npt.NDArray[np.float32] | None,
        slot_of_row: Int64Array,
        runs: list[Run] | None,
    ) -> Int64Array | None:
        """Writes row ``i`` of the validated keys/labels (and CPU ``norms``) to ``slot_of_row[i]``
        (``-1``: not kept). Returns the written slots (row order), or None when the rows went in
        as the contiguous ``runs`` (then ``slot_of_row`` says where)."""
        assert self.keys is not None and self.values is not None and self.norms is not None
        if self.on_cpu:
            # numpy on the CPU: single-threaded memory copies, immune to OpenMP contention.
            assert norms is not None
            new_keys = keys32.cpu().numpy()
            new_labels = labels.cpu().numpy()
            targets = (self.keys.numpy(), self.values.numpy(), self.norms.numpy())
            if runs is not None:  # FIFO and a filling reservoir: at most two slice copies
                for row, slot, length in runs:
                    for target, new in zip(targets, (new_keys, new_labels, norms), strict=True):
                        target[slot : slot + length] = new[row : row + length]
                return None
            rows = np.flatnonzero(slot_of_row >= 0)
            slots = slot_of_row[rows]
            for target, new in zip(targets, (new_keys, new_labels, norms), strict=True):
                target[slots] = new[rows]
            return slots
        rows = np.flatnonzero(slot_of_row >= 0)
        slots = slot_of_row[rows]
        if rows.size:
            rows_t = torch.from_numpy(rows).to(keys32.device)
            slots_t = torch.from_numpy(slots).to(self.device)
            with torch.no_grad():
                kept = keys32.index_select(0, rows_t).to(self.device)
                self.keys.index_copy_(0, slots_t, kept)
                kept_labels = labels.index_select(0, rows_t.to(labels.device))
                self.values.index_copy_(0, slots_t, kept_labels.to(self.device))
                self.norms.index_copy_(0, slots_t, kept.square().sum(1))
        return slots

    def write_run(
        self, keys32: Tensor, labels: Tensor, norms: npt.NDArray[np.float32], start: int
    ) -> None:
        """Writes ``N`` validated CPU rows (keys, labels, squared norms) to slots
        ``start .. start + N - 1`` of CPU storage: three numpy slice copies."""
        views = self._views
        if views is None or views[0] is not self.keys:  # numpy views, made once per buffer
            assert self.keys is not None and self.values is not None and self.norms is not None
            arrays = (self.keys.numpy(), self.values.numpy(), self.norms.numpy())
            views = self._views = (self.keys, *arrays)
        end = start + norms.shape[0]
        views[1][start:end] = keys32.numpy()
        views[2][start:end] = labels.numpy()
        views[3][start:end] = norms

    def write_payload(self, payload: Mapping[str, Tensor], slot_of_row: Int64Array) -> None:
        """``payload[name]`` row ``i`` to slot ``slot_of_row[i]`` (``-1``: not kept), per name."""
        assert self.payload is not None
        rows = np.flatnonzero(slot_of_row >= 0)
        if not rows.size:
            return
        slots_t = torch.from_numpy(slot_of_row[rows])
        for name, tensor in payload.items():
            source = tensor.detach()
            if rows.size != source.shape[0]:
                source = source.index_select(0, torch.from_numpy(rows).to(source.device))
            with torch.no_grad():
                self.payload[name].index_copy_(0, slots_t, source.cpu())

    def update_keys(
        self, slots: Int64Array, keys32: Tensor, norms: npt.NDArray[np.float32] | None
    ) -> None:
        """Overwrites the keys (and norms) of distinct filled ``slots``."""
        assert self.keys is not None and self.norms is not None
        if self.on_cpu:
            assert norms is not None
            self.keys.numpy()[slots] = keys32.cpu().numpy()
            self.norms.numpy()[slots] = norms
            return
        slots_t = torch.from_numpy(slots).to(self.device)
        with torch.no_grad():
            new = keys32.to(self.device)
            self.keys.index_copy_(0, slots_t, new)
            self.norms.index_copy_(0, slots_t, new.square().sum(1))

    def load(
        self,
        dim: int | None,
        size: int,
        keys: Tensor,
        values: Tensor,
        payload: Mapping[str, Tensor] | None,
    ) -> None:
        """Replaces the contents with ``size`` checked rows in slot order, in fresh buffers."""
        if dim is not None:
            self.allocate(dim)
        self.size = size
        self.payload = None
        if payload is not None:
            self.allocate_payload(payload)
            assert self.payload is not None
            for name, tensor in payload.items():
                self.payload[name][:size].copy_(tensor)
        if size:
            assert self.keys is not None and self.values is not None and self.norms is not None
            with torch.no_grad():
                self.keys[:size].copy_(keys)
                self.values[:size].copy_(values)
                if self.on_cpu:
                    self.norms.numpy()[:size] = squared_norms_np(self.keys[:size].numpy())
                else:
                    self.norms[:size].copy_(self.keys[:size].square().sum(1))

    def move_to(self, device: torch.device) -> None:
        """Copies the filled part of the key, label and norm buffers to ``device``."""
        if self.keys is not None and self.values is not None and self.norms is not None:
            n = self.size
            keys = torch.empty_like(self.keys, device=device)
            values = torch.empty_like(self.values, device=device)
            norms = torch.empty_like(self.norms, device=device)
            keys[:n].copy_(self.keys[:n])
            values[:n].copy_(self.values[:n])
            norms[:n].copy_(self.norms[:n])
            self.keys, self.values, self.norms = keys, values, norms
        self.device, self.on_cpu = device, device.type == "cpu"
        self._views = None
