"""Which exact-search kernel is faster on this machine for a search of a given shape.

One idea: exact search on the CPU can run as the torch kernel (matmul + grouped top-k) or as
faiss' exact kernel (what ``faiss.knn`` runs, here given the stored squared norms), and which
is faster depends on the machine (the BLAS each library ships and the instructions it uses on
this CPU), the thread count and the shape. ``python
benchmarks/memory.py --skip-sizes --skip-threads`` on a 2-vCPU AMD EPYC whose cores other
processes were using: for 256 queries over 100k-1M keys of width 512, faiss 1.16-1.26x faster
than torch with one thread, torch 1.8x faster with two; torch is faster on an Intel Xeon with
MKL, and for a few queries. So the first search of a new shape
*bucket* times both kernels on the memory's own keys and queries, and the faster is used for
every later search in that bucket, for the rest of the process.

A bucket is (number of keys, queries per search, k) each rounded down to a power of two, the key
width, and torch's thread count (faiss shares torch's OpenMP runtime and thread count). A
search of fewer than :data:`CALIBRATION_MIN_WORK` multiply-adds (keys x width x queries) costs
too little for the choice to matter and uses torch without timing anything.

With one thread the kernels' CPU time is compared, with more their wall-clock time
(:func:`_measure`). Cost of one calibration: :data:`CALIBRATION_REPEATS` runs of each kernel,
alternating, over the first ``min(N, CALIBRATION_KEYS)`` stored keys and the actual queries, so
4 searches of at most 32768 keys. When that covered every key, the faster kernel's last result
is the search's result (3 searches' worth of extra work at most); otherwise the chosen kernel
then searches all keys. At 100k keys x 512, 256 queries, k = 32, that is 4 searches of a third
of the keys, about 1.3 searches' worth, once per bucket and process: ``python
benchmarks/memory.py --skip-sizes --skip-threads`` prints it (the calibration column) next to
what the choice saves on every later search.

Decisions are logged once each at DEBUG level on the ``lightning_mbpa.memory`` logger. Tests
replace :func:`_measure` to inject timings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

Kernel = Literal["torch", "faiss"]
T = TypeVar("T")

logger = logging.getLogger("lightning_mbpa.memory")

#: Runs of each kernel in one calibration (alternating torch, faiss, faiss, torch, ...); the
#: fastest run of each counts.
CALIBRATION_REPEATS = 2
#: A calibration searches at most this many stored keys (the first ones).
CALIBRATION_KEYS = 1 << 15
#: Searches of fewer multiply-adds than this (keys x width x queries) use torch uncalibrated.
CALIBRATION_MIN_WORK = 1 << 25


@dataclass(frozen=True)
class Bucket:
    """The shape class a decision holds for. ``keys``, ``queries`` and ``k`` are bit lengths:
    ``keys=17`` covers 65,536 to 131,071 keys."""

    keys: int
    dim: int
    queries: int
    k: int
    threads: int


def bucket_of(n: int, dim: int, b: int, k: int) -> Bucket:
    """The bucket of a search of ``b`` queries for ``k`` neighbours among ``n`` keys of ``dim``."""
    return Bucket(n.bit_length(), dim, b.bit_length(), k.bit_length(), torch.get_num_threads())


_decisions: dict[Bucket, Kernel] = {}
_lock = threading.Lock()


def _measure(kernel: Kernel, run: Callable[[], T]) -> tuple[float, T]:
    """Seconds one call of ``run`` (the ``kernel``'s search) takes, and its result.

    With one thread both kernels compute in the calling thread, so its CPU time is timed: the
    same ranking as wall-clock time on an idle machine, and still the kernels' own cost when
    other processes share the cores (wall-clock time then mostly measures waiting for a core).
    With more threads, wall-clock time (how well a kernel's threads cope with busy cores is part
    of its speed).
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    result = run()
    return clock() - start, result


def decided(bucket: Bucket) -> Kernel | None:
    """The kernel chosen for ``bucket`` in this process, or None if none was yet."""
    return _decisions.get(bucket)


def choose(
    bucket: Bucket, run_torch: Callable[[], T], run_faiss: Callable[[], T], describe: str
) -> tuple[Kernel, T | None]:
    """The faster kernel for ``bucket``, timing ``run_torch`` and ``run_faiss`` if no decision
    exists yet, and the faster one's result of its last run (None when no calibration ran here).

    Thread-safe: one calibration at a time, and a bucket is calibrated once per process.
    """
    kernel = _decisions.get(bucket)
    if kernel is not None:
        return kernel, None
    with _lock:
        kernel = _decisions.get(bucket)
        if kernel is not None:
            return kernel, None
        runs: dict[Kernel, Callable[[], T]] = {"torch": run_torch, "faiss": run_faiss}
        best: dict[Kernel, float] = {"torch": float("inf"), "faiss": float("inf")}
        last: dict[Kernel, T] = {}
        order: tuple[Kernel, Kernel] = ("torch", "faiss")
        for _ in range(CALIBRATION_REPEATS):
            for name in order:
                seconds, last[name] = _measure(name, runs[name])
                best[name] = min(best[name], seconds)
            order = (order[1], order[0])
        kernel = "faiss" if best["faiss"] < best["torch"] else "torch"
        _decisions[bucket] = kernel
    logger.debug(
        "exact search for %s with %d threads: %s (torch %.2f ms, faiss %.2f ms, best of %d)",
        describe,
        bucket.threads,
        kernel,
        best["torch"] * 1e3,
        best["faiss"] * 1e3,
        CALIBRATION_REPEATS,
    )
    return kernel, last[kernel]


def kernel_choices() -> dict[Bucket, Kernel]:
    """A copy of every decision made in this process, by bucket."""
    with _lock:
        return dict(_decisions)


def forget_kernel_choices() -> None:
    """Drops every decision: the next search of each bucket calibrates again."""
    with _lock:
        _decisions.clear()
