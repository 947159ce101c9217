"""Continual learning over a stream of MNIST tasks, with and without MbPA, from the same weights.

The classifier (:class:`examples.classifier.MLPClassifier`) knows nothing of MbPA; the YAML
attaches :class:`lightning_mbpa.MbPA` under ``trainer.callbacks``. The runner trains on the
tasks one after another (``trainer.max_epochs`` epochs each, a fresh optimiser per task, no
replay, no task ids) and after every task tests every task seen so far. One ``trainer.test``
gives both accuracies: the callback logs ``mbpa/base_acc`` (the trained model alone) and
``mbpa/adapted_acc`` (each test image classified by a head adapted on its nearest memories).

    python examples/continual.py --config examples/configs/permuted.yaml
    python examples/continual.py --config examples/configs/class_incremental.yaml
    python examples/continual.py --config examples/configs/imbalanced.yaml

Prints the accuracy matrices (task tested x after training task) and writes
``<out_dir>/<stream>.png`` (accuracy per task over time, base vs MbPA) and ``<stream>.json``.
Any setting can be overridden on the command line (``--trainer.max_epochs 1``,
``--trainer.callbacks.init_args.k 64`` ...; see ``--help``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# OpenMP threads that spin-wait for a core another process holds can make the demo several times
# slower on 2 threads than on 1 on shared cores; waiting passively, 2 threads lose little beside a
# busy core and still gain on an idle one (benchmarks/demo_threads.py; docs/benchmarks.md).
# It only works if set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from examples.classifier import MLPClassifier
from examples.datamodules import MNISTTaskStream
from lightning_mbpa import MbPA

MBPA_SETTINGS = ("memory_size", "k", "adaptation_steps", "adaptation_lr", "beta", "write_fraction")


class ContinualCLI(LightningCLI):
    """LightningCLI with the runner's own options (output folder, CPU threads)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--out_dir", type=str, default="examples/out", help="Where the plot and JSON go."
        )
        parser.add_argument(
            "--threads", type=int, default=2, help="torch.set_num_threads while training/testing."
        )


def build(args: list[str] | None = None) -> ContinualCLI:
    """Model, datamodule and Trainer from the YAML (and command-line overrides); nothing run."""
    return ContinualCLI(
        MLPClassifier,
        MNISTTaskStream,
        run=False,
        args=args,
        save_config_callback=None,
        parser_kwargs={"description": __doc__.split("\n\n")[0]},
    )


def find_mbpa(trainer: pl.Trainer) -> MbPA:
    found = [cb for cb in trainer.callbacks if isinstance(cb, MbPA)]
    if not found:
        raise SystemExit(
            "No MbPA callback: add `- class_path: lightning_mbpa.MbPA` under `trainer.callbacks`."
        )
    return found[0]


def fit_task(
    trainer: pl.Trainer, model: pl.LightningModule, data: MNISTTaskStream, task: int, epochs: int
) -> None:
    """Train ``epochs`` more epochs on ``task``, continuing the same model, Trainer and memory.

    One Trainer runs every task: ``max_epochs`` grows by ``epochs`` per task and the train and
    validation loaders are reloaded at each task boundary, so the fit loop picks up the new task.
    """
    data.set_task(task)
    trainer.reload_dataloaders_every_n_epochs = epochs
    trainer.fit_loop.max_epochs = epochs * (task + 1)
    trainer.fit(model, datamodule=data)


def test_task(
    trainer: pl.Trainer, model: pl.LightningModule, data: MNISTTaskStream, task: int
) -> dict[str, float]:
    """Base and MbPA accuracy on one task's test split (one ``trainer.test``, same weights)."""
    metrics = trainer.test(model, dataloaders=data.dataloader(task, "test"), verbose=False)[0]
    return {
        "base": float(metrics["mbpa/base_acc"]),
        "mbpa": float(metrics["mbpa/adapted_acc"]),
        "model": float(metrics["test/acc"]),
    }


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Run a stream end to end; return the accuracy matrices and settings (also written as JSON)."""
    start = time.perf_counter()
    cli = build(args)
    torch.set_num_threads(cli.config.threads)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    mbpa = find_mbpa(trainer)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    names = [task.name for task in data.tasks]
    num_tasks = len(names)
    base = np.full((num_tasks, num_tasks), np.nan)
    adapted = np.full((num_tasks, num_tasks), np.nan)
    model_acc = np.full((num_tasks, num_tasks), np.nan)
    memory_entries = []

    for t in range(num_tasks):
        print(f"\n=== task {t} ({names[t]}): training {epochs} epoch(s) ===", flush=True)
        fit_task(trainer, model, data, t, epochs)
        memory_entries.append(len(mbpa.memory))
        for j in range(t + 1):
            acc = test_task(trainer, model, data, j)
            base[j, t], adapted[j, t], model_acc[j, t] = acc["base"], acc["mbpa"], acc["model"]
        print(
            f"after task {t}: memory {len(mbpa.memory)} entries; average over seen tasks "
            f"base {np.nanmean(base[:, t]):.3f}, MbPA {np.nanmean(adapted[:, t]):.3f}",
            flush=True,
        )

    result = {
        "stream": data.stream,
        "tasks": names,
        "epochs_per_task": epochs,
        "train_sizes": [len(task.train) for task in data.tasks],
        "test_sizes": [len(task.test) for task in data.tasks],
        "mbpa": {name: getattr(mbpa, name) for name in MBPA_SETTINGS},
        "memory_entries": memory_entries,
        "base": base.tolist(),
        "adapted": adapted.tolist(),
        "model": model_acc.tolist(),
        "final_average": {"base": float(base[:, -1].mean()), "mbpa": float(adapted[:, -1].mean())},
        "seconds": time.perf_counter() - start,
    }
    out_dir = Path(cli.config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{data.stream}.json").write_text(json.dumps(_nan_to_none(result), indent=1))
    result["plot"] = str(plot(result, out_dir / f"{data.stream}.png"))
    print(report(result))
    return result


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: untested (task, time) cells become null."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def format_matrix(matrix: list[list[float]], names: list[str], title: str) -> str:
    """A task x time accuracy table (percent), with the average over seen tasks per column."""
    acc = np.asarray(matrix, dtype=float)
    width = max(8, *(len(n) + 2 for n in names))
    head = "tested \\ after".ljust(16) + "".join(f"{n:>{width}}" for n in names)
    lines = [title, head]
    for j, name in enumerate(names):
        cells = "".join(
            f"{'-':>{width}}" if np.isnan(v) else f"{100 * v:>{width}.1f}" for v in acc[j]
        )
        lines.append(name.ljust(16) + cells)
    lines.append(
        "average".ljust(16)
        + "".join(f"{100 * np.nanmean(acc[:, t]):>{width}.1f}" for t in range(len(names)))
    )
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    names = result["tasks"]
    settings = ", ".join(f"{k}={v}" for k, v in result["mbpa"].items())
    final = result["final_average"]
    return "\n".join(
        [
            "",
            f"Stream {result['stream']!r}: {len(names)} tasks, {result['epochs_per_task']} epoch(s) each; MbPA({settings})",
            "Accuracy (%) on each task (rows) after training on each task (columns).",
            "",
            format_matrix(result["base"], names, "Without MbPA (mbpa/base_acc):"),
            "",
            format_matrix(result["adapted"], names, "With MbPA (mbpa/adapted_acc), same weights:"),
            "",
            f"Final average accuracy over all {len(names)} tasks: base {100 * final['base']:.1f}%, "
            f"MbPA {100 * final['mbpa']:.1f}% ({100 * (final['mbpa'] - final['base']):+.1f} points).",
            f"Plot: {result.get('plot')}   Wall time: {result['seconds']:.0f} s",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy of every task over time, base (dashed) vs MbPA (solid), and their averages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["tasks"]
    base, adapted = np.asarray(result["base"]), np.asarray(result["adapted"])
    steps = np.arange(len(names))
    fig, (ax_tasks, ax_avg) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for j, name in enumerate(names):
        colour = f"C{j % 10}"
        ax_tasks.plot(steps[j:], adapted[j, j:], "-o", color=colour, label=f"{name} MbPA")
        ax_tasks.plot(steps[j:], base[j, j:], "--x", color=colour, alpha=0.7, label=f"{name} base")
    ax_avg.plot(steps, np.nanmean(adapted, axis=0), "-o", color="C3", label="MbPA")
    ax_avg.plot(steps, np.nanmean(base, axis=0), "--x", color="C0", label="base")
    for ax, title in ((ax_tasks, "accuracy per task"), (ax_avg, "average over seen tasks")):
        ax.set_xticks(steps, [f"after {n}" for n in names], rotation=20)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax_tasks.set_ylabel("test accuracy")
    ax_tasks.legend(fontsize=7, ncol=2)
    ax_avg.legend()
    fig.suptitle(f"{result['stream']}: base (dashed) vs MbPA (solid), same weights")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args: list[str] | None = None) -> dict[str, Any]:
    return run(args)


if __name__ == "__main__":
    main()
