"""Exact K-nearest-neighbour candidates over a key buffer: a torch kernel and the faiss one.

One idea: given the filled keys (and, for torch, their cached squared norms) and float32 queries,
return the slots of the ``kk`` nearest keys of each query by squared Euclidean distance. Exact
distances and the final order are computed afterwards from the stored keys
(:mod:`lightning_mbpa._neighbours`), so a kernel only has to rank.

* :class:`TorchExactSearch`: a chunked ``|h|² - 2 q·h`` matmul (``torch.addmm``) and a grouped
  top-k on the buffer's device; on the CPU each searching thread reuses its own score block.
* :func:`faiss_exact_candidates`: ``faiss.knn`` directly over the buffer (zero copy).
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
    q: npt.NDArray[np.float32], keys: npt.NDArray[np.float32], kk: int
) -> npt.NDArray[np.int64]:
    """Exact top-``kk`` rows of ``keys`` for each query, by ``faiss.knn`` over the keys as they
    are (no copy, no index object), sorted by faiss' distances."""
    _, rows = faiss.knn(q, keys, kk, metric=faiss.METRIC_L2)
    result: npt.NDArray[np.int64] = rows
    return result
