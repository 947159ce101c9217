"""Exact K-nearest-neighbour candidates over a key buffer: a torch kernel and the faiss one.

One idea: given the filled keys (and, for torch, their cached squared norms) and float32 queries,
return the slots of the ``kk`` nearest keys of each query by squared Euclidean distance. Exact
distances and the final order are computed afterwards from the stored keys
(:mod:`lightning_mbpa._neighbours`), so a kernel only has to rank.

* :class:`TorchExactSearch`: a chunked ``|h|² - 2 q·h`` matmul (``torch.addmm``) and a grouped
  top-k on the buffer's device; on the CPU each searching thread reuses its own score block.
* :func:`faiss_exact_candidates`: faiss' exact kernel directly over the buffer (zero copy),
  with the buffer's cached squared norms.
* :class:`ExactSearch`: runs the kernel a memory's ``backend`` asks for; with ``"auto"`` on the
  CPU, the one :mod:`lightning_mbpa._kernel_choice` found faster on this machine.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

# isort: split
# torch first: faiss' OpenMP calls then bind to the OpenMP runtime torch already loaded, so both
# libraries share one thread pool and one thread count instead of two pools competing for the
# cores (see the thread table of benchmarks/memory.py). No thread setting is changed here.
import faiss

from lightning_mbpa import _kernel_choice
from lightning_mbpa._kernel_choice import Kernel
from lightning_mbpa._memory_checks import Backend

# Elements of one [B, chunk] distance block in the torch kernel.
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


class TorchExactSearch:
    """The torch kernel, with each CPU thread's score block kept for its next search.

    A fresh 64 MiB block is page-faulted in on every use (~20 ms on a 2-vCPU VM, ~0.1 ms per
    query at 100k keys), so the block is reused; per thread, so that concurrent searches never
    share it. :meth:`reset` drops every thread's block (when the buffers are reallocated or
    moved). The block holds ``B`` rows of ``max(k, 2**24 / B)`` columns (64 MiB at most unless
    ``B·k > 2**24``).
    """

    def __init__(self) -> None:
        self.scratch = threading.local()

    def reset(self) -> None:
        self.scratch = threading.local()

    def candidates(self, keys: Tensor, norms: Tensor, q: Tensor, kk: int) -> Tensor:
        """Exact top-``kk`` rows of ``keys`` ``[N, D]`` by ``|h|² - 2 q·h`` (the ``|q|²`` term
        ranks nothing), chunked, sorted by that value (so that the exact distances rarely need
        reordering). ``norms``: ``|h|²`` ``[N]``; ``q``: ``[B, D]`` float32 on the keys' device."""
        n, b = keys.shape[0], q.shape[0]
        budget = _TORCH_BLOCK_ELEMENTS["cpu" if q.device.type == "cpu" else "other"]
        chunk = max(kk, budget // max(b, 1))
        best_d: Tensor | None = None
        best_i: Tensor | None = None
        cpu = q.device.type == "cpu"
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            d = torch.addmm(
                norms[start:stop].unsqueeze(0),
                q,
                keys[start:stop].T,
                alpha=-2.0,
                out=self.score_block(b, stop - start) if cpu else None,
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

    def score_block(self, rows: int, columns: int) -> Tensor:
        """This thread's ``[rows, columns]`` float32 CPU score block (grown when too small)."""
        block = getattr(self.scratch, "scores", None)
        if block is None or block.numel() < rows * columns:
            with torch.inference_mode(False):  # written in and out of inference mode
                block = torch.empty(rows * columns, dtype=torch.float32)
            self.scratch.scores = block
        return block[: rows * columns].view(rows, columns)


def faiss_exact_candidates(
    q: npt.NDArray[np.float32],
    keys: npt.NDArray[np.float32],
    kk: int,
    norms: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.int64]:
    """Exact top-``kk`` rows of ``keys`` for each query by faiss' exact L2 kernel (what
    ``faiss.knn`` and ``IndexFlatL2.search`` run) over the keys as they are (no copy, no index
    object), sorted by faiss' distances.

    ``norms``: the keys' squared norms ``|h|²``, which the memory keeps; without them faiss
    computes them on every search, one more pass over all the keys (a search of 100k-1M keys
    of width 512 for 256 queries is then ~5% slower on one core)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    nq, d = q.shape
    distances = np.empty((nq, kk), dtype=np.float32)
    rows: npt.NDArray[np.int64] = np.empty((nq, kk), dtype=np.int64)
    y_norms = None
    if norms is not None:
        norms = np.ascontiguousarray(norms, dtype=np.float32)
        y_norms = faiss.swig_ptr(norms)
    faiss.knn_L2sqr(
        faiss.swig_ptr(q),
        faiss.swig_ptr(keys),
        d,
        nq,
        keys.shape[0],
        kk,
        faiss.swig_ptr(distances),
        faiss.swig_ptr(rows),
        y_norms,
    )
    return rows


class ExactSearch:
    """Exact search over a memory's filled keys with the kernel ``backend`` asks for.

    ``"torch"`` and ``"faiss"`` are used as given; ``"auto"`` is the torch kernel on a GPU and,
    on the CPU, the kernel calibrated as faster for the search's shape bucket
    (:mod:`lightning_mbpa._kernel_choice`). Owns the torch kernel's score blocks and the kernel
    the most recent search used.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend: Backend = backend
        self.torch_kernel = TorchExactSearch()
        self.last: Kernel | None = None

    def reset(self) -> None:
        """Drops every thread's score block (the buffers were reallocated or moved)."""
        self.torch_kernel.reset()

    def kernel(self, device: torch.device) -> Kernel | None:
        """The kernel searches on ``device`` use; with ``"auto"`` on the CPU, the one the most
        recent search used (None before the first)."""
        if self.backend == "torch" or device.type != "cpu":
            return "torch"
        if self.backend == "faiss":
            return "faiss"
        return self.last

    def candidates(
        self, keys: Tensor, norms: Tensor, q32: Tensor, kk: int
    ) -> Tensor | npt.NDArray[np.int64]:
        """Slots ``[B, kk]`` of the exact nearest of ``keys`` (the filled part, ``[N, D]``, with
        their squared norms ``[N]``) for float32 queries ``q32``: a tensor on the keys' device
        from the torch kernel on a GPU, a numpy array on the CPU."""
        n, d = keys.shape
        kernel: Kernel = "faiss" if self.backend == "faiss" else "torch"
        if self.backend == "auto" and keys.device.type == "cpu":
            if n * d * q32.shape[0] >= _kernel_choice.CALIBRATION_MIN_WORK:
                kernel, result = self._choose(keys, norms, q32, kk)
                if result is not None:
                    self.last = kernel
                    return result
            self.last = kernel
        if kernel == "faiss":
            return faiss_exact_candidates(q32.cpu().numpy(), keys.numpy(), kk, norms.numpy())
        slots = self.torch_kernel.candidates(keys, norms, q32.to(keys.device), kk)
        return slots.numpy() if keys.device.type == "cpu" else slots

    def _choose(
        self, keys: Tensor, norms: Tensor, q32: Tensor, kk: int
    ) -> tuple[Kernel, npt.NDArray[np.int64] | None]:
        """The faster kernel for this search's bucket (calibrating it on the first
        ``CALIBRATION_KEYS`` keys if no decision exists yet), and the search's result when the
        calibration covered every key."""
        n, d = keys.shape
        b = q32.shape[0]
        bucket = _kernel_choice.bucket_of(n, d, b, kk)
        kernel = _kernel_choice.decided(bucket)
        if kernel is not None:
            return kernel, None
        m = min(n, _kernel_choice.CALIBRATION_KEYS)
        km = min(kk, m)
        q_np, keys_np, norms_np = q32.numpy(), keys[:m].numpy(), norms[:m].numpy()

        def run_torch() -> npt.NDArray[np.int64]:
            return self.torch_kernel.candidates(keys[:m], norms[:m], q32, km).numpy()

        def run_faiss() -> npt.NDArray[np.int64]:
            return faiss_exact_candidates(q_np, keys_np, km, norms_np)

        describe = f"{n} keys x {d}, {b} queries, k={kk} (timed over {m} keys)"
        kernel, result = _kernel_choice.choose(bucket, run_torch, run_faiss, describe)
        return kernel, (result if m == n else None)
