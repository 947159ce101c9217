"""Soak test of MbPA, kept out of CI: resident memory stays flat, the memory stays bounded.

1. A long ``fit`` of a small MLP with a small FIFO memory, overwritten many times over: the
   process's resident set size (RSS) is sampled every ``--every`` batches, and the memory's
   length and its key buffer are checked against the capacity at every sample.
2. A long ``test`` over many batches with ``online_writes=True`` (every test batch is adapted
   and then written, so the FIFO keeps turning at test time too): the same checks.

RSS is read after ``malloc_trim(0)`` (glibc hands freed temporaries back), so what is left is
what the process still holds. A run passes when the RSS growth from the end of the warm-up
(the first ``--warmup`` fraction of the batches) to the end stays under ``--tolerance-mb``.
Exits 1 on a failure.

    python benchmarks/soak.py                                 # ~3 min on 2 loaded cores
    python benchmarks/soak.py --train-batches 20000 --test-batches 10000
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_mbpa import MbPA

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from end_to_end import MLP, _trainer

_TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None


def rss_mb() -> float:
    """Resident set size of this process in MiB, after handing freed heap pages back."""
    if _TRIM is not None:
        _TRIM(0)
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Stream(IterableDataset):
    """``batches`` fresh batches of Gaussian clusters: nothing is held between batches."""

    def __init__(self, batches: int, batch: int, d_in: int, classes: int, seed: int) -> None:
        self.batches, self.batch, self.d_in, self.classes, self.seed = (
            batches,
            batch,
            d_in,
            classes,
            seed,
        )
        self.centres = torch.randn(classes, d_in, generator=torch.Generator().manual_seed(0)) * 2

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.batches):
            y = torch.randint(0, self.classes, (self.batch,), generator=g)
            yield self.centres[y] + torch.randn(self.batch, self.d_in, generator=g), y


class Sampler(pl.Callback):
    """Every ``every`` batches: RSS, and the memory's bounds."""

    def __init__(self, mbpa: MbPA, every: int) -> None:
        self.mbpa, self.every = mbpa, every
        self.samples: list[tuple[int, float]] = []
        self.violations: list[str] = []
        self.batches = 0

    def _sample(self) -> None:
        self.batches += 1
        if self.batches % self.every:
            return
        memory = self.mbpa.memory
        capacity = memory.capacity
        if len(memory) > capacity or memory.keys.shape[0] > capacity:
            self.violations.append(f"batch {self.batches}: len {len(memory)} > {capacity}")
        buffer = memory._keys  # the preallocated buffer must never grow
        if buffer is not None and buffer.shape[0] != capacity:
            self.violations.append(f"batch {self.batches}: buffer of {buffer.shape[0]} rows")
        self.samples.append((self.batches, rss_mb()))

    def on_train_batch_end(self, *args) -> None:
        self._sample()

    def on_test_batch_end(self, *args) -> None:
        self._sample()


def report(name: str, sampler: Sampler, seconds: float, warmup: float, tolerance: float) -> bool:
    samples = sampler.samples
    warm = samples[min(len(samples) - 1, int(len(samples) * warmup))]
    end = samples[-1]
    peak = max(rss for _, rss in samples[samples.index(warm) :])
    growth = end[1] - warm[1]
    per_1k = growth / max(end[0] - warm[0], 1) * 1000
    memory = sampler.mbpa.memory
    ok = growth < tolerance and not sampler.violations
    print(
        f"{name}: {end[0]} batches in {seconds:.0f} s; RSS {samples[0][1]:.1f} MiB at batch "
        f"{samples[0][0]}, {warm[1]:.1f} MiB after warm-up (batch {warm[0]}), {end[1]:.1f} MiB at "
        f"the end, peak {peak:.1f} MiB; growth after warm-up {growth:+.1f} MiB "
        f"({per_1k:+.2f} MiB per 1000 batches); memory {len(memory)}/{memory.capacity}, "
        f"{memory.num_seen} writes offered; bound violations: {len(sampler.violations)} "
        f"-> {'PASS' if ok else 'FAIL'}"
    )
    for violation in sampler.violations[:5]:
        print("   ", violation)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-batches", type=int, default=40_000)
    parser.add_argument("--test-batches", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=2000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--every", type=int, default=500, help="sample every N batches")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--tolerance-mb", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_in, dim, classes = 64, 128, 10
    model = MLP(d_in, dim, classes)
    mbpa = MbPA(memory_size=args.capacity, k=args.k, eviction="fifo", online_writes=True)

    def stream(batches: int, seed: int) -> DataLoader:
        return DataLoader(Stream(batches, args.batch, d_in, classes, seed), batch_size=None)

    print(
        f"MbPA soak: FIFO capacity {args.capacity}, k={args.k}, batches of {args.batch}, "
        f"MLP {d_in}-{dim}-{classes}, {args.threads} thread(s), RSS every {args.every} batches"
    )
    sampler = Sampler(mbpa, args.every)
    start = time.perf_counter()
    _trainer("cpu", [mbpa, sampler]).fit(model, stream(args.train_batches, seed=1))
    fit_ok = report("fit", sampler, time.perf_counter() - start, args.warmup, args.tolerance_mb)

    sampler = Sampler(mbpa, args.every)
    start = time.perf_counter()
    _trainer("cpu", [mbpa, sampler]).test(model, stream(args.test_batches, seed=2), verbose=False)
    test_ok = report("test", sampler, time.perf_counter() - start, args.warmup, args.tolerance_mb)
    return 0 if fit_ok and test_ok else 1


if __name__ == "__main__":
    sys.exit(main())
