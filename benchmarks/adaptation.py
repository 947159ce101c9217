"""Throughput of MbPA local adaptation: per-query loop vs the dual and generic paths.

The per-query loop is what public MbPA reimplementations do: a deep copy of the head and a
fresh SGD optimiser for every query. It is timed on a subset of the queries and reported per
query. "dual" is ``local_adapt`` on an ``nn.Linear`` head; "dual+nb" also gets
``neighbour_outputs`` (the trained head's logits on the keys, which the callback caches once
per memory slot); "generic" is the ``torch.func`` path with per-query copies of the weights,
forced by a subclass of ``nn.Linear`` (the same arithmetic as the loop).

The second table is an MLP head, ``Linear(512, 256) - ReLU - Linear(256, C)``: the loop, the
generic path as it runs for such a head (its opening ``nn.Linear`` in dual form, the rest per
query), and the same head with per-query copies of every layer (opening layer a subclass).
All paths run under ``torch.inference_mode()``, as in Lightning's test/predict loops.

Usage::

    python benchmarks/adaptation.py [--threads 1] [--profile] [--steps 5 20] [--no-mlp]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from lightning_mbpa.adaptation import kernel_weights, local_adapt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import cpu_model  # benchmarks/memory.py

BATCH, DIM, NEIGHBOURS, HIDDEN = 256, 512, 32, 256
LR, BETA = 0.01, 1e-3
DUAL_PARTS = {
    "mbpa.dual.gram": "Gram H·Hᵀ (+H·q)",
    "mbpa.dual.neighbour_logits": "Z0 = H·W0ᵀ+b0",
    "mbpa.dual.softmax": "softmax − onehot (all steps)",
    "mbpa.dual.update": "updates (all steps)",
    "mbpa.dual.query_output": "query output",
}


class PlainLinear(nn.Linear):
    """``nn.Linear`` under another type: ``local_adapt`` gives it no dual form."""


def plain_copy(layer: nn.Linear) -> PlainLinear:
    plain = PlainLinear(layer.in_features, layer.out_features, device=layer.weight.device)
    plain.load_state_dict(layer.state_dict())
    return plain


def loop_reference(
    head: nn.Module, queries: Tensor, keys: Tensor, labels: Tensor, weights: Tensor, steps: int
) -> Tensor:
    """One deep copy and one fresh SGD optimiser per query, as public reimplementations do."""
    outputs = []
    for b in range(queries.shape[0]):
        model = copy.deepcopy(head)
        theta = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(steps):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            losses = F.cross_entropy(model(keys[b]), labels[b], reduction="none")
            (weights[b] * losses).sum().backward()
            opt.step()
            with torch.no_grad():
                for p, p_before, p0 in zip(model.parameters(), before, theta, strict=True):
                    p -= BETA * (p_before - p0)
        with torch.no_grad():
            outputs.append(model(queries[b : b + 1])[0])
    return torch.stack(outputs)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> float:
    """Best wall time of ``fn`` over at least ``repeats`` runs and ``min_seconds``."""
    fn()  # warm-up
    sync()
    best, done, start = float("inf"), 0, time.perf_counter()
    while done < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return best


def dual_split(adapt: Callable[[], Tensor]) -> dict[str, float]:
    """Seconds per call spent in each labelled part of the dual path (torch.profiler)."""
    adapt()
    repeats = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            adapt()
    totals = {e.key: e.cpu_time_total * 1e-6 / repeats for e in prof.key_averages()}
    return {label: totals.get(key, 0.0) for key, label in DUAL_PARTS.items()}


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")


def generic_split(adapt: Callable[[], Tensor], top: int = 4) -> tuple[str, float]:
    """Where the generic (torch.func) path spends its time: the share of self CPU time in matrix
    products, and the ops with the most self time (torch.profiler); and the seconds per call
    spent in matrix products."""
    adapt()
    repeats = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            adapt()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])
    text = f"matrix products {100 * matmul / total:.0f}% of self CPU time; top ops: {ops}"
    return text, matmul * 1e-6 / repeats


def gram_and_softmax(device: str) -> str:
    """What bounds the dual path: the Gram matrix's GEMM rate in the keys' layout and in the
    transposed one (and what the transpose costs), and the softmax's cost per element."""
    keys = torch.randn(BATCH, NEIGHBOURS, DIM, device=device)
    transposed = keys.transpose(1, 2).contiguous()  # [B, D, K]
    flop = 2 * BATCH * NEIGHBOURS**2 * DIM
    t_gram = best_time(lambda: torch.bmm(keys, keys.transpose(1, 2)), 20)
    t_gram_t = best_time(lambda: torch.bmm(transposed.transpose(1, 2), transposed), 20)
    t_transpose = best_time(lambda: keys.transpose(1, 2).contiguous(), 20)
    logits = torch.randn(BATCH, NEIGHBOURS, 100, device=device)
    t_softmax = best_time(lambda: torch.softmax(logits, dim=-1), 20)
    return (
        f"  Gram H·Hᵀ: {1e6 * t_gram / BATCH:.1f} µs/query ({flop / t_gram / 1e9:.0f} GFLOP/s); "
        f"keys laid out [B, D, K]: {1e6 * t_gram_t / BATCH:.1f} µs/query "
        f"({flop / t_gram_t / 1e9:.0f} GFLOP/s), but the transpose costs "
        f"{1e6 * t_transpose / BATCH:.1f} µs/query; softmax over [B, K, 100]: "
        f"{1e9 * t_softmax / logits.numel():.2f} ns/element"
    )


def bench_one(
    num_classes: int, steps: int, loop_queries: int, profile_dual: bool, device: str
) -> str:
    head = nn.Linear(DIM, num_classes, device=device)
    generic_head = nn.Sequential(plain_copy(head))
    queries = torch.randn(BATCH, DIM, device=device)
    keys = queries[:, None, :] + 0.5 * torch.randn(BATCH, NEIGHBOURS, DIM, device=device)
    labels = torch.randint(0, num_classes, (BATCH, NEIGHBOURS), device=device)
    distances = ((queries[:, None, :] - keys) ** 2).sum(-1)
    weights = kernel_weights(distances, torch.ones_like(distances, dtype=torch.bool))
    with torch.no_grad():
        neighbour_outputs = head(keys)
    n = loop_queries
    subset = (queries[:n], keys[:n], labels[:n], weights[:n])

    def run(module: nn.Module, **kw: Tensor) -> Tensor:
        with torch.inference_mode():
            return local_adapt(module, queries, keys, labels, weights, steps, LR, BETA, **kw)

    reference = loop_reference(head, *subset, steps)
    t_loop = best_time(lambda: loop_reference(head, *subset, steps), 3) / n
    dual = run(head)
    t_dual = best_time(lambda: run(head), 5, 0.5) / BATCH
    t_nb = best_time(lambda: run(head, neighbour_outputs=neighbour_outputs), 5, 0.5) / BATCH
    generic = run(generic_head)
    t_generic = best_time(lambda: run(generic_head), 2) / BATCH
    scale = reference.abs().max().item()
    err_dual = (dual[:n] - reference).abs().max().item()
    err_generic = (generic[:n] - reference).abs().max().item()
    line = (
        f"| {steps:>5} | {num_classes:>5} | {1 / t_loop:>8.0f} | {1 / t_dual:>8.0f} | {t_loop / t_dual:>5.0f}x "
        f"| {1 / t_nb:>8.0f} | {t_loop / t_nb:>5.0f}x | {1 / t_generic:>8.0f} "
        f"| {t_loop / t_generic:>5.1f}x | {err_dual:.1e} | {err_generic:.1e} | {scale:>6.1f} |"
    )
    if profile_dual and device == "cpu":
        parts = dual_split(lambda: run(head))
        total = sum(parts.values())
        text = ", ".join(f"{k} {1e3 * v:.2f} ms ({100 * v / total:.0f}%)" for k, v in parts.items())
        line += f"\n  dual path split, C={num_classes}, per batch of {BATCH}: {text}"
        text, t_matmul = generic_split(lambda: run(generic_head))
        per_query = t_matmul / BATCH
        line += (
            f"\n  generic path, C={num_classes}: {text}; its matrix products alone (the copies'"
            f" forward and weight gradient, which the loop computes too) take"
            f" {1e6 * per_query:.0f} µs/query, {100 * per_query / t_loop:.0f}% of the loop's"
            f" {1e6 * t_loop:.0f}: per-query copies stay below {t_loop / per_query:.1f}x the loop"
        )
    return line


def bench_mlp(num_classes: int, steps: int, loop_queries: int, device: str) -> str:
    """Loop vs the generic path on an MLP head, with and without the dual first layer."""
    head = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes)).to(
        device
    )
    plain_head = nn.Sequential(plain_copy(head[0]), head[1], head[2])
    queries = torch.randn(BATCH, DIM, device=device)
    keys = queries[:, None, :] + 0.5 * torch.randn(BATCH, NEIGHBOURS, DIM, device=device)
    labels = torch.randint(0, num_classes, (BATCH, NEIGHBOURS), device=device)
    distances = ((queries[:, None, :] - keys) ** 2).sum(-1)
    weights = kernel_weights(distances, torch.ones_like(distances, dtype=torch.bool))
    n = loop_queries
    subset = (queries[:n], keys[:n], labels[:n], weights[:n])

    def run(module: nn.Module) -> Tensor:
        with torch.inference_mode():
            return local_adapt(module, queries, keys, labels, weights, steps, LR, BETA)

    reference = loop_reference(head, *subset, steps)
    t_loop = best_time(lambda: loop_reference(head, *subset, steps), 2) / n
    dual_first, plain = run(head), run(plain_head)
    t_dual_first = best_time(lambda: run(head), 2) / BATCH
    t_plain = best_time(lambda: run(plain_head), 2) / BATCH
    err = max((out[:n] - reference).abs().max().item() for out in (dual_first, plain))
    return (
        f"| {steps:>5} | {num_classes:>5} | {1 / t_loop:>8.0f} | {1 / t_dual_first:>8.0f} "
        f"| {t_loop / t_dual_first:>5.1f}x | {1 / t_plain:>8.0f} | {t_loop / t_plain:>5.1f}x "
        f"| {err:.1e} |"
    )


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return cpu_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--loop-queries", type=int, default=32, help="queries timed in the loop")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, nargs="+", default=[5], help="adaptation steps")
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the splits are CPU-only)")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP-head table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
        f"B={BATCH} D={DIM} K={NEIGHBOURS} lr={LR} beta={BETA}, float32 on "
        f"{args.device} ({device_name(args.device)}), "
        f"loop timed on {args.loop_queries} queries"
    )
    print(
        "| steps |     C | loop q/s | dual q/s | xloop | +nb q/s | xloop | gen. q/s | xloop "
        "| dual max|Δ| | gen. max|Δ| | max|out| |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        for num_classes in args.classes:
            line = bench_one(num_classes, steps, args.loop_queries, args.profile, args.device)
            print(line, flush=True)
    print("+nb: neighbour_outputs given (the trained head's logits on the keys, precomputed).")
    if args.profile:
        print(gram_and_softmax(args.device))
    if args.no_mlp:
        return
    print(f"\nMLP head Linear({DIM}, {HIDDEN}) - ReLU - Linear({HIDDEN}, C), same problem:")
    print(
        "| steps |     C | loop q/s | generic q/s | xloop | per-query copies q/s | xloop | max|Δ| |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        for num_classes in args.classes:
            print(bench_mlp(num_classes, steps, args.loop_queries, args.device), flush=True)
    print("generic: the opening Linear in dual form; per-query copies: of every layer.")


if __name__ == "__main__":
    main()
