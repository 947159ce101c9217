"""Threads and OpenMP wait policy for the demos' slow path: adapting the whole MLP per query.

The continual-learning demos key the memory by pixels (``head: net``), so every test image
adapts the whole 784-256-256-10 MLP (``local_adapt``'s ``torch.func`` path, the first layer in
dual form, the rest copied per query). This times one test batch of that work (200 queries,
k = 16, 10 steps, lr 0.1, as ``examples/configs/permuted.yaml``) in a fresh process per
setting (``OMP_WAIT_POLICY`` only works before torch is imported), on an idle machine and beside
a busy core (a second process spinning in a Python loop), so the settings are compared side by
side in one run::

    python benchmarks/demo_threads.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = """
import json, sys, time
import torch
from torch import nn
from lightning_mbpa.adaptation import kernel_weights, local_adapt
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
b, k = 200, 16
q = torch.randn(b, 784)
keys = q[:, None] + 0.3 * torch.randn(b, k, 784)
labels = torch.randint(0, 10, (b, k))
w = kernel_weights(((q[:, None] - keys) ** 2).sum(-1), torch.ones(b, k, dtype=torch.bool))
times = []
for _ in range(int(sys.argv[2]) + 1):  # the first run warms up
    start = time.perf_counter()
    with torch.inference_mode():
        local_adapt(net, q, keys, labels, w, steps=10, lr=0.1, beta=0.0)
    times.append(time.perf_counter() - start)
print(json.dumps(sorted(times[1:])))
"""

SETTINGS = ((1, "default"), (2, "passive"), (2, "default"))


def time_setting(threads: int, policy: str, repeats: int) -> list[float]:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    argv = [sys.executable, "-c", WORKER, str(threads), str(repeats)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; seconds per batch"
        f" of 200 queries (min / median of {args.repeats})"
    )
    print("| other core | torch threads | OMP_WAIT_POLICY | s (min) | s (median) | vs 1 thread |")
    print("|---|---:|---|---:|---:|---:|")
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            one = None
            for threads, policy in SETTINGS:
                times = time_setting(threads, policy, args.repeats)
                median = times[len(times) // 2]
                one = median if one is None else one
                print(
                    f"| {'busy' if busy else 'idle'} | {threads} | {policy} | {times[0]:.2f} |"
                    f" {median:.2f} | {median / one:.2f}x |",
                    flush=True,
                )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()


if __name__ == "__main__":
    main()
