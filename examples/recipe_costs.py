"""What the recommended recipe's options cost: CPU seconds of training and per test query.

Trains one stream (its YAML with hidden keys) once per training variant, adding the recipe's
options one at a time (stored inputs, uniform replay, class-balanced replay, refreshed keys),
and prints the CPU seconds of every task's ``fit`` (this process, all threads: robust to other
jobs on the machine). Then, on the last variant's final memory, the CPU milliseconds per
validation query of ``trainer.predict`` without adaptation and with the adaptation settings
compared (k, loss); the memory's bytes per entry are printed too.

    python examples/recipe_costs.py --stream permuted
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see examples/continual.py

import torch

from examples import sweep

_ARG = "--trainer.callbacks.init_args."
STORE = [f"{_ARG}store_inputs", "true"]
REPLAY = [f"{_ARG}replay_every_n_steps", "1", f"{_ARG}replay_batch_size", "64"]
BALANCED = [f"{_ARG}replay_sampling", "class_balanced"]
VARIANTS = {
    "hidden keys, written only": [*sweep.HIDDEN_KEYS],
    "+ store_inputs": [*sweep.HIDDEN_KEYS, *STORE],
    "+ uniform replay (every step, 64)": [*sweep.HIDDEN_KEYS, *STORE, *REPLAY],
    "+ class-balanced replay": [*sweep.HIDDEN_KEYS, *STORE, *REPLAY, *BALANCED],
    "+ refresh_keys epoch_end (the recipe)": sweep.RECIPE_TRAINING,
}
TESTS = {
    "no adaptation": dict(adaptation_steps=0),
    "k 32, 20 steps, cross_entropy": dict(
        k=32, adaptation_steps=20, adaptation_loss="cross_entropy"
    ),
    "k 32, 20 steps, logit_adjusted": dict(
        k=32, adaptation_steps=20, adaptation_loss="logit_adjusted"
    ),
    "k 64, 20 steps, cross_entropy": dict(
        k=64, adaptation_steps=20, adaptation_loss="cross_entropy"
    ),
    "k 64, 20 steps, logit_adjusted (the recipe)": dict(
        k=64, adaptation_steps=20, adaptation_loss="logit_adjusted"
    ),
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", default="permuted", choices=sweep.STREAMS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="predict runs timed per setting")
    parser.add_argument("overrides", nargs="*", help="LightningCLI arguments, after --")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict[str, float] = {}
    s = None
    for name, extra in VARIANTS.items():
        s = sweep.train(args.stream, [*args.overrides, *extra])
        out[f"fit: {name}"] = s.fit_cpu_seconds
        print(f"fit, {name:<44} {s.fit_cpu_seconds:7.1f} CPU s", flush=True)
    assert s is not None
    memory = s.mbpa.memory
    stored = sum(t[0].numel() * t.element_size() for t in memory.payload.values())
    key = memory.dim * 4 + 8 + 4  # float32 key, int64 label, float32 norm
    print(
        f"memory: {len(memory)} entries, {key} B of key, label and norm + {stored} B of stored input"
    )
    n = len(s.val_y)
    for name, settings in TESTS.items():
        sweep.predict(s, adaptation_lr=0.01, beta=0.0, **settings)  # warm-up
        start = time.process_time()
        for _ in range(args.repeats):
            sweep.predict(s, adaptation_lr=0.01, beta=0.0, **settings)
        ms = 1e3 * (time.process_time() - start) / (args.repeats * n)
        out[f"test: {name}"] = ms
        print(f"test, {name:<44} {ms:7.3f} CPU ms per query ({n} queries)", flush=True)
    return out


if __name__ == "__main__":
    main()
