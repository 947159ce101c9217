"""What a kNN-LM-style training-set datastore costs: memory and search time per index.

Builds an :class:`lightning_mbpa.memory.EpisodicMemory` of N float32 keys of width D (one per
training token) for an exact index (``Flat``), HNSW and IVF-PQ, and prints per index: resident
bytes (the memory's key/label/norm buffers, the faiss index as ``faiss.serialize_index`` sizes it,
and the row/slot maps of an approximate index), add time, search time for a batch of B queries
(K neighbours) at 1 and 2 threads (medians of a few runs, in one process), and recall@K of the
approximate indexes against exact search on the same queries.

Keys are *synthetic*: a Gaussian mixture (64 clusters in a 16-dim latent space, lifted linearly to
D dims, plus a little isotropic noise), so approximate indexes behave roughly as on real hidden
states (isotropic Gaussians would make all neighbours nearly equidistant); queries are fresh draws
from the same mixture. Recall on real hidden states will differ.

An approximate index larger than ``--ann-max`` keys is measured at ``--ann-max`` and its bytes
extrapolated linearly to N (search time and recall are those at ``--ann-max``; HNSW search grows
about with log N at fixed efSearch, IVF search with N / nlist x nprobe). A last block extrapolates
every row to ``--extrapolate`` keys: bytes linearly; Flat search linearly; HNSW search by
log N / log N_measured; IVF search linearly in N at a fixed nlist (in practice grow nlist with
N, 4 sqrt(N) to 16 sqrt(N), so that the lists scanned per query stay short).

Usage:
    python benchmarks/datastore.py --ann-max 250000   # N = 1M, D = 256: ~8 min on 2 busy cores
    python benchmarks/datastore.py --flat-backend torch --hnsw '' --ivf ''   # exact only
    python benchmarks/datastore.py --n 2000 --ivf IVF4,PQ8x4 --repeats 1     # seconds
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

# isort: split
import faiss  # after torch, as in lightning_mbpa.memory: one shared OpenMP runtime

from lightning_mbpa.memory import EpisodicMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import cpu_model  # benchmarks/memory.py

LATENT_DIM = 16
LATENT_CLUSTERS = 64
NOISE = 0.05
CHUNK = 50_000


def mixture(m: int, d: int, seed: int, draw: int) -> torch.Tensor:
    """``m`` keys of the mixture fixed by ``seed``; ``draw`` picks the sample."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(LATENT_CLUSTERS, LATENT_DIM, generator=g) * 2.0
    lift = torch.randn(LATENT_DIM, d, generator=g) / math.sqrt(LATENT_DIM)
    g = torch.Generator().manual_seed(seed + 1 + draw)
    labels = torch.randint(0, LATENT_CLUSTERS, (m,), generator=g)
    latent = centers[labels] + torch.randn(m, LATENT_DIM, generator=g)
    return latent @ lift + NOISE * torch.randn(m, d, generator=g)


def build(
    n: int, d: int, index: str, params: str, backend: str = "faiss"
) -> tuple[EpisodicMemory, float]:
    """An N-key memory and the seconds spent inside ``add`` (an IVF index trains on its first
    39 x max(nlist, 256) keys, when the memory reaches that many)."""
    memory = EpisodicMemory(
        n,
        d,
        index=index,
        index_params=params,
        backend=backend,  # type: ignore[arg-type]
    )
    spent = 0.0
    for start in range(0, n, CHUNK):
        keys = mixture(min(CHUNK, n - start), d, seed=0, draw=start)
        labels = torch.zeros(keys.shape[0], dtype=torch.int64)
        t0 = time.perf_counter()
        memory.add(keys, labels)
        spent += time.perf_counter() - t0
    return memory, spent


def resident_bytes(memory: EpisodicMemory) -> tuple[int, int]:
    """(buffer bytes: keys float32 + labels int64 + norms float32, index bytes incl. row maps)."""
    n, d = len(memory), memory.dim
    assert d is not None
    buffers = n * (4 * d + 8 + 4)
    index = memory.faiss_index
    if index is None:
        return buffers, 0
    ann = memory._ann  # the row/slot maps next to the faiss index
    assert ann is not None
    maps = ann.slot_to_row.nbytes + ann.row_to_slot.nbytes + ann.live.nbytes
    return buffers, int(faiss.serialize_index(index).size) + maps


def search_seconds(memory: EpisodicMemory, q: torch.Tensor, k: int, repeats: int) -> float:
    memory.search(q, k)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        memory.search(q, k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)])
    )


def fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="datastore size (keys)")
    parser.add_argument("--dim", type=int, default=256, help="key width D")
    parser.add_argument("--k", type=int, default=32, help="neighbours K")
    parser.add_argument("--batch", type=int, default=256, help="queries per search call")
    parser.add_argument("--recall-queries", type=int, default=1024, help="queries for recall@K")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches (median)")
    parser.add_argument(
        "--flat-backend",
        choices=("faiss", "torch", "auto"),
        default="faiss",
        help="exact-search kernel of the Flat row (the memory's default is auto)",
    )
    parser.add_argument("--hnsw", default="HNSW32", help="HNSW index string ('' skips it)")
    parser.add_argument("--hnsw-params", default="efSearch=64")
    parser.add_argument("--ivf", default="IVF1024,PQ32", help="IVF index string ('' skips it)")
    parser.add_argument("--ivf-params", default="nprobe=16")
    parser.add_argument(
        "--ann-max", type=int, default=1_000_000, help="largest N built for HNSW/IVF"
    )
    parser.add_argument("--extrapolate", type=int, default=100_000_000, help="0 skips")
    args = parser.parse_args()
    n, d, k = args.n, args.dim, args.k
    threads_before = torch.get_num_threads()
    print(f"CPU: {cpu_model()} ({torch.get_num_threads()} threads available)")
    print(
        f"torch {torch.__version__}, faiss {faiss.__version__}; N={n:,}, D={d}, K={k}, "
        f"B={args.batch} queries per search; keys: synthetic Gaussian mixture "
        f"({LATENT_CLUSTERS} clusters, {LATENT_DIM}-dim latent lifted to D, noise {NOISE})"
    )
    q = mixture(args.batch, d, seed=0, draw=10**9)
    rq = mixture(args.recall_queries, d, seed=0, draw=2 * 10**9)
    configs = [("Flat", "", n)]
    if args.hnsw:
        configs.append((args.hnsw, args.hnsw_params, min(n, args.ann_max)))
    if args.ivf:
        configs.append((args.ivf, args.ivf_params, min(n, args.ann_max)))

    head = [
        "index",
        "built at N",
        "bytes (buffers + index)",
        "B/key",
        "add s",
        "ms/batch 1t",
        "ms/query 1t",
        "ms/batch 2t",
        "ms/query 2t",
        f"recall@{k}",
    ]
    widths = [max(len(h), 12) for h in head]
    widths[0] = max(widths[0], 24)
    widths[2] = 26
    print(row(head, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    results = []
    exact_by_n: dict[int, np.ndarray] = {}
    for index, params, built_n in configs:
        torch.set_num_threads(threads_before)
        backend = args.flat_backend if index == "Flat" else "faiss"
        memory, add_s = build(built_n, d, index, params, backend)
        buffers, index_bytes = resident_bytes(memory)
        per_key = (buffers + index_bytes) / built_n
        times = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            times[t] = search_seconds(memory, q, k, args.repeats)
        torch.set_num_threads(threads_before)
        found = memory.search(rq, k).indices.numpy()
        if index == "Flat":
            exact_by_n[built_n] = found
            quality = "1 (exact)"
        else:
            if built_n not in exact_by_n:
                del memory
                gc.collect()
                flat, _ = build(built_n, d, "Flat", "")
                exact_by_n[built_n] = flat.search(rq, k).indices.numpy()
                del flat
            quality = f"{recall(found, exact_by_n[built_n]):.3f}"
        name = f"{index} ({params})" if params else f"{index} ({backend})"
        total = per_key * n
        note = "" if built_n == n else " *"
        cells = [
            name,
            f"{built_n:,}",
            f"{fmt_bytes(total)}{note} ({fmt_bytes(buffers / built_n * n)} + "
            f"{fmt_bytes(index_bytes / built_n * n)})",
            f"{per_key:,.0f}",
            f"{add_s:.1f}",
            f"{times[1] * 1e3:.1f}",
            f"{times[1] / args.batch * 1e3:.3f}",
            f"{times[2] * 1e3:.1f}",
            f"{times[2] / args.batch * 1e3:.3f}",
            quality,
        ]
        print(row(cells, widths), flush=True)
        results.append((index, name, built_n, per_key, times))
        memory = None  # type: ignore[assignment]
        gc.collect()
    if any(built_n != n for _, _, built_n, _, _ in results):
        print(f"* built at --ann-max keys; bytes extrapolated linearly to N={n:,}")
    print(
        "bytes: keys float32 + labels int64 + norms float32 in the memory's buffers (kept for "
        "every index: neighbours' exact distances and keys come from them), plus the faiss index "
        "(serialize_index size) and its row/slot maps (17 B/key)."
    )

    big = args.extrapolate
    if big and big > n:
        print(f"\nExtrapolated to N={big:,} (not measured):")
        head2 = ["index", "bytes", "ms/batch 1t", "ms/batch 2t", "scaling of search"]
        widths2 = [24, 12, 12, 12, 44]
        print(row(head2, widths2))
        print("|" + "|".join("-" * (w + 2) for w in widths2) + "|")
        for index, name, built_n, per_key, times in results:
            if index == "Flat":
                factor, how = big / built_n, "linear in N (brute force)"
            elif "HNSW" in index:
                factor = math.log(big) / math.log(built_n)
                how = "~log N at fixed efSearch (recall drops)"
            else:
                factor, how = big / built_n, "linear in N at fixed nlist/nprobe"
            cells = [
                name,
                fmt_bytes(per_key * big),
                f"{times[1] * factor * 1e3:,.0f}",
                f"{times[2] * factor * 1e3:,.0f}",
                how,
            ]
            print(row(cells, widths2))
        print(
            f"{big:,} float32 keys of width {d} alone are {fmt_bytes(big * d * 4)}: the memory "
            "keeps them in RAM for every index type."
        )


if __name__ == "__main__":
    main()
