"""Key drift on the continual-learning demos: which memory keys keep MbPA useful while the network
keeps learning. Settings are chosen on the VALIDATION split; accuracies are on the TEST split.

Each stream (``examples/configs/<stream>.yaml``) is trained task after task as
``examples/continual.py`` does, and MbPA is evaluated from the final weights with

* hidden keys (``head: net.classifier``, the last hidden layer, where drift matters):

  - **stale**: keys as written during training (the paper; ``refresh_keys: never``);
  - **refreshed**: ``store_inputs: true`` + ``refresh_keys: epoch_end``: every stored key
    recomputed from its stored image with the current weights (the same weights: storing and
    refreshing change no weight, ``tests/test_drift.py``);
  - **refreshed + replay**: also ``replay_every_n_steps`` (sparse experience replay of
    ``replay_batch_size=64`` stored examples, MbPA++); this changes the training, so the base
    model (replay alone) is reported too; the replay rate is chosen on validation;
  - **frozen key network** (MbPA++'s answer, not an option of the callback; emulated here with
    the library's own search and adaptation functions): neighbours retrieved by a frozen
    network's keys, then the head adapted on their *refreshed* hidden keys. Two frozen
    networks: the encoder as it was after the first task, and the identity (pixels);

* pixel keys (``head: net``, the YAML's settings, chosen on validation by ``examples/sweep.py``):
  the whole MLP is adapted on each test image's nearest training images.

For every variant MbPA's ``k``, ``adaptation_steps``, ``adaptation_lr`` and ``beta`` are chosen on
the validation split with ``examples/sweep.py``'s grid search (a smaller grid, ``GRIDS``) and
``k`` search. Costs are CPU seconds of this process with ``torch.set_num_threads(1)`` (robust to
other jobs on a shared machine, unlike wall time), measured in separate runs: ``fit`` is every
task's ``trainer.fit`` (with writes, stored inputs, refreshes, replay), ``refresh`` one refresh of
the final memory (what ``refresh_keys: on_test`` costs per test/predict call; ``epoch_end`` pays
it after every epoch, inside ``fit``), ``test`` one ``trainer.predict`` over the whole test split.

    python examples/drift.py                        # the three streams, ~20 minutes on 2 cores
    python examples/drift.py --streams permuted --grid smoke -- --data.max_train 150

Prints one table per stream (plus the neighbour diagnostics of ``examples/sweep.py`` for stale
and refreshed keys) and writes ``<out>/drift.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import Tensor, nn

from examples import sweep
from examples.datamodules import Split
from lightning_mbpa import EpisodicMemory, kernel_weights, local_adapt

ARG = "--trainer.callbacks.init_args."
STORE_ONLY = [f"{ARG}store_inputs", "true"]
STORE = [*STORE_ONLY, f"{ARG}refresh_keys", "epoch_end"]
GRIDS = {
    "full": sweep.Grid(
        steps=(1, 5, 20), lrs=(0.001, 0.003, 0.01, 0.1, 1.0), betas=(0.0, 0.1), ks=(8, 16, 32, 128)
    ),
    "smoke": sweep.GRIDS["smoke"],
}
#: replay_every_n_steps tried (batch size 64, replay_batch_size 64: 1%, 10%, 100% replayed).
REPLAY_EVERY = {"full": (100, 10, 1), "smoke": (10,)}
REPLAY_BATCH = 64
THREADS = [2]  # --threads, restored after the single-thread cost measurements
SETTINGS = ("k", "adaptation_steps", "adaptation_lr", "beta")


@dataclass
class Row:
    """One line of a stream's table."""

    variant: str
    val: float  # average validation accuracy at the chosen setting
    test: list[float]  # test accuracy per task
    base_test: list[float]  # the same model without MbPA
    setting: str
    fit_s: float = float("nan")  # CPU seconds, 1 thread (see the module docstring)
    refresh_s: float | None = None
    test_s: float = float("nan")


def settings_of(s: sweep.Stream) -> dict[str, float]:
    return {name: getattr(s.mbpa, name) for name in SETTINGS}


def describe(settings: dict[str, float]) -> str:
    return (
        f"k={settings['k']} T={settings['adaptation_steps']} "
        f"lr={settings['adaptation_lr']:g} beta={settings['beta']:g}"
    )


def choose(s: sweep.Stream, grid: sweep.Grid, log: list[str]) -> dict[str, float]:
    """The validation-best MbPA setting: ``sweep``'s (steps, lr, beta) grid at k=32, then k."""
    base = sweep.per_task(s, sweep.predict(s, adaptation_steps=0))
    scores = sweep.grid_search(s, base, grid.steps, grid.lrs, grid.betas, log)
    n, lr, beta = max(scores, key=scores.__getitem__)
    k = sweep.k_search(s, (n, lr, beta), grid.ks, base, log)
    return {"k": k, "adaptation_steps": n, "adaptation_lr": lr, "beta": beta}


def evaluate(s: sweep.Stream, variant: str, settings: dict[str, float]) -> Row:
    """Validation and test accuracy at ``settings``, with the base model's test accuracy."""
    val = sweep.per_task(s, sweep.predict(s, **settings)).mean()
    test = sweep.per_task(s, sweep.predict(s, "test", **settings), "test")
    return Row(variant, float(val), test.tolist(), evaluate_base(s), describe(settings))


def evaluate_base(s: sweep.Stream) -> list[float]:
    return sweep.per_task(s, sweep.predict(s, "test", adaptation_steps=0), "test").tolist()


def cpu_seconds(work: Callable[[], Any]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


# ---------------------------------------------------------------------- frozen key network


@torch.no_grad()
def frozen_predictions(
    s: sweep.Stream,
    frozen: EpisodicMemory,
    encode_frozen: Any,
    split: Split,
    settings: dict[str, float],
) -> np.ndarray:
    """MbPA++-style: retrieve by the frozen network's keys, adapt the head on the neighbours'
    refreshed hidden keys (the callback's memory), predict from the query's hidden key."""
    x = torch.cat([getattr(task, split).tensors[0] for task in s.data.tasks])
    head = s.model.get_submodule(s.mbpa.head_name or "")
    queries = sweep.embed(s, x)
    found = frozen.search(encode_frozen(x), int(settings["k"]))
    weights = kernel_weights(found.distances, found.mask, s.mbpa.kernel_eps)
    keys = s.mbpa.memory.keys[found.indices.clamp_min(0)]
    logits = local_adapt(
        head,
        queries,
        keys,
        found.values,
        weights,
        steps=int(settings["adaptation_steps"]),
        lr=settings["adaptation_lr"],
        beta=settings["beta"],
        base_outputs=head(queries),
    )
    return logits.argmax(1).numpy()


def frozen_row(
    s: sweep.Stream, name: str, encode_frozen: Any, grid: sweep.Grid, log: list[str]
) -> Row:
    """Choose the setting on validation (same grid as the callback's), report on test; the
    test cost is this emulation's (one faiss search of the frozen keys, then ``local_adapt``)."""
    frozen = EpisodicMemory(capacity=len(s.mbpa.memory))
    frozen.add(encode_frozen(s.mbpa.memory.payload["0"]), s.mbpa.memory.values)
    base = sweep.per_task(s, sweep.predict(s, adaptation_steps=0))
    log.append(f"\n[{name}] steps x lr x beta, k=32, then k")
    scores: dict[tuple[int, float, float, int], float] = {}
    for n in grid.steps:
        for lr in grid.lrs:
            for beta in grid.betas:
                setting = {"k": 32, "adaptation_steps": n, "adaptation_lr": lr, "beta": beta}
                acc = sweep.per_task(
                    s, frozen_predictions(s, frozen, encode_frozen, "val", setting)
                )
                scores[(32, n, lr, beta)] = acc.mean()
                log.append(sweep.row(f"{n:<6} {lr:<7g} {beta:<5g}", acc, base))
    _, n, lr, beta = max(scores, key=scores.__getitem__)
    for k in sorted(set(grid.ks) - {32}):
        setting = {"k": k, "adaptation_steps": n, "adaptation_lr": lr, "beta": beta}
        acc = sweep.per_task(s, frozen_predictions(s, frozen, encode_frozen, "val", setting))
        scores[(k, n, lr, beta)] = acc.mean()
        log.append(sweep.row(f"k={k}", acc, base))
    best = max(scores, key=scores.__getitem__)
    settings = dict(zip(("k", "adaptation_steps", "adaptation_lr", "beta"), best, strict=True))
    test = sweep.per_task(s, frozen_predictions(s, frozen, encode_frozen, "test", settings), "test")
    row = Row(name, float(scores[best]), test.tolist(), evaluate_base(s), describe(settings))
    torch.set_num_threads(1)
    row.test_s = cpu_seconds(lambda: frozen_predictions(s, frozen, encode_frozen, "test", settings))
    torch.set_num_threads(THREADS[0])
    return row


# ---------------------------------------------------------------------- one stream


def run_stream(
    stream: str, grid_name: str, overrides: list[str], log: list[str]
) -> tuple[list[str], list[Row]]:
    grid = GRIDS[grid_name]
    log.append(f"\n##### {stream}")

    # stale hidden keys (the paper)
    plain = sweep.train(stream, [*overrides, *sweep.HIDDEN_KEYS])
    log.append("\n[hidden keys, stale] steps x lr x beta, k=32, then k")
    stale = evaluate(plain, "hidden keys, stale", choose(plain, grid, log))

    # refreshed hidden keys, same weights; keep the encoder of the first task for a frozen row
    snapshots: dict[int, nn.Module] = {}

    def keep_first(task: int, model: Any) -> None:
        if task == 0:
            snapshots[0] = copy.deepcopy(model.net.encoder).eval()

    fresh = sweep.train(stream, [*overrides, *sweep.HIDDEN_KEYS, *STORE], after_task=keep_first)
    if evaluate_base(fresh) != stale.base_test:
        raise SystemExit(f"{stream}: storing inputs / refreshing keys changed the trained weights")
    log.append("\n[hidden keys, refreshed] steps x lr x beta, k=32, then k")
    chosen = choose(fresh, grid, log)
    refreshed = evaluate(fresh, "hidden keys, refreshed", chosen)

    # frozen key networks: retrieval by frozen keys, adaptation on refreshed hidden keys
    encoder = snapshots[0]

    def first_task_encoder(x: Tensor) -> Tensor:
        with torch.no_grad():
            return encoder(x)

    frozen = [
        frozen_row(fresh, "frozen keys: task-0 encoder", first_task_encoder, grid, log),
        frozen_row(fresh, "frozen keys: pixels", lambda x: x.float(), grid, log),
    ]

    # refreshed keys + sparse replay: the replay rate on validation (at the refreshed setting)
    log.append(f"\nreplay (replay_batch_size={REPLAY_BATCH}, batch size 64) at {describe(chosen)}:")
    log.append(f"{'replay_every_n_steps':<22} {'replayed':>8} {'val base':>8} {'val MbPA':>8}")
    best = None
    for every in REPLAY_EVERY[grid_name]:
        s = sweep.train(stream, [*overrides, *sweep.HIDDEN_KEYS, *STORE, *replay_args(every)])
        val_base = sweep.per_task(s, sweep.predict(s, adaptation_steps=0)).mean()
        val = sweep.per_task(s, sweep.predict(s, **chosen)).mean()
        log.append(
            f"{every:<22} {REPLAY_BATCH / (64 * every):>8.0%} {100 * val_base:>8.1f} {100 * val:>8.1f}"
        )
        if best is None or val > best[0]:
            best = (val, every, s)
    assert best is not None
    _, every, replayed = best
    label = f"refreshed + replay every {every}"
    log.append(f"\n[hidden keys, {label}] steps x lr x beta, k=32, then k")
    with_replay = evaluate(replayed, label, choose(replayed, grid, log))

    # pixel keys at the YAML's settings
    pixels = sweep.train(stream, [*overrides, *sweep.PIXEL_KEYS])
    pixel = evaluate(pixels, "pixel keys (YAML)", settings_of(pixels))

    # costs: CPU seconds with one thread, in separate runs
    torch.set_num_threads(1)
    fit = {
        name: sweep.train(stream, [*overrides, *args]).fit_cpu_seconds
        for name, args in (
            ("plain", sweep.HIDDEN_KEYS),
            ("store_inputs", [*sweep.HIDDEN_KEYS, *STORE_ONLY]),
            ("store_inputs + epoch_end", [*sweep.HIDDEN_KEYS, *STORE]),
            (
                "store_inputs + epoch_end + replay",
                [*sweep.HIDDEN_KEYS, *STORE, *replay_args(every)],
            ),
            ("pixel keys", sweep.PIXEL_KEYS),
        )
    }
    stale.fit_s, refreshed.fit_s, with_replay.fit_s = (
        fit["plain"],
        fit["store_inputs + epoch_end"],
        fit["store_inputs + epoch_end + replay"],
    )
    pixel.fit_s = fit["pixel keys"]
    for row in frozen:
        row.fit_s = fit["store_inputs"]
    refreshed.refresh_s = float(
        np.median([cpu_seconds(lambda: fresh.mbpa.refresh(fresh.model)) for _ in range(5)])
    )
    with_replay.refresh_s = refreshed.refresh_s  # the same memory size and network
    for row, s, settings in (
        (stale, plain, stale.setting),
        (refreshed, fresh, refreshed.setting),
        (with_replay, replayed, with_replay.setting),
        (pixel, pixels, pixel.setting),
    ):
        values = parse(settings)
        row.test_s = cpu_seconds(lambda s=s, values=values: sweep.predict(s, "test", **values))
    torch.set_num_threads(THREADS[0])
    log.append(
        "\nfit CPU s (1 thread): "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in fit.items())
        + f"; one refresh of {len(fresh.mbpa.memory)} keys {refreshed.refresh_s:.3f} s"
    )
    # last: sweep.neighbour_table rebuilds the memories from their keys (the inputs are gone)
    log.append("\nneighbour diagnostics, k=32 (stale vs refreshed hidden keys, pixel keys)")
    log.extend(
        sweep.neighbour_table(
            {
                "hidden keys, stale": (plain, plain.keys, plain.values, plain.write_task),
                "hidden keys, refreshed": (fresh, fresh.keys, fresh.values, fresh.write_task),
                "pixel keys (head=net)": (pixels, pixels.keys, pixels.values, pixels.write_task),
            },
            32,
        )
    )

    return [task.name for task in plain.data.tasks], [stale, refreshed, *frozen, with_replay, pixel]


def replay_args(every: int) -> list[str]:
    return [f"{ARG}replay_every_n_steps", str(every), f"{ARG}replay_batch_size", str(REPLAY_BATCH)]


def parse(setting: str) -> dict[str, float]:
    """:func:`describe`'s string back into callback settings."""
    names = {"k": "k", "T": "adaptation_steps", "lr": "adaptation_lr", "beta": "beta"}
    values = dict(item.split("=") for item in setting.split())
    return {names[key]: (int(v) if key in ("k", "T") else float(v)) for key, v in values.items()}


def table(stream: str, tasks: list[str], rows: list[Row]) -> list[str]:
    head = " ".join(f"{t:>6}" for t in tasks)
    lines = [
        f"\n{stream}: TEST accuracy (%) per task after the last task; settings chosen on validation",
        f"{'variant':<34} {'val':>5} | {head} {'avg':>6} {'base':>6} {'gain':>6} | "
        f"{'fit':>6} {'refresh':>7} {'test':>6} | setting   (costs: CPU s, 1 thread)",
    ]
    for r in rows:
        test, base = np.asarray(r.test), np.asarray(r.base_test)
        cells = " ".join(f"{100 * a:>6.1f}" for a in test)
        refresh = "-" if r.refresh_s is None else f"{r.refresh_s:.2f}"
        lines.append(
            f"{r.variant:<34} {100 * r.val:>5.1f} | {cells} {100 * test.mean():>6.1f} "
            f"{100 * base.mean():>6.1f} {100 * (test.mean() - base.mean()):>+6.1f} | "
            f"{r.fit_s:>6.1f} {refresh:>7} {r.test_s:>6.1f} | {r.setting}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", default=list(sweep.STREAMS), choices=sweep.STREAMS)
    parser.add_argument("--grid", default="full", choices=sorted(sweep.GRIDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="examples/out", help="Where drift.json goes.")
    parser.add_argument(
        "overrides", nargs="*", help="LightningCLI arguments for every run, after --"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    THREADS[0] = args.threads
    start = time.perf_counter()
    results, tables = {}, []
    for stream in args.streams:
        log: list[str] = []
        names, rows = run_stream(stream, args.grid, args.overrides, log)
        print("\n".join(log), flush=True)
        tables += table(stream, names, rows)
        print("\n".join(tables[-len(rows) - 2 :]), flush=True)
        results[stream] = [asdict(r) for r in rows]
    print("\n##### all streams" + "\n".join(tables))
    print(f"drift wall time {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
