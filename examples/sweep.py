"""Sweep MbPA's hyper-parameters on the VALIDATION split of each stream (never the test split).

For each stream the model is trained once per key choice, task after task, exactly as
``examples/continual.py`` does with the stream's YAML (the two trainings give the same weights:
the callback does not touch training). Then, from the final weights, the validation images of
every task are classified under many MbPA settings (``k``, ``adaptation_steps``,
``adaptation_lr`` and ``beta`` are plain attributes of the callback, changed between
``trainer.predict`` runs). The score is the final average accuracy over all tasks (the tasks'
validation splits have equal sizes, so this is the pooled accuracy).

Two key choices (the memory key is the input of the module named by ``head``):

* hidden keys, ``head: net.classifier``: the last hidden layer, the input of the linear head;
* pixel keys, ``head: net``: the whole MLP is the "head", so the key is the image itself and
  the whole MLP is adapted per query (``torch.func`` path, slower).

    python examples/sweep.py                       # all three streams, ~28 minutes on 1 thread
    python examples/sweep.py --streams permuted

Tables printed per stream:

1. neighbour diagnostics: for each task's validation images, the fraction of their K nearest
   memories written while training that task, the fraction carrying the image's label, and
   the accuracy of the weighted K-NN vote alone; for hidden keys as written, hidden keys
   re-encoded with the final weights (what ``MbPA(store_inputs=True, refresh_keys=...)`` gives;
   it needs the old training images; ``examples/drift.py`` measures it end to end) and pixel keys;
2. hidden keys: ``adaptation_steps`` x ``adaptation_lr`` x ``beta`` at k=32, then ``k``, then
   memory levers at the best setting: FIFO capacity, reservoir capacity and ``write_fraction``
   (the memory is rebuilt from what the full run wrote: a FIFO of capacity C holds the last C
   writes; a reservoir or a write fraction a uniform random subset);
3. the same grid on the re-encoded memory;
4. pixel keys: a smaller grid (each query adapts the whole MLP), then ``k``;

and a summary: each stream's best, and the settings with the best mean gain over streams.

``--recipe`` instead chooses the recommended continual-learning recipe
(``examples/configs/recommended_<stream>.yaml``): each stream is trained once with hidden keys,
``store_inputs``, ``refresh_keys: epoch_end`` and class-balanced replay (every step, 64 stored
examples), then on the validation split:

1. what makes local adaptation help the rare classes, at the callback's default adaptation
   setting (k=32, 20 steps, lr 0.01, beta 0): plain cross-entropy; neighbour weights divided by
   their class's share of the memory or by their class's count among the K neighbours;
   ``adaptation_loss: logit_adjusted``; mixing with the unadapted output (``base_weight``);
   a memory with per-class quotas (the run's writes replayed into a smaller
   ``eviction: class_balanced`` memory);
2. ``k`` x ``adaptation_steps`` x ``adaptation_lr`` for both adaptation losses; the recipe is
   the setting with the best mean validation average over the streams.

    python examples/sweep.py --recipe                 # ~3 minutes on 2 threads
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader

from examples.continual import build, find_mbpa, fit_task
from examples.datamodules import MNISTTaskStream, Split
from lightning_mbpa import EpisodicMemory, MbPA

STREAMS = ("permuted", "class_incremental", "imbalanced")
_ARG = "--trainer.callbacks.init_args."
HIDDEN_KEYS = [f"{_ARG}head", "net.classifier"]
PIXEL_KEYS = [f"{_ARG}head", "net"]
#: how the recommended recipe trains: hidden keys, stored inputs, keys refreshed at every epoch
#: end, class-balanced replay of 64 stored examples at every optimizer step
RECIPE_TRAINING = [
    *HIDDEN_KEYS,
    f"{_ARG}store_inputs", "true",
    f"{_ARG}refresh_keys", "epoch_end",
    f"{_ARG}replay_every_n_steps", "1",
    f"{_ARG}replay_batch_size", "64",
    f"{_ARG}replay_sampling", "class_balanced",
]  # fmt: skip


@dataclass(frozen=True)
class Grid:
    """The values tried; ``smoke`` is a seconds-long run that keeps the script working."""

    steps: tuple[int, ...] = (1, 5, 20)
    lrs: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.1, 1.0)
    betas: tuple[float, ...] = (0.0, 0.01, 0.1)
    ks: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    fractions: tuple[float, ...] = (0.5, 0.1, 0.02)
    pixel_steps: tuple[int, ...] = (1, 5, 10)
    pixel_lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    pixel_betas: tuple[float, ...] = (0.0, 0.1)
    pixel_ks: tuple[int, ...] = (8, 16, 64)


GRIDS = {
    "full": Grid(),
    "smoke": Grid((5,), (0.01,), (0.0,), (8,), (0.5,), (5,), (0.1,), (0.0,), (8,)),
}


@dataclass
class Stream:
    """A stream trained to its last task, with what the sweep needs to evaluate it."""

    name: str
    trainer: pl.Trainer
    model: pl.LightningModule
    data: MNISTTaskStream
    mbpa: MbPA
    keys: Tensor  # everything the run wrote, in write order
    values: Tensor
    write_task: np.ndarray  # the task during which each entry was written
    val_x: Tensor
    val_y: Tensor
    val_task: np.ndarray
    fit_seconds: float = 0.0  # wall time of the trainer.fit calls of every task
    fit_cpu_seconds: float = 0.0  # their CPU time (this process, all threads)


def train(
    stream: str,
    extra: list[str],
    after_task: Callable[[int, pl.LightningModule], None] | None = None,
) -> Stream:
    """Train ``stream``'s YAML (plus ``extra`` overrides) task after task; ``after_task(t, model)``
    runs after each task."""
    cli = build(
        [
            "--config",
            f"examples/configs/{stream}.yaml",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    mbpa = find_mbpa(trainer)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    boundaries = []
    fit_seconds = fit_cpu_seconds = 0.0
    for t in range(data.num_tasks):
        start, cpu = time.perf_counter(), time.process_time()
        fit_task(trainer, model, data, t, epochs)
        fit_seconds += time.perf_counter() - start
        fit_cpu_seconds += time.process_time() - cpu
        boundaries.append(mbpa.memory.num_seen)
        if after_task is not None:
            after_task(t, model)
    if mbpa.memory.num_seen > len(mbpa.memory):
        raise SystemExit(
            f"{stream}: raise memory_size for the sweep; the full run must fit in memory."
        )
    write_task = np.searchsorted(np.asarray(boundaries), np.arange(len(mbpa.memory)), side="right")
    val = [data.tasks[t].val for t in range(data.num_tasks)]
    val_x = torch.cat([v.tensors[0] for v in val])
    val_y = torch.cat([v.tensors[1] for v in val])
    val_task = np.concatenate([np.full(len(v), t) for t, v in enumerate(val)])
    return Stream(
        stream,
        trainer,
        model,
        data,
        mbpa,
        mbpa.memory.keys.clone(),
        mbpa.memory.values.clone(),
        write_task,
        val_x,
        val_y,
        val_task,
        fit_seconds,
        fit_cpu_seconds,
    )


def set_memory(s: Stream, keys: Tensor, values: Tensor) -> None:
    s.mbpa.memory.clear()
    s.mbpa.memory.add(keys, values)


def predict(s: Stream, split: Split = "val", **settings: float) -> np.ndarray:
    """Predicted classes of every validation (or test) image under ``settings`` (0 steps: the
    base model)."""
    for name, value in settings.items():
        setattr(s.mbpa, name, value)
    loader = DataLoader(
        ConcatDataset([getattr(task, split) for task in s.data.tasks]),
        batch_size=s.data.eval_batch_size,
    )
    batches = s.trainer.predict(s.model, dataloaders=loader)
    return torch.cat(batches).numpy()


def per_task(s: Stream, predictions: np.ndarray, split: Split = "val") -> np.ndarray:
    """Accuracy on each task of the predictions of every image of ``split``, in task order."""
    if split == "val":
        labels, task = s.val_y.numpy(), s.val_task
    else:
        sets = [getattr(t, split) for t in s.data.tasks]
        labels = torch.cat([d.tensors[1] for d in sets]).numpy()
        task = np.concatenate([np.full(len(d), t) for t, d in enumerate(sets)])
    correct = predictions == labels
    return np.array([correct[task == t].mean() for t in range(s.data.num_tasks)])


@torch.no_grad()
def embed(s: Stream, x: Tensor) -> Tensor:
    """Head inputs (the memory keys) of ``x`` with the model's current weights."""
    captured: list[Tensor] = []
    head = s.model.get_submodule(s.mbpa.head_name or "")
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    s.model.eval()
    try:
        s.model(x)
    finally:
        handle.remove()
    return captured[0].reshape(len(x), -1)


def repeat_per_epoch(s: Stream, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, np.ndarray]:
    """One entry per training image per epoch, task after task, like the run's own writes."""
    epochs = s.trainer.fit_loop.max_epochs // s.data.num_tasks
    sizes = [len(task.train) for task in s.data.tasks]
    parts_k, parts_v, parts_t = [], [], []
    for t, (k, v) in enumerate(zip(keys.split(sizes), values.split(sizes), strict=True)):
        parts_k += [k] * epochs
        parts_v += [v] * epochs
        parts_t.append(np.full(len(v) * epochs, t))
    return torch.cat(parts_k), torch.cat(parts_v), np.concatenate(parts_t)


def training_images(s: Stream) -> tuple[Tensor, Tensor]:
    train = [task.train.tensors for task in s.data.tasks]
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])


def reencoded(s: Stream) -> tuple[Tensor, Tensor, np.ndarray]:
    """Every training image encoded with the FINAL weights (an oracle: it needs the old images)."""
    x, y = training_images(s)
    return repeat_per_epoch(s, embed(s, x), y)


def neighbour_table(
    memories: dict[str, tuple[Stream, Tensor, Tensor, np.ndarray]], k: int
) -> list[str]:
    """Where the K nearest memories of each task's validation images come from.

    ``memories`` maps a label to ``(stream, keys, values, write_task)``: the keys are searched
    in that stream's own callback memory (its head fixes the key width), with the stream's own
    head inputs of the validation images as queries.
    """
    lines = [f"{'memory':<26} {'task':>8} {'from task':>10} {'same label':>11} {'K-NN acc':>9}"]
    for label, (s, keys, values, write_task) in memories.items():
        queries = embed(s, s.val_x)
        set_memory(s, keys, values)
        found = s.mbpa.memory.search(queries, k)
        same_task = write_task[found.indices.numpy()] == s.val_task[:, None]
        same_label = (found.values == s.val_y[:, None]).numpy()
        weights = 1.0 / (s.mbpa.kernel_eps + found.distances)
        votes = torch.zeros(len(queries), 10).scatter_add_(1, found.values, weights)
        knn_correct = (votes.argmax(1) == s.val_y).numpy()
        for t, task in enumerate(s.data.tasks):
            rows = s.val_task == t
            lines.append(
                f"{label:<26} {task.name:>8} {same_task[rows].mean():>10.2f} "
                f"{same_label[rows].mean():>11.2f} {knn_correct[rows].mean():>9.3f}"
            )
        set_memory(s, s.keys, s.values)
    return lines


def fmt_acc(acc: np.ndarray) -> str:
    return " ".join(f"{100 * a:5.1f}" for a in acc)


def row(label: str, acc: np.ndarray, base: np.ndarray) -> str:
    return f"{label:<28} {100 * acc.mean():>7.1f} {100 * (acc.mean() - base.mean()):>+6.1f} | {fmt_acc(acc)}"


Setting = tuple[int, float, float]


def grid_search(
    s: Stream,
    base: np.ndarray,
    steps: tuple[int, ...],
    lrs: tuple[float, ...],
    betas: tuple[float, ...],
    log: list[str],
) -> dict[Setting, float]:
    """Average validation accuracy of every (steps, lr, beta) at k=32."""
    log.append(f"{'steps  lr      beta':<28} {'average':>7} {'gain':>6} | per task")
    scores = {}
    for setting in itertools.product(steps, lrs, betas):
        n, lr, beta = setting
        acc = per_task(s, predict(s, k=32, adaptation_steps=n, adaptation_lr=lr, beta=beta))
        scores[setting] = acc.mean()
        log.append(row(f"{n:<6} {lr:<7g} {beta:<5g}", acc, base))
    best = max(scores, key=scores.__getitem__)
    log.append(
        f"best: steps={best[0]}, lr={best[1]:g}, beta={best[2]:g}: {100 * scores[best]:.1f} ({100 * (scores[best] - base.mean()):+.1f})"
    )
    return scores


def k_search(
    s: Stream, setting: Setting, ks: tuple[int, ...], base: np.ndarray, log: list[str]
) -> int:
    n, lr, beta = setting
    log.append(f"k at steps={n}, lr={lr:g}, beta={beta:g}:")
    scores = {}
    for k in sorted({*ks, 32}):
        acc = per_task(s, predict(s, k=k, adaptation_steps=n, adaptation_lr=lr, beta=beta))
        scores[k] = acc.mean()
        log.append(row(f"k={k}", acc, base))
    s.mbpa.k = best = max(scores, key=scores.__getitem__)
    return best


def sweep_stream(s: Stream, pixels: Stream, grid: Grid, log: list[str]) -> dict[str, object]:
    names = " ".join(task.name for task in s.data.tasks)
    base = per_task(s, predict(s, adaptation_steps=0))
    log.append(f"\n##### {s.name}: validation accuracy (%) after the last task; tasks {names}")
    log.append(
        f"memory: {len(s.keys)} entries (each training image once per epoch); hidden keys: width "
        f"{s.keys.shape[1]}, mean norm {s.keys.norm(dim=1).mean():.1f}"
    )
    log.append(row("base model (no MbPA)", base, base))

    oracle = reencoded(s)
    memories = {
        "hidden keys, as written": (s, s.keys, s.values, s.write_task),
        "hidden keys, re-encoded*": (s, *oracle),
        "pixel keys (head=net)": (pixels, pixels.keys, pixels.values, pixels.write_task),
    }
    log.append(
        "\nneighbour diagnostics, k=32 (* oracle: re-encodes old training images with the final weights)"
    )
    log.extend(neighbour_table(memories, 32))

    log.append("\n[hidden keys, as written] steps x lr x beta, k=32")
    hidden = grid_search(s, base, grid.steps, grid.lrs, grid.betas, log)
    best = max(hidden, key=hidden.__getitem__)
    best_k = k_search(s, best, grid.ks, base, log)

    log.append(f"memory levers at k={best_k}, steps={best[0]}, lr={best[1]:g}, beta={best[2]:g}:")
    n = len(s.keys)
    generator = torch.Generator().manual_seed(0)
    for fraction in grid.fractions:
        size = max(1, int(fraction * n))
        keep_res = torch.randperm(n, generator=generator)[:size].sort().values
        keep_wf = (torch.rand(n, generator=generator) < fraction).nonzero().squeeze(1)
        for label, keep in (
            (f"fifo memory_size={size}", torch.arange(n - size, n)),
            (f"reservoir memory_size={size}", keep_res),
            (f"write_fraction={fraction}", keep_wf),
        ):
            set_memory(s, s.keys[keep], s.values[keep])
            log.append(row(label, per_task(s, predict(s)), base))
    set_memory(s, s.keys, s.values)

    log.append("\n[hidden keys, re-encoded* oracle] steps x lr x beta, k=32")
    set_memory(s, oracle[0], oracle[1])
    fresh = grid_search(s, base, grid.steps, grid.lrs, grid.betas, log)
    set_memory(s, s.keys, s.values)

    log.append("\n[pixel keys: head=net, the whole MLP adapts] steps x lr x beta, k=32")
    pixel = grid_search(pixels, base, grid.pixel_steps, grid.pixel_lrs, grid.pixel_betas, log)
    best_pixel = max(pixel, key=pixel.__getitem__)
    pixel_k = k_search(pixels, best_pixel, grid.pixel_ks, base, log)
    return {
        "base": base.mean(),
        "hidden": hidden,
        "k": best_k,
        "fresh": fresh,
        "pixel": pixel,
        "pixel_k": pixel_k,
    }


def summarise(results: dict[str, dict[str, object]]) -> list[str]:
    lines = ["\n##### summary: best on validation per stream (average accuracy %, gain over base)"]
    lines.append(
        f"{'stream':<18} {'base':>5}  {'hidden keys':<30} {'hidden re-encoded*':<30} {'pixel keys':<30}"
    )
    for stream, r in results.items():
        cells = []
        for name in ("hidden", "fresh", "pixel"):
            scores = r[name]
            (n, lr, beta) = best = max(scores, key=scores.__getitem__)
            cells.append(
                f"{100 * scores[best]:5.1f} ({100 * (scores[best] - r['base']):+5.1f}) T={n} lr={lr:g} b={beta:g}"
            )
        lines.append(
            f"{stream:<18} {100 * r['base']:5.1f}  " + "  ".join(f"{c:<30}" for c in cells)
        )
    for name, title in (
        ("hidden", "hidden keys, as written"),
        ("fresh", "hidden keys, re-encoded*"),
    ):
        common = set.intersection(*(set(r[name]) for r in results.values()))
        mean_gain = {
            setting: float(np.mean([r[name][setting] - r["base"] for r in results.values()]))
            for setting in common
        }
        top = sorted(mean_gain, key=mean_gain.__getitem__, reverse=True)[:3]
        lines.append(
            f"mean gain over streams, {title}: "
            + "; ".join(
                f"T={n} lr={lr:g} beta={b:g}: {100 * mean_gain[(n, lr, b)]:+.1f}"
                for n, lr, b in top
            )
        )
    return lines


# ---------------------------------------------------------------------------- --recipe

#: the recipe grid: k x steps x lr x adaptation loss (beta 0)
RECIPE_GRID = {
    "full": ((16, 32, 64, 128), (5, 20), (0.003, 0.01, 0.03)),
    "smoke": ((8,), (5,), (0.01,)),
}
LOSSES = ("cross_entropy", "logit_adjusted")
DEFAULT_ADAPTATION = dict(k=32, adaptation_steps=20, adaptation_lr=0.01, beta=0.0)


def reweighted_predictions(s: Stream, divide_by: str) -> np.ndarray:
    """The callback's default adaptation with each neighbour's kernel weight divided by its
    class's share of the memory (``"memory share"``) or by its class's count among the query's
    K neighbours (``"neighbour count"``), renormalised: computed with the library's functions,
    as the callback would (a candidate that is no option of the callback)."""
    from lightning_mbpa import kernel_weights, local_adapt

    memory = s.mbpa.memory
    k, steps, lr, beta = DEFAULT_ADAPTATION.values()
    queries = embed(s, s.val_x)
    found = memory.search(queries, int(k))
    weights = kernel_weights(found.distances, found.mask, s.mbpa.kernel_eps)
    classes = int(s.model.get_submodule(s.mbpa.head_name or "").out_features)
    if divide_by == "memory share":
        share = torch.bincount(memory.values, minlength=classes).float() / len(memory)
        weights = weights / share[found.values]
    else:
        onehot = torch.nn.functional.one_hot(found.values, classes) * found.mask[..., None]
        weights = weights / onehot.sum(1).gather(1, found.values).clamp_min(1)
    weights = torch.where(found.mask, weights, 0.0)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-30)
    head = s.model.get_submodule(s.mbpa.head_name or "")
    adapted = local_adapt(
        head, queries, found.keys, found.values, weights, int(steps), float(lr), float(beta)
    )
    return adapted.argmax(1).numpy()


def quota_memory(s: Stream, capacity: int) -> EpisodicMemory:
    """The run's writes, in write order, into a memory of ``capacity`` with per-class quotas."""
    memory = EpisodicMemory(capacity, eviction="class_balanced")
    memory.add(s.keys, s.values)
    return memory


def rare_candidates(s: Stream, log: list[str]) -> dict[str, float]:
    """Section 1 of ``--recipe``: each candidate at the default adaptation setting."""
    base = per_task(s, predict(s, adaptation_steps=0))
    counts = torch.bincount(s.values, minlength=10).tolist()
    log.append(f"memory: {len(s.values)} entries, per class {counts}")
    log.append(
        f"{'candidate (k=32, 20 steps, lr 0.01, beta 0)':<44} {'average':>7} {'gain':>6} | per task"
    )
    log.append(
        f"{'base model (no adaptation)':<44} {100 * base.mean():>7.1f} {0:>+6.1f} | {fmt_acc(base)}"
    )
    scores: dict[str, float] = {}

    def add(label: str, acc: np.ndarray) -> None:
        scores[label] = float(acc.mean())
        gain = 100 * (acc.mean() - base.mean())
        log.append(f"{label:<44} {100 * acc.mean():>7.1f} {gain:>+6.1f} | {fmt_acc(acc)}")

    default = dict(DEFAULT_ADAPTATION, base_weight=0.0)
    add("cross-entropy (the paper)", per_task(s, predict(s, **default)))
    for divide_by in ("memory share", "neighbour count"):
        add(f"weights / class {divide_by}", per_task(s, reweighted_predictions(s, divide_by)))
    add(
        "adaptation_loss: logit_adjusted",
        per_task(s, predict(s, **default, adaptation_loss="logit_adjusted")),
    )
    for weight in (0.25, 0.5, 0.75):
        for loss in LOSSES:
            acc = per_task(
                s, predict(s, **{**default, "base_weight": weight}, adaptation_loss=loss)
            )
            add(f"base_weight {weight:g}, {loss}", acc)
    s.mbpa.base_weight = 0.0
    s.mbpa.adaptation_loss = "cross_entropy"
    full = s.mbpa.memory
    for capacity in (1000, 500):
        s.mbpa.memory = quota_memory(s, capacity)
        for loss in LOSSES:
            acc = per_task(s, predict(s, **default, adaptation_loss=loss))
            add(f"class_balanced memory of {capacity}, {loss}", acc)
    s.mbpa.memory = full
    s.mbpa.adaptation_loss = "cross_entropy"
    return scores


RecipeSetting = tuple[int, int, float, str]


def recipe_grid(s: Stream, grid: str, log: list[str]) -> tuple[float, dict[RecipeSetting, float]]:
    """Section 2 of ``--recipe``: k x steps x lr x adaptation loss, beta 0."""
    base = per_task(s, predict(s, adaptation_steps=0, base_weight=0.0))
    log.append(f"{'k   steps lr     loss':<44} {'average':>7} {'gain':>6} | per task")
    scores: dict[RecipeSetting, float] = {}
    ks, steps, lrs = RECIPE_GRID[grid]
    for k, n, lr, loss in itertools.product(ks, steps, lrs, LOSSES):
        acc = per_task(
            s, predict(s, k=k, adaptation_steps=n, adaptation_lr=lr, beta=0.0, adaptation_loss=loss)
        )
        scores[(k, n, lr, loss)] = float(acc.mean())
        gain = 100 * (acc.mean() - base.mean())
        log.append(
            f"{k:<3} {n:<5} {lr:<6g} {loss:<25} {100 * acc.mean():>7.1f} {gain:>+6.1f} | {fmt_acc(acc)}"
        )
    s.mbpa.adaptation_loss = "cross_entropy"
    return float(base.mean()), scores


def recipe(streams: list[str], grid: str, overrides: list[str]) -> dict[str, object]:
    """``--recipe``: train each stream once with the recipe's training, then sections 1 and 2."""
    bases: dict[str, float] = {}
    grids: dict[str, dict[RecipeSetting, float]] = {}
    candidates: dict[str, dict[str, float]] = {}
    for stream in streams:
        log = [f"\n##### {stream}: validation accuracy (%) after the last task (recipe training)"]
        s = train(stream, [*overrides, *RECIPE_TRAINING])
        log.append(f"training: {s.fit_seconds:.1f} s wall")
        candidates[stream] = rare_candidates(s, log)
        log.append("")
        bases[stream], grids[stream] = recipe_grid(s, grid, log)
        print("\n".join(log), flush=True)
    lines = ["\n##### recipe: mean validation average over " + ", ".join(streams)]
    settings = list(next(iter(grids.values())))
    mean = {x: float(np.mean([grids[st][x] for st in streams])) for x in settings}
    for loss in LOSSES:
        top = sorted((x for x in settings if x[3] == loss), key=mean.__getitem__, reverse=True)
        for k, n, lr, _ in top[:3]:
            per_stream = " ".join(f"{100 * grids[st][(k, n, lr, loss)]:5.1f}" for st in streams)
            lines.append(
                f"{loss:<15} k={k:<3} steps={n:<2} lr={lr:<6g} mean {100 * mean[(k, n, lr, loss)]:5.1f}"
                f" | {per_stream}"
            )
    best = max(settings, key=mean.__getitem__)
    lines.append(
        f"chosen: k={best[0]}, adaptation_steps={best[1]}, adaptation_lr={best[2]:g}, beta=0, "
        f"adaptation_loss={best[3]} (base model: "
        + " ".join(f"{100 * bases[st]:.1f}" for st in streams)
        + ")"
    )
    print("\n".join(lines), flush=True)
    return {"base": bases, "grid": grids, "candidates": candidates, "chosen": best}


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=STREAMS)
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: see docs/benchmarks.md)"
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="choose the recommended continual-learning recipe instead (see above)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="LightningCLI arguments for every stream, after --"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.recipe:
        chosen = recipe(args.streams, args.grid, args.overrides)
        print(f"sweep wall time {time.perf_counter() - start:.0f} s")
        return {"recipe": chosen}
    results = {}
    for stream in args.streams:
        log: list[str] = []
        hidden = train(stream, [*args.overrides, *HIDDEN_KEYS])
        pixels = train(stream, [*args.overrides, *PIXEL_KEYS])
        results[stream] = sweep_stream(hidden, pixels, GRIDS[args.grid], log)
        print("\n".join(log), flush=True)
    print("\n".join(summarise(results)))
    print(f"sweep wall time {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
