"""The same benchmarks on two or more checkouts of the package, alternated, as ratios.

Runs this checkout's ``benchmarks/end_to_end.py`` training measurement (the epoch with MbPA
writing every example over the epoch without it, ``--model mlp``) and ``benchmarks/memory.py``'s
exact rows at N = 100k (write keys/s and search ms/query, faiss and torch backends) once per
checkout per round, each in a fresh process whose ``PYTHONPATH`` points at that checkout, in
alternated order (ABC, CBA, ...). The measuring code is the same for every checkout; only the
package differs. Prints each checkout's medians over the rounds and their ratios to the first
checkout's: on a shared machine, compare the ratios, not the absolute times.

Make read-only checkouts of the commits to compare with ``git worktree``, e.g.::

    git worktree add --detach /tmp/base 489c47d
    python benchmarks/compare_commits.py base=/tmp/base branch=. --rounds 3
    git worktree remove /tmp/base
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OVERHEAD = re.compile(r"with MbPA : [0-9.]+s: ratio of medians ([0-9.]+)x")
OWN_HOOKS = re.compile(r"MbPA's own hooks .*: ([0-9.]+) µs per batch")
MEMORY_ROW = re.compile(
    r"\|\s*100,000\s*\|\s*(Flat \([^)]*\))\s*\|\s*([0-9,]+)\s*\|\s*([0-9.]+)\s*\|"
)


def run(tree: str, argv: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    done = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv} on {tree} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def measure(tree: str, args: argparse.Namespace) -> dict[str, float]:
    """One process of each benchmark on ``tree``: its figures by name."""
    figures: dict[str, float] = {}
    out = run(
        tree,
        [os.path.join(HERE, "end_to_end.py"), "--sizes", "--train-rounds", str(args.train_rounds)],
        args.timeout,
    )
    wall, cpu, *_ = (float(v) for v in OVERHEAD.findall(out))  # epoch wall, epoch CPU, fit wall
    figures["training overhead, epoch wall (x)"] = wall
    figures["training overhead, epoch CPU (x)"] = cpu
    hooks = OWN_HOOKS.search(out)
    if hooks:
        figures["MbPA's own hooks (µs per batch)"] = float(hooks.group(1))
    if not args.skip_memory:
        out = run(
            tree,
            [
                os.path.join(HERE, "memory.py"),
                "--sizes",
                "100000",
                "--skip-kernels",
                "--skip-threads",
                "--hnsw-max",
                "0",
                "--ivf-max",
                "0",
            ],
            args.timeout,
        )
        for name, write, search in MEMORY_ROW.findall(out):
            figures[f"memory 100k {name}: write keys/s"] = float(write.replace(",", ""))
            figures[f"memory 100k {name}: search ms/query"] = float(search)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "trees", nargs="+", help="NAME=PATH of each checkout; the first is the base"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.trees)
    from memory import cpu_model  # this checkout's benchmarks/memory.py

    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    order = list(trees)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            results[name].append(measure(trees[name], args))
            print(f"  round {r + 1}: {name} done", flush=True)
    base = order[0]
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    print(
        f"\nmedians of {args.rounds} alternated rounds (one process per checkout per round); "
        f"'/ {base}': the ratio to {base}'s median"
    )
    for key in medians[base]:
        cells = []
        for name in order:
            value = medians[name].get(key)
            if value is None:
                continue
            cell = f"{name} {value:,.3f}" if value < 100 else f"{name} {value:,.0f}"
            if name != base:
                cell += f" ({value / medians[base][key]:.3f} / {base})"
            cells.append(cell)
        print(f"  {key}: " + ", ".join(cells))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
