"""Throughput of a language model's output layer with MbPA: tokens/s per configuration.

For a vocabulary of ``C`` words, hidden states of width ``D`` and ``K`` neighbours per token,
times one batch of query tokens through what the callback's head hook does per configuration:

- base: the trained head alone (``D·C`` multiply-adds per token);
- memory: retrieval + ``p_memory`` mixed with the base (the neural cache, kNN-LM; λa = 0);
- MbPA, old: retrieval + one adaptation step of a linear head in the general dual form
  (``local_adapt``), the neighbours' base logits recomputed per query: ``K·D·C`` per token
  (32x the base head at K = 32); "old, cached" reads them from a per-slot logits table;
- MbPA, cold / warm: the vocabulary-scale path the callback takes for one step at C >= 1024
  (``lightning_mbpa._vocab_form``): the batch's distinct neighbour slots get their softmax once
  (``D·C`` each) and each query sums its K rows (``K·C``). "cold": every slot computed (no slot
  cached, neighbours all distinct: the worst case); "warm": every slot in the per-slot softmax
  cache (the best case). A run lies in between, by the share of its neighbours the cache holds;
- mixture: MbPA (warm) + base + memory (MbPA's cost plus the mixture's).

Usage::

    python -m benchmarks.language_model [--threads 1] [--memory 20000] [--queries 128]

Timings taken while other processes share the CPU vary: compare rows of one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_mbpa import EpisodicMemory, kernel_weights, local_adapt
from lightning_mbpa._vocab_form import SlotSoftmaxCache, one_step_outputs
from lightning_mbpa.mixture import mix_log_probs, neighbour_weights

K = 32


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run(classes: int, dim: int, memory_size: int, queries: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(dim, classes)
    memory = EpisodicMemory(capacity=memory_size)
    memory.add(
        torch.randn(memory_size, dim, generator=g), torch.randint(0, classes, (memory_size,))
    )
    q = torch.randn(queries, dim, generator=g)
    with torch.no_grad():
        table = head(memory.keys[: min(memory_size, 4096)])  # a stand-in for the per-slot cache

    def base() -> object:
        return head(q)

    def memory_only() -> object:
        nb = memory.search(q, K)
        w = neighbour_weights(nb.distances, nb.mask, temperature=10.0)
        return mix_log_probs(
            head(q), base_weight=0.75, memory_weight=0.25, memory_weights=w, memory_labels=nb.values
        )

    def old(cached: bool = False) -> Callable[[], object]:
        def step() -> object:
            nb = memory.search(q, K)
            w = kernel_weights(nb.distances, nb.mask)
            base_out = head(q)
            outputs = table[nb.indices.clamp_min(0) % table.shape[0]] if cached else None
            return local_adapt(
                head, q, nb.keys, nb.values, w, steps=1, lr=0.1, beta=0.0,
                base_outputs=base_out, neighbour_outputs=outputs,
            )  # fmt: skip

        return step

    warm_cache = SlotSoftmaxCache()

    def new(warm: bool = False, mixture: bool = False) -> Callable[[], object]:
        def step() -> object:
            nb = memory.search(q, K)
            w = kernel_weights(nb.distances, nb.mask)
            base_out = head(q)
            cache = warm_cache if warm else SlotSoftmaxCache()
            adapted = one_step_outputs(
                head, q, base_out, nb.keys, nb.values, w, nb.indices, 0.1, cache, memory.keys
            )
            if not mixture:
                return adapted
            return mix_log_probs(
                base_out,
                base_weight=0.5,
                memory_weight=0.25,
                adapted_logits=adapted,
                memory_weights=neighbour_weights(nb.distances, nb.mask),
                memory_labels=nb.values,
            )

        return step

    with torch.inference_mode():
        seconds = {
            "base": timed(base, repeats),
            "memory": timed(memory_only, repeats),
            "MbPA, old": timed(old(), repeats),
            "old, cached": timed(old(cached=True), repeats),
            "MbPA, cold": timed(new(), repeats),
            "MbPA, warm": timed(new(warm=True), repeats),
            "mixture": timed(new(warm=True, mixture=True), repeats),
        }
    return {name: queries / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", type=int, default=20_000, help="Memory entries.")
    parser.add_argument("--queries", type=int, default=128, help="Tokens per timed batch.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 33_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["base", "memory", "MbPA, old", "old, cached", "MbPA, cold", "MbPA, warm", "mixture"]
    print(
        f"tokens/s, K={K}, one adaptation step, {args.memory} memories, batches of "
        f"{args.queries} tokens, {args.threads} thread(s)"
    )
    print(f"{'C':>7s} {'D':>5s} " + " ".join(f"{n:>11s}" for n in names))
    for classes in args.classes:
        for dim in args.dims:
            rate = run(classes, dim, args.memory, args.queries, args.repeats)
            cells = " ".join(f"{rate[n]:11.0f}" for n in names)
            print(f"{classes:7d} {dim:5d} {cells}", flush=True)


if __name__ == "__main__":
    main()
