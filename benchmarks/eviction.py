"""Write throughput of class-balanced eviction against FIFO in a full memory.

Fills an ``EpisodicMemory`` of ``--capacity`` rows (keys of width ``--dim``), then times
``memory.add`` of batches of 64 and 4096 rows with 10 classes, balanced (uniform labels) and
imbalanced (class 0 on half of the rows, the rest shared by classes 1-9). Prints rows/s of FIFO,
of class-balanced eviction and, with ``--baseline REV``, of class-balanced eviction with the slot
assignment of ``lightning_mbpa/_eviction.py`` at git revision ``REV``, measured alternately in
one process (medians), and the ratios.

Usage:
    python benchmarks/eviction.py [--baseline main] [--capacity 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory import alternated, cpu_model
from lightning_mbpa.memory import EpisodicMemory

NUM_CLASSES = 10


def old_assigner(rev: str) -> Callable[..., object]:
    """``SlotAssigner._assign_class_balanced`` as at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:lightning_mbpa/_eviction.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    module = types.ModuleType("baseline_eviction")
    exec(compile(source, f"{rev}:_eviction.py", "exec"), module.__dict__)
    return module.SlotAssigner._assign_class_balanced  # type: ignore[no-any-return]


def stream(n: int, imbalanced: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(NUM_CLASSES)
    if imbalanced:
        weights[0] = NUM_CLASSES - 1  # class 0 on half of the rows
    return torch.multinomial(weights, n, replacement=True, generator=g)


def full_memory(eviction: str, capacity: int, dim: int, imbalanced: bool) -> EpisodicMemory:
    memory = EpisodicMemory(capacity, dim=dim, eviction=eviction)  # type: ignore[arg-type]
    labels = stream(capacity, imbalanced, seed=1)
    for i in range(0, capacity, 8192):
        part = labels[i : i + 8192]
        memory.add(torch.randn(part.shape[0], dim), part)
    return memory


def writer(memory: EpisodicMemory, batch: int, imbalanced: bool, dim: int) -> Callable[[], None]:
    """A call writing the next 16 batches of a fixed stream (wrapping around)."""
    labels = stream(batch * 64, imbalanced, seed=2)
    keys = torch.randn(labels.shape[0], dim)
    position = [0]

    def call() -> None:
        for _ in range(16):
            i = position[0]
            memory.add(keys[i : i + batch], labels[i : i + batch])
            position[0] = (i + batch) % labels.shape[0]

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = old_assigner(args.baseline) if args.baseline else None
    print(f"CPU: {cpu_model()}; capacity {args.capacity}, dim {args.dim}, {NUM_CLASSES} classes")
    header = f"{'labels':<11} {'batch':>5} {'fifo rows/s':>12} {'balanced':>12}"
    if old is not None:
        header += f" {'before':>12} {'fifo/before':>11}"
    print(header + f" {'fifo/balanced':>13}" + (f" {'speed-up':>8}" if old else ""))
    for imbalanced in (False, True):
        for batch in (64, 4096):
            calls = {
                "fifo": writer(
                    full_memory("fifo", args.capacity, args.dim, imbalanced),
                    batch,
                    imbalanced,
                    args.dim,
                ),
                "balanced": writer(
                    full_memory("class_balanced", args.capacity, args.dim, imbalanced),
                    batch,
                    imbalanced,
                    args.dim,
                ),
            }
            if old is not None:
                memory = full_memory("class_balanced", args.capacity, args.dim, imbalanced)
                slots = memory._slots
                slots._assign_class_balanced = types.MethodType(old, slots)  # type: ignore[method-assign]
                calls["before"] = writer(memory, batch, imbalanced, args.dim)
            seconds = alternated(calls, args.repeats)
            rate = {name: 16 * batch / s for name, s in seconds.items()}
            line = (
                f"{'imbalanced' if imbalanced else 'balanced':<11} {batch:>5}"
                f" {rate['fifo']:>12,.0f} {rate['balanced']:>12,.0f}"
            )
            if old is not None:
                line += f" {rate['before']:>12,.0f} {rate['fifo'] / rate['before']:>11.1f}"
            line += f" {rate['fifo'] / rate['balanced']:>13.2f}"
            if old is not None:
                line += f" {rate['balanced'] / rate['before']:>8.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
