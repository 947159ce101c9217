"""MbPA against the continual-learning baselines on one MNIST stream: same seed, model and data.

Every row trains the stream's YAML task after task exactly as ``examples/continual.py`` does
(``trainer.max_epochs`` epochs per task, a fresh optimiser per task, no task ids), from the same
initial weights, and after every task tests every task seen so far:

* **naive fine-tuning**: the YAML without the MbPA callback;
* **EWC** (``examples/ewc.py``): diagonal empirical Fisher of each finished task, penalty
  ``λ/2·Σ_t Σ_i F_{t,i}(θ_i − θ*_{t,i})²``; ``λ`` chosen from ``--ewc_lambdas`` by the final
  average accuracy on the **validation** split;
* **replay alone**: ``MbPA`` with ``adapt_on: []``, ``head: net.classifier``,
  ``store_inputs: true``, ``replay_every_n_steps: 1``, ``replay_batch_size: 64`` (sparse
  experience replay of stored training examples, no test-time adaptation);
* **MbPA, pixel keys**: the YAML as it is (``head: net``: memory keyed by the image, the whole
  MLP adapted per query);
* **MbPA, hidden keys + refresh + replay** (the MbPA++ recipe): ``head: net.classifier``,
  ``store_inputs: true``, ``refresh_keys: epoch_end``, the same replay as "replay alone", and the
  callback's default adaptation settings (``k=32``, 20 steps, lr 0.01, ``beta=0``, chosen on the
  demos' validation splits by ``examples/sweep.py``). Replay alone is this row's training without
  the test-time adaptation: the two rows train the same weights;
* **replay alone, class-balanced** and **MbPA, hidden keys + class-balanced replay**: the two
  rows above with ``replay_sampling: class_balanced`` (every replayed example is drawn from a
  class chosen uniformly among the classes in memory, so rare classes are replayed as often as
  common ones); again the two rows train the same weights;
* **MbPA, recommended recipe** (``examples/configs/recommended_<stream>.yaml``): the
  class-balanced row above with ``adaptation_loss: logit_adjusted`` (adapt on the neighbours'
  logits plus the memory's log class prior, predict without it) and the adaptation setting
  chosen on the validation splits by ``python examples/sweep.py --recipe``. It trains the same
  weights as "replay alone, class-balanced".

    python examples/baselines.py --config examples/configs/permuted.yaml
    python examples/baselines.py --config examples/configs/class_incremental.yaml
    python examples/baselines.py --config examples/configs/imbalanced.yaml

Prints one table per stream (test accuracy per task after the last task, the final average, on
the imbalanced stream the rare classes' accuracy, the validation average, the wall time of each
row) and writes ``<out_dir>/<stream>_baselines.json`` and ``<stream>_baselines.png`` (average
accuracy over the tasks seen so far, per row). Every other argument goes to ``continual.py``'s
LightningCLI (``--trainer.max_epochs 1``, ``--data.max_train 150``, ``--threads 1`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see examples/continual.py

import lightning.pytorch as pl
import numpy as np
import torch

from examples import continual, drift, sweep
from examples.datamodules import MNISTTaskStream, Split
from examples.ewc import EWC
from lightning_mbpa import MbPA

ARG = drift.ARG
#: the MbPA++ replay: every optimizer step, 64 stored examples (batch size 64: 100% replayed)
REPLAY = [*drift.STORE_ONLY, *drift.replay_args(1)]
#: the callback's defaults, chosen for hidden keys on the demos' validation splits (sweep.py)
HIDDEN_ADAPTATION = [
    f"{ARG}k", "32",
    f"{ARG}adaptation_steps", "20",
    f"{ARG}adaptation_lr", "0.01",
    f"{ARG}beta", "0.0",
]  # fmt: skip
BALANCED = [f"{ARG}replay_sampling", "class_balanced"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "naive": ("naive fine-tuning", []),
    "ewc": ("EWC", []),
    "replay": ("replay alone", [*sweep.HIDDEN_KEYS, *REPLAY, f"{ARG}adapt_on", "[]"]),
    "mbpa_pixel": ("MbPA, pixel keys (YAML)", []),
    "mbpa_hidden": (
        "MbPA, hidden keys+refresh+replay",
        [*sweep.HIDDEN_KEYS, *REPLAY, f"{ARG}refresh_keys", "epoch_end", *HIDDEN_ADAPTATION],
    ),
    "replay_cb": (
        "replay alone, class-balanced",
        [*sweep.HIDDEN_KEYS, *REPLAY, *BALANCED, f"{ARG}adapt_on", "[]"],
    ),
    "mbpa_hidden_cb": (
        "MbPA, hidden keys+cb replay",
        [
            *sweep.HIDDEN_KEYS,
            *REPLAY,
            *BALANCED,
            f"{ARG}refresh_keys",
            "epoch_end",
            *HIDDEN_ADAPTATION,
        ],
    ),
}
#: the recommended recipe's adaptation (examples/configs/recommended_<stream>.yaml), chosen by
#: the best mean validation average over the three streams in `examples/sweep.py --recipe`
RECOMMENDED_ADAPTATION = [
    f"{ARG}adaptation_loss", "logit_adjusted",
    f"{ARG}k", "64",
    f"{ARG}adaptation_steps", "20",
    f"{ARG}adaptation_lr", "0.01",
    f"{ARG}beta", "0.0",
]  # fmt: skip
ROWS["mbpa_recommended"] = (
    "MbPA, recommended recipe",
    [*sweep.RECIPE_TRAINING, *RECOMMENDED_ADAPTATION],
)
WITHOUT_MBPA = ("naive", "ewc")
EWC_LAMBDAS = tuple(10.0**e for e in range(10))  # 1 ... 1e9


@dataclass
class Row:
    """One row of a stream's table: one training run of every task, tested after each."""

    name: str
    label: str
    test: list[list[float]]  # accuracy, task tested (row) x after training task (column)
    val: list[float]  # validation accuracy per task after the last task
    fit_s: float  # wall seconds of every task's trainer.fit
    test_s: float  # wall seconds of the trainer.test calls after each task
    setting: str = ""
    base: list[list[float]] | None = None  # MbPA rows: the same weights without adaptation
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> np.ndarray:
        return np.asarray(self.test, dtype=float)[:, -1]

    @property
    def final_average(self) -> float:
        return float(self.final.mean())

    @property
    def val_average(self) -> float:
        return float(np.mean(self.val))

    @property
    def wall_s(self) -> float:
        return self.fit_s + self.test_s


def accuracy(
    trainer: pl.Trainer, model: pl.LightningModule, data: MNISTTaskStream, task: int, split: Split
) -> tuple[float, float | None]:
    """``test/acc`` (what ``test_step`` sees: adapted for MbPA rows) on one task's split, and
    ``mbpa/base_acc`` (the same weights without adaptation) where MbPA adapts."""
    metrics = trainer.test(model, dataloaders=data.dataloader(task, split), verbose=False)[0]
    base = metrics.get("mbpa/base_acc")
    return float(metrics["test/acc"]), None if base is None else float(base)


def run_row(name: str, args: list[str], ewc_lambda: float | None = None) -> tuple[Row, Any]:
    """Train and test one row; return it with the parsed config."""
    label, extra = ROWS[name]
    cli = continual.build([*args, *extra])
    torch.set_num_threads(cli.config.threads)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    mbpa = [cb for cb in callbacks if isinstance(cb, MbPA)]
    if name in WITHOUT_MBPA:  # before any fit: the callback never attaches its hooks
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, MbPA)]
        if name == "ewc":
            assert ewc_lambda is not None
            callbacks.append(EWC(ewc_lambda=ewc_lambda))
    elif not mbpa:
        continual.find_mbpa(trainer)  # the YAML has no MbPA callback: explain and exit
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    n = data.num_tasks
    test = np.full((n, n), np.nan)
    base = np.full((n, n), np.nan)
    fit_s = test_s = 0.0
    for t in range(n):
        start = time.perf_counter()
        continual.fit_task(trainer, model, data, t, epochs)
        fit_s += time.perf_counter() - start
        start = time.perf_counter()
        for j in range(t + 1):
            acc, base_acc = accuracy(trainer, model, data, j, "test")
            test[j, t] = acc
            base[j, t] = np.nan if base_acc is None else base_acc
        test_s += time.perf_counter() - start
    val = [accuracy(trainer, model, data, j, "val")[0] for j in range(n)]
    setting = describe_setting(name, mbpa[0] if mbpa else None, ewc_lambda)
    adapting = name not in WITHOUT_MBPA and bool(mbpa[0].adapt_on)
    row = Row(
        name,
        label,
        test.tolist(),
        val,
        fit_s,
        test_s,
        setting,
        base.tolist() if adapting else None,
    )
    row.extra["epochs_per_task"] = epochs
    if ewc_lambda is not None:
        row.extra["ewc_lambda"] = ewc_lambda
    return row, cli


def describe_setting(name: str, mbpa: MbPA | None, ewc_lambda: float | None) -> str:
    if name == "naive":
        return "no callback"
    if name == "ewc":
        return f"lambda={ewc_lambda:g} (chosen on validation)"
    assert mbpa is not None
    replay = (
        f"replay every {mbpa.replay_every_n_steps} step(s) x {mbpa.replay_batch_size}"
        + (f" ({mbpa.replay_sampling})" if mbpa.replay_sampling != "uniform" else "")
        if mbpa.replay_every_n_steps
        else "no replay"
    )
    if name.startswith("replay"):
        return f"{replay}, no adaptation"
    loss = "" if mbpa.adaptation_loss == "cross_entropy" else f", {mbpa.adaptation_loss}"
    return (
        f"head={mbpa.head_name}, k={mbpa.k}, steps={mbpa.adaptation_steps}, "
        f"lr={mbpa.adaptation_lr:g}, beta={mbpa.beta:g}{loss}, refresh={mbpa.refresh_keys}, "
        f"{replay}"
    )


def run(
    args: list[str], rows: tuple[str, ...] = tuple(ROWS), lambdas: tuple[float, ...] = EWC_LAMBDAS
) -> dict[str, Any]:
    """Every row of one stream; returns (and writes as JSON) the table."""
    results: list[Row] = []
    search: dict[str, float] = {}
    cli = None
    for name in rows:
        print(f"\n=== {ROWS[name][0]} ===", flush=True)
        if name != "ewc":
            row, cli = run_row(name, args)
            results.append(row)
            continue
        runs = []
        for lam in lambdas:  # lambda on the validation split only; ties: the smaller lambda
            row, cli = run_row(name, args, ewc_lambda=lam)
            runs.append(row)
            search[f"{lam:g}"] = row.val_average
            print(f"EWC lambda={lam:g}: validation average {100 * row.val_average:.1f}%")
        chosen = max(runs, key=lambda r: (r.val_average, -r.extra["ewc_lambda"]))
        chosen.extra["search_s"] = sum(r.wall_s for r in runs if r is not chosen)
        results.append(chosen)
    assert cli is not None
    data: MNISTTaskStream = cli.datamodule
    result: dict[str, Any] = {
        "stream": data.stream,
        "tasks": [task.name for task in data.tasks],
        "epochs_per_task": results[0].extra["epochs_per_task"],
        "seed": cli.config.seed_everything,
        "rare_task": 0 if data.stream == "imbalanced" else None,
        "minority_fraction": data.minority_fraction if data.stream == "imbalanced" else None,
        "ewc_search": search,
        "rows": [summarise(r, data.stream == "imbalanced") for r in results],
    }
    out_dir = Path(cli.config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data.stream}_baselines.json"
    path.write_text(json.dumps(continual._nan_to_none(result), indent=1))
    result["plot"] = str(plot(result, out_dir / f"{data.stream}_baselines.png"))
    print(report(result), flush=True)
    return result


def summarise(row: Row, imbalanced: bool) -> dict[str, Any]:
    out = asdict(row)
    base = None if row.base is None else np.asarray(row.base, dtype=float)[:, -1]
    out.update(
        final=row.final.tolist(),
        final_average=row.final_average,
        val_average=row.val_average,
        wall_s=row.wall_s,
        rare=float(row.final[0]) if imbalanced else None,
        base_final_average=None if base is None else float(base.mean()),
        base_rare=float(base[0]) if imbalanced and base is not None else None,
    )
    return out


def report(result: dict[str, Any]) -> str:
    tasks, rows = result["tasks"], result["rows"]
    rare = result["rare_task"] is not None
    width = max(6, *(len(t) + 1 for t in tasks))
    head = (
        f"{'row':<34}"
        + "".join(f"{t:>{width}}" for t in tasks)
        + f" {'final avg':>9}"
        + (f" {'rare ' + tasks[0]:>9}" if rare else "")
        + f" {'val avg':>8} {'wall s':>7}  setting"
    )
    lines = [
        "",
        f"Stream {result['stream']!r}: {len(tasks)} tasks, {result['epochs_per_task']} epoch(s) "
        f"each, seed {result['seed']}; TEST accuracy (%) on each task after the last task",
        head,
    ]
    for r in rows:
        cells = "".join(f"{100 * a:>{width}.1f}" for a in r["final"])
        lines.append(
            f"{r['label']:<34}{cells} {100 * r['final_average']:>9.1f}"
            + (f" {100 * r['rare']:>9.1f}" if rare else "")
            + f" {100 * r['val_average']:>8.1f} {r['wall_s']:>7.1f}  {r['setting']}"
        )
    if result["ewc_search"]:
        spent = next(r["extra"].get("search_s", 0.0) for r in rows if r["name"] == "ewc")
        lines.append(
            "EWC lambda, validation average (%): "
            + ", ".join(f"{lam}: {100 * v:.1f}" for lam, v in result["ewc_search"].items())
            + f" (the other lambdas: {spent:.0f} s more)"
        )
    if rare:
        lines.append(
            f"rare = the first task's classes ({tasks[0]}), trained on "
            f"{result['minority_fraction']:g} of their images; validation and test are balanced."
        )
    for r in rows:
        if r["base_final_average"] is None:
            continue
        lines.append(
            f"{r['label']}: the same weights without adaptation (mbpa/base_acc) "
            f"{100 * r['base_final_average']:.1f} -> adapted {100 * r['final_average']:.1f}"
            + (
                f"; rare {100 * r['base_rare']:.1f} -> {100 * r['rare']:.1f}"
                if r["base_rare"] is not None
                else ""
            )
        )
    by_name = {r["name"]: r for r in rows}
    for mine, title in (
        ("mbpa_hidden", "MbPA, hidden keys"),
        ("mbpa_recommended", "MbPA, recommended recipe"),
    ):
        if mine not in by_name:
            continue
        ours = by_name[mine]
        diffs = [
            f"{other['label']} {100 * (ours['final_average'] - other['final_average']):+.1f}"
            + (f" (rare {100 * (ours['rare'] - other['rare']):+.1f})" if rare else "")
            for name, other in by_name.items()
            if name != mine
        ]
        lines.append(f"{title} minus each row (points): " + "; ".join(diffs))
    lines.append(
        "wall s: every task's fit plus the tests after each task (not the validation pass); "
        f"plot: {result.get('plot')}"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Average test accuracy over the tasks seen so far, per row (and the rare classes')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    rare = result["rare_task"] is not None
    steps = np.arange(len(tasks))
    fig, axes = plt.subplots(1, 2 if rare else 1, figsize=(11 if rare else 6, 4), squeeze=False)
    for i, r in enumerate(result["rows"]):
        acc = np.asarray(r["test"], dtype=float)
        style = "-o" if r["name"].startswith("mbpa") else "--x"
        axes[0, 0].plot(steps, np.nanmean(acc, axis=0), style, color=f"C{i}", label=r["label"])
        if rare:
            axes[0, 1].plot(steps, acc[0], style, color=f"C{i}", label=r["label"])
    titles = ["average over the tasks seen so far"] + (
        [f"rare classes ({tasks[0]})"] if rare else []
    )
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_xticks(steps, [f"after {t}" for t in tasks], rotation=20)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{result['stream']}: MbPA and baselines, same seed, model and data")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other argument goes to examples/continual.py's LightningCLI "
        "(--config is required).",
    )
    parser.add_argument(
        "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="Rows to run, in order."
    )
    parser.add_argument(
        "--ewc_lambdas",
        nargs="+",
        type=float,
        default=list(EWC_LAMBDAS),
        help="EWC strengths tried; the best final validation average is reported.",
    )
    known, rest = parser.parse_known_args(argv)
    if "--config" not in rest and not any(a.startswith("--config=") for a in rest):
        parser.error("--config examples/configs/<stream>.yaml is required")
    rest = (
        [*rest, "--trainer.enable_progress_bar", "false"]
        if "--trainer.enable_progress_bar" not in rest
        else rest
    )
    if argv is None:  # LightningCLI gets its arguments from `rest`, not from the command line
        sys.argv = sys.argv[:1]
    return run(rest, tuple(known.rows), tuple(known.ewc_lambdas))


if __name__ == "__main__":
    main()
