"""Benchmark of :class:`lightning_mbpa.memory.EpisodicMemory`.

For each memory size N (keys of width D, clustered like real embeddings), prints write throughput,
search latency per query (B queries, k neighbours), recall@k against exact search, and the ratio of
our search time to a bare faiss index over the same data in the same run (``IndexFlatL2`` for the
exact memory; the memory's own faiss index searched without the liveness selector for HNSW/IVF),
plus resident memory of the exact memory against the raw key bytes. A second table compares the
two exact-search kernels on this machine's CPU: ``EpisodicMemory.search`` with ``backend="torch"``,
``"faiss"`` and ``"auto"`` (which times both at the first search of a shape and keeps the faster)
at 1 and 2 threads, measured alternately in one process (medians), as times and as ratios to the
faster of torch and faiss. A third table measures how faiss' and torch's OpenMP thread counts
interact (each cell in a fresh process, since the import order decides whether the two libraries
share one OpenMP runtime).

Usage:
    python benchmarks/memory.py                       # N in {10k, 100k, 1M}, D=512: ~10 min on 2
                                                      # idle cores, mostly IVF4000 and 1M searches
    python benchmarks/memory.py --sizes 10000 100000  # smaller
    python benchmarks/memory.py --skip-sizes --skip-threads   # the kernel table only
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

# isort: split
import faiss  # after torch, as in lightning_mbpa.memory: one shared OpenMP runtime

from lightning_mbpa.memory import EpisodicMemory

LATENT_DIM = 16
LATENT_CLUSTERS = 64
NOISE = 0.05
SLOW_CALL_S = 2.0


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def _embedding_map(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(LATENT_CLUSTERS, LATENT_DIM, generator=g) * 2.0
    lift = torch.randn(LATENT_DIM, d, generator=g) / math.sqrt(LATENT_DIM)
    return centers, lift


def _embed(m: int, d: int, g: torch.Generator, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centers, lift = _embedding_map(d, seed)
    labels = torch.randint(0, LATENT_CLUSTERS, (m,), generator=g)
    latent = centers[labels] + torch.randn(m, LATENT_DIM, generator=g)
    return latent @ lift + NOISE * torch.randn(m, d, generator=g), labels


def chunks(
    n: int, d: int, batch: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same N embedding-like keys every time, generated batch by batch (never all in memory).

    Keys are a mixture of Gaussians in a 16-dim latent space lifted linearly to D dims plus a little
    isotropic noise: a low intrinsic dimension like real embeddings (isotropic 512-dim Gaussians
    would make every neighbour nearly equidistant and recall meaningless).
    """
    for start in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + 1 + start)
        yield _embed(min(batch, n - start), d, g, seed)


def queries(b: int, d: int, seed: int = 0) -> torch.Tensor:
    return _embed(b, d, torch.Generator().manual_seed(10**9), seed)[0]


def fill(memory: EpisodicMemory, n: int, d: int, batch: int) -> float:
    """Writes N keys; returns keys/s counting only the time inside ``add``."""
    spent = 0.0
    for keys, labels in chunks(n, d, batch):
        start = time.perf_counter()
        memory.add(keys, labels)
        spent += time.perf_counter() - start
    return n / spent


def interleaved(
    ours: Callable[[], object], bare: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of two calls, alternated so load changes hit both alike.

    Calls slower than ``SLOW_CALL_S`` are timed once (their first call is the measurement).
    """
    times_ours, times_bare = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        ours()
        times_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare()
        times_bare.append(time.perf_counter() - start)
        if min(times_ours[0], times_bare[0]) > SLOW_CALL_S:
            break
        if i == 0:  # warm-up
            times_ours.clear()
            times_bare.clear()
    return min(times_ours), min(times_bare)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)])
    )


def row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def warm_up(d: int, k: int) -> None:
    """Loads every code path once so one-time costs (libraries, thread pools) are not measured."""
    for index in ("Flat", "HNSW32", "IVF4,Flat"):
        for backend in ("faiss", "torch") if index == "Flat" else ("faiss",):
            memory = EpisodicMemory(1000, d, index=index, backend=backend)
            for keys, labels in chunks(1000, d, 500, seed=7):
                memory.add(keys, labels)
            memory.search(queries(8, d), k)
    faiss.IndexFlatL2(d).search(np.zeros((1, d), dtype=np.float32), 1)
    gc.collect()


RSS_WORKER = r"""
import ctypes
import sys
sys.path[:0] = [sys.argv[4]]
from memory import chunks, fill, rss_bytes
from lightning_mbpa.memory import EpisodicMemory
n, d, batch = (int(a) for a in sys.argv[1:4])
warm = EpisodicMemory(batch, d)  # load every code path before the baseline
fill(warm, batch, d, batch)
warm.search(next(chunks(8, d, 8))[0], 4)
del warm
trim = ctypes.CDLL("libc.so.6").malloc_trim  # hand freed batch temporaries back before reading RSS
trim(0)
before = rss_bytes()
memory = EpisodicMemory(n, d)
fill(memory, n, d, batch)
trim(0)
print(rss_bytes() - before)
"""


def resident_growth(n: int, d: int, batch: int) -> int:
    """RSS growth of filling an N x D exact memory, in a fresh process (no recycled heap)."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", RSS_WORKER, str(n), str(d), str(batch), here],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def measure(
    label: str,
    name: str,
    memory: EpisodicMemory,
    write: float,
    bare: Callable[[], object],
    exact: np.ndarray | None,
    args: argparse.Namespace,
    q: torch.Tensor,
    widths: list[int],
) -> np.ndarray:
    """Prints one table row; returns the memory's neighbour slots for the benchmark queries."""
    b, k = q.shape[0], args.k
    ours_s, bare_s = interleaved(partial(memory.search, q, k), bare, args.repeats)
    found = memory.search(q, k).indices.numpy()
    quality = recall(found, exact) if exact is not None else 1.0
    cells = [
        label,
        name,
        f"{write:,.0f}",
        f"{ours_s / b * 1e3:.3f}",
        f"{bare_s / b * 1e3:.3f}",
        f"{ours_s / bare_s:.2f}",
        f"{quality:.3f}",
    ]
    print(row(cells, widths), flush=True)
    return found


def run_size(n: int, args: argparse.Namespace, q: torch.Tensor, widths: list[int]) -> list[str]:
    d, k = args.dim, args.k
    q_np = q.numpy()
    label = f"{n:,}"
    notes: list[str] = []

    # Exact memory on the faiss backend (faiss.knn over the buffer) vs a bare IndexFlatL2.
    flat = EpisodicMemory(n, d, index="Flat", backend="faiss")
    write = fill(flat, n, d, args.write_batch)
    bare_flat = faiss.IndexFlatL2(d)
    bare_flat.add(flat.keys.numpy())
    exact = measure(
        label,
        "Flat (faiss.knn)",
        flat,
        write,
        partial(bare_flat.search, q_np, k),
        None,
        args,
        q,
        widths,
    )
    _, bare_ids = bare_flat.search(q_np, k)
    notes.append(
        f"N={label}: exact memory vs IndexFlatL2 neighbour agreement {recall(bare_ids, exact):.4f}"
    )
    del flat
    gc.collect()

    # Exact memory on the torch backend (matmul + topk on the buffer's device, here the CPU).
    tflat = EpisodicMemory(n, d, backend="torch")
    write = fill(tflat, n, d, args.write_batch)
    measure(
        label,
        "Flat (torch backend)",
        tflat,
        write,
        partial(bare_flat.search, q_np, k),
        exact,
        args,
        q,
        widths,
    )
    del tflat, bare_flat
    gc.collect()

    # Approximate indexes vs their own faiss index searched bare (no liveness selector).
    approximate = []
    if n <= args.hnsw_max:
        approximate.append(("HNSW32", f"efSearch={args.ef_search}"))
    else:
        notes.append(
            f"N={label}: HNSW32 skipped (graph build too slow on 2 cores; raise --hnsw-max to run it)"
        )
    nlist = max(1, round(4 * math.sqrt(n)))
    if n <= args.ivf_max:
        approximate.append((f"IVF{nlist},Flat", f"nprobe={args.nprobe}"))
    else:
        notes.append(f"N={label}: IVF{nlist},Flat skipped (--ivf-max {args.ivf_max})")
    for index, params in approximate:
        memory = EpisodicMemory(n, d, index=index, index_params=params)
        write = fill(memory, n, d, args.write_batch)
        bare = partial(memory.faiss_index.search, q_np, k)
        measure(label, f"{index} {params}", memory, write, bare, exact, args, q, widths)
        del memory, bare
        gc.collect()

    if os.path.exists("/proc/self/status"):
        grown, raw = resident_growth(n, d, args.write_batch), n * d * 4
        notes.append(
            f"N={label}: filling an exact memory grew RSS by {grown / 2**20:,.1f} MiB for"
            f" {raw / 2**20:,.1f} MiB of raw keys = {grown / raw:.3f}x (target <= 1.1x)"
        )
    return notes


def run_sizes(args: argparse.Namespace) -> None:
    d, b, k = args.dim, args.batch, args.k
    warm_up(d, k)
    q = queries(b, d)
    widths = [9, 22, 12, 9, 13, 9, 9]
    print(
        f"\nD={d}, B={b} queries per search, k={k}, writes in batches of {args.write_batch};"
        f" torch threads={torch.get_num_threads()}, faiss threads={faiss.omp_get_max_threads()}"
    )
    print(
        "write keys/s: time inside add() only (IVF includes its automatic training at 39*nlist keys);"
    )
    print(
        "ms/query: best of --repeats searches of B queries, divided by B; bare: IndexFlatL2 over the same"
    )
    print(
        "keys for exact rows, the memory's own faiss index searched without the liveness selector otherwise;"
    )
    print(f"recall@{k}: against the exact memory's neighbours.")
    header = ["N", "index", "write keys/s", "ms/query", "bare ms/query", "ours/bare", f"recall@{k}"]
    print(row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes: list[str] = []
    for n in args.sizes:
        notes += run_size(n, args, q, widths)
    print()
    for line in notes:
        print(line)


# ---------------------------------------------------------------------- exact kernels


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def alternated(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, the calls alternated within a round
    (in a rotating order) so that load changes hit all of them alike."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_kernels(args: argparse.Namespace) -> None:
    d, b, k = args.dim, args.batch, args.k
    q = queries(b, d)
    threads_before = torch.get_num_threads()
    print(
        f"\nExact search kernels on {cpu_model()} ({os.cpu_count()} CPUs): EpisodicMemory.search"
        f" of B={b} queries, k={k}, D={d}; medians of {args.kernel_repeats} rounds, the three"
        " alternated in each round; ratios to the faster of torch and faiss"
    )
    widths = [7, 9, 10, 10, 10, 6, 11, 11, 10, 15]
    header = [
        "threads",
        "N",
        "torch ms",
        "faiss ms",
        "auto ms",
        "auto",
        "torch/best",
        "faiss/best",
        "auto/best",
        "calibration ms",
    ]
    print(row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for n in args.kernel_sizes:
        memories = {}
        for backend in ("torch", "faiss", "auto"):
            memories[backend] = EpisodicMemory(n, d, backend=backend)
            fill(memories[backend], n, d, args.write_batch)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for backend in ("torch", "faiss"):  # one untimed search each: warm paths
                memories[backend].search(q, k)
            start = time.perf_counter()
            memories["auto"].search(q, k)  # calibrates this shape at this thread count
            first_auto = time.perf_counter() - start
            calls = {name: partial(memory.search, q, k) for name, memory in memories.items()}
            med = alternated(calls, args.kernel_repeats)
            best = min(med["torch"], med["faiss"])
            cells = [
                str(threads),
                f"{n:,}",
                f"{med['torch'] * 1e3:.1f}",
                f"{med['faiss'] * 1e3:.1f}",
                f"{med['auto'] * 1e3:.1f}",
                memories["auto"].backend,
                f"{med['torch'] / best:.2f}",
                f"{med['faiss'] / best:.2f}",
                f"{med['auto'] / best:.2f}",
                f"{max(first_auto - med['auto'], 0.0) * 1e3:.0f}",
            ]
            print(row(cells, widths), flush=True)
        del memories
        gc.collect()
    torch.set_num_threads(threads_before)
    print(
        "calibration ms: the first auto search of the shape (which times both kernels) minus the"
        " median auto search."
    )


# ---------------------------------------------------------------------- threads

WORKER = r"""
import json, sys, time
first = sys.argv[1]
if first == "faiss":
    import faiss, torch
else:
    import torch, faiss
import numpy as np
from lightning_mbpa.memory import EpisodicMemory
torch_threads, faiss_threads, n, d, b, k = (int(a) for a in sys.argv[2:8])
torch.set_num_threads(torch_threads)
faiss.omp_set_num_threads(faiss_threads)
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g)
q = torch.randn(b, d, generator=g)
w = torch.randn(d, d, generator=g) / d**0.5
memory = EpisodicMemory(n, d)
memory.add(x, torch.zeros(n, dtype=torch.long))
xb, xq = memory.keys.numpy(), q.numpy()

def best(f, r=5):
    f()
    times = []
    for _ in range(r):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times) * 1e3

def forward_then_knn():
    torch.relu(q @ w)  # a model's forward pass right before the search
    faiss.knn(xq, xb, k)

def forward_then_search():
    memory.search(torch.relu(q @ w), k)

print(json.dumps({
    "torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
    "knn": best(lambda: faiss.knn(xq, xb, k)),
    "forward+knn": best(forward_then_knn),
    "forward+search": best(forward_then_search),
}))
"""


def run_threads(args: argparse.Namespace) -> None:
    n, d, b, k = args.thread_n, args.dim, args.batch, args.k
    print(
        f"\nOpenMP threads: faiss.knn over N={n:,}, D={d}, B={b}, k={k}; best of 5, ms per batch of {b}"
        " queries; each row a fresh process"
    )
    widths = [11, 12, 12, 12, 15, 15, 8, 11, 14]
    header = [
        "wait policy",
        "imported 1st",
        "torch set to",
        "faiss set to",
        "effective torch",
        "effective faiss",
        "knn",
        "forward+knn",
        "forward+search",
    ]
    print(row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for policy in args.wait_policies:
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        for first in ("torch", "faiss"):
            for tt in (1, 2):
                for ft in (1, 2):
                    argv = [sys.executable, "-c", WORKER, first, str(tt), str(ft)]
                    argv += [str(n), str(d), str(b), str(k)]
                    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    cells = [policy, first, str(tt), str(ft), str(r["torch"]), str(r["faiss"])]
                    cells += [
                        f"{r['knn']:.1f}",
                        f"{r['forward+knn']:.1f}",
                        f"{r['forward+search']:.1f}",
                    ]
                    print(row(cells, widths), flush=True)
    print(
        "'effective': torch.get_num_threads() / faiss.omp_get_max_threads() after both calls and a torch op."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="queries per search")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--write-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="skip HNSW above this N")
    parser.add_argument("--ivf-max", type=int, default=1_000_000, help="skip IVF above this N")
    parser.add_argument(
        "--wait-policies",
        nargs="+",
        default=["default", "passive"],
        help="OMP_WAIT_POLICY values for the thread table ('default': leave it unset)",
    )
    parser.add_argument(
        "--thread-n", type=int, default=50_000, help="memory size of the thread table"
    )
    parser.add_argument(
        "--kernel-sizes",
        type=int,
        nargs="+",
        default=None,
        help="memory sizes of the kernel table (default: --sizes)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the kernel table"
    )
    parser.add_argument("--kernel-repeats", type=int, default=5, help="rounds of the kernel table")
    parser.add_argument("--skip-threads", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    args = parser.parse_args()
    if args.kernel_sizes is None:
        args.kernel_sizes = args.sizes
    print(
        f"torch {torch.__version__}, faiss {faiss.__version__}, {os.cpu_count()} CPUs,"
        f" load average {os.getloadavg()[0]:.2f} at start"
    )
    if not args.skip_kernels:
        run_kernels(args)
    if not args.skip_sizes:
        run_sizes(args)
    if not args.skip_threads:
        run_threads(args)
    print(
        f"load average {os.getloadavg()[0]:.2f} at the end (other processes on this machine skew timings)"
    )


if __name__ == "__main__":
    main()
