"""End-to-end cost of MbPA, measured side by side in one run (ratios, not wall-clock targets).

Test time: ``trainer.test`` with the callback over a memory of N keys (D=512, C classes, K
neighbours, 5 adaptation steps) against the floor any MbPA must pay: a bare neighbour search of
the same queries plus the model's plain forward pass outside Lightning. Two floors are printed:
``faiss.IndexFlatL2.search`` (the usual baseline) and a bare torch matmul +
``topk`` (one of the two kernels the exact memory chooses from). "bare faiss + norms" is faiss'
kernel given the keys' squared norms, as the memory's faiss kernel runs (``IndexFlatL2``
recomputes them at every search). Each round runs every
variant once, in the same process, alternated; the table shows medians over rounds. The split
says where the callback's time goes: the neighbour search (the index's own work), gathering the
neighbours (their keys, labels and exact distances), the adaptation (kernel weights, cached base
outputs, the adapted head), and the rest of the test loop (Lightning, the forward pass, metrics).
After the table, one more run of each configuration under ``torch.profiler`` gives the profile:
per query, the time in each of MbPA's ``mbpa.*`` ranges (the search, the gathering, the
neighbours' base outputs, the adaptation's Gram matrix, softmax and updates, the metrics) and in
the rest, on the CPU model printed with it.

Training: an epoch with the callback writing every example against the same epoch without it,
alternated (ABC CBA), ratio of medians; both the epoch (``on_train_epoch_start`` to
``on_train_epoch_end``) and the whole ``fit`` are timed. ``--model mlp`` (default) is a small
MLP whose step takes about a millisecond, where the callback's own cost is most visible;
``--model cnn`` a small CNN on 28x28 inputs whose step takes tens of milliseconds, as most real
models. A last run times the callback's own hooks (the capture hook, the batch start and end)
per batch.

    python benchmarks/end_to_end.py                          # N = 100k, exact, 1 thread: ~2 min
    python benchmarks/end_to_end.py --sizes                  # training only (MLP): ~30 s
    python benchmarks/end_to_end.py --sizes --model cnn      # training only (CNN): ~2 min
    python benchmarks/end_to_end.py --threads 2
    python benchmarks/end_to_end.py --sizes 10000 100000 1000000 --index Flat IVF --queries 512
    python benchmarks/end_to_end.py --device cuda --queries 8192 --batch 1024
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

# isort: split
import faiss  # after torch, as in lightning_mbpa.memory: one shared OpenMP runtime

from lightning_mbpa import MbPA, _neighbours
from lightning_mbpa.memory import EpisodicMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import (
    chunks,
    cpu_model,
    queries,
)  # embedding-like inputs: clusters of low intrinsic dimension

DIM = 512


class MLP(pl.LightningModule):
    def __init__(self, d_in: int, dim: int, classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, dim), nn.ReLU())
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def test_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CNN(pl.LightningModule):
    """A small CNN on 28x28 single-channel inputs: a training step of tens of milliseconds."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 12 * 12, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class EpochTimer(pl.Callback):
    """Wall and CPU time of the (single) training epoch; put it last so that it sees the other
    callbacks' epoch ends. CPU time leaves out the time other processes had the cores."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def _trainer(device: str, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# The test-time clock: wall-clock time, or this process's CPU time (`--clock cpu`: on cores
# that other processes share, the time spent waiting for a core is left out).
_clock: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = _clock()
    fn()
    _sync(device)
    return _clock() - start


class _Stopwatch:
    """Adds up the time spent in wrapped calls (wrappers set on instances, so nothing leaks)."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(self.device)
            start = _clock()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds += _clock() - start
            return out

        return timed


def _index_params(index: str) -> str:
    if index.startswith("HNSW"):
        return "efSearch=64"
    if index.startswith("IVF"):
        return "nprobe=16"
    return ""


def _index_string(index: str, n: int) -> str:
    """'IVF' alone means IVF with 4·sqrt(N) lists (faiss' rule of thumb), flat vectors."""
    return f"IVF{max(1, round(4 * math.sqrt(n)))},Flat" if index == "IVF" else index


@torch.inference_mode()
def _keys(model: MLP, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory a fit would write: the head inputs of N clustered inputs, their cluster ids as
    labels (isotropic random keys would make every neighbour equidistant and recall meaningless)."""
    keys, labels = [], []
    for x, y in chunks(n, DIM, 65536):
        keys.append(model.encoder(x.to(model.device)).cpu())
        labels.append(y)
    return torch.cat(keys), torch.cat(labels)


# The profile's rows: (label, how its seconds follow from the mbpa.* ranges' totals `t`).
PROFILE_ROWS: list[tuple[str, Callable[[dict[str, float]], float]]] = [
    ("search: the index's kernel", lambda t: t["mbpa.search"] - t["mbpa.gather"]),
    ("search: gather keys, labels, exact distances", lambda t: t["mbpa.gather"]),
    ("kernel weights", lambda t: t["mbpa.weights"]),
    ("neighbours' base outputs (cached per slot)", lambda t: t["mbpa.neighbour_outputs"]),
    ("adapt: Gram matrix H·Hᵀ and H·q", lambda t: t["mbpa.dual.gram"]),
    ("adapt: neighbour logits (if not cached)", lambda t: t["mbpa.dual.neighbour_logits"]),
    ("adapt: softmax − onehot, all steps", lambda t: t["mbpa.dual.softmax"]),
    ("adapt: logit and output updates, all steps", lambda t: t["mbpa.dual.update"]),
    ("adapt: query output", lambda t: t["mbpa.dual.query_output"]),
    (
        "adapt: argument checks, set-up",
        lambda t: (
            t["mbpa.adapt"]
            - sum(
                t[f"mbpa.dual.{part}"]
                for part in ("gram", "neighbour_logits", "softmax", "update", "query_output")
            )
        ),
    ),
    (
        "hook: query checks, masks",
        lambda t: (
            t["mbpa.hook"]
            - sum(t[f"mbpa.{part}"] for part in ("search", "weights", "neighbour_outputs", "adapt"))
        ),
    ),
    ("metrics: base vs adapted accuracy", lambda t: t["mbpa.metrics"]),
    (
        "Lightning's loop, the forward, the rest",
        lambda t: t["total"] - t["mbpa.hook"] - t["mbpa.metrics"],
    ),
]


def _profile(run: Callable[[], object], device: str) -> dict[str, float]:
    """Seconds spent in each ``mbpa.*`` range (``lightning_mbpa._profiling``) during one call
    of ``run`` under ``torch.profiler``, and the call's own seconds as ``"total"``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()  # wall-clock time, as the profiler's ranges
        run()
        seconds = time.perf_counter() - start
    totals = dict.fromkeys(
        (
            "mbpa.hook",
            "mbpa.search",
            "mbpa.gather",
            "mbpa.weights",
            "mbpa.neighbour_outputs",
            "mbpa.adapt",
            "mbpa.dual.gram",
            "mbpa.dual.neighbour_logits",
            "mbpa.dual.softmax",
            "mbpa.dual.update",
            "mbpa.dual.query_output",
            "mbpa.metrics",
        ),
        0.0,
    )
    for event in prof.events():
        if event.name in totals:
            totals[event.name] += event.cpu_time_total * 1e-6
    totals["total"] = seconds
    return totals


def test_time(n: int, index: str, args: argparse.Namespace) -> tuple[str, dict[str, float], float]:
    device, classes, k, q = args.device, args.classes, args.k, args.queries
    index = _index_string(index, n)
    torch.manual_seed(0)
    model = MLP(DIM, DIM, classes).eval().to(device)
    queries_x = queries(q, DIM)
    labels = torch.randint(0, classes, (q,), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(queries_x, labels), batch_size=args.batch)
    cb = MbPA(head="head", memory_size=n, k=k, adaptation_steps=5, adaptation_lr=0.1, beta=0.01)
    cb.memory = EpisodicMemory(n, DIM, index=index, index_params=_index_params(index))
    cb.memory.to(device)
    keys, values = _keys(model, n)
    build = time.perf_counter()
    for start in range(0, n, 65536):
        cb.memory.add(keys[start : start + 65536].to(device), values[start : start + 65536])
    build = time.perf_counter() - build
    with torch.inference_mode():
        h = model.encoder(queries_x.to(device))
    h_batches = h.split(args.batch)

    bare = faiss.IndexFlatL2(DIM)
    bare.add(keys.numpy())
    h_np = [b.cpu().numpy() for b in h_batches]
    bank = keys.to(device)
    norms = (bank * bank).sum(1)
    chunk = max(k, (1 << 24) // args.batch)  # 64 MiB blocks, as the memory's torch backend
    del keys
    gc.collect()

    def bare_faiss() -> None:
        for qb in h_np:
            bare.search(qb, k)

    bank_np, norms_np = bank.cpu().numpy(), norms.cpu().numpy()

    def bare_faiss_norms() -> None:  # faiss' kernel given the keys' squared norms
        for qb in h_np:
            dist, rows = np.empty((len(qb), k), np.float32), np.empty((len(qb), k), np.int64)
            sp = faiss.swig_ptr
            faiss.knn_L2sqr(
                sp(qb), sp(bank_np), DIM, len(qb), n, k, sp(dist), sp(rows), sp(norms_np)
            )

    def bare_torch() -> None:  # matmul + topk, merged over blocks
        for qb in h_batches:
            best_d = best_i = None
            for s in range(0, n, chunk):
                d = torch.addmm(norms[None, s : s + chunk], qb, bank[s : s + chunk].T, alpha=-2.0)
                d, i = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False)
                if best_d is None:
                    best_d, best_i = d, i + s
                else:
                    best_d, pick = torch.cat([best_d, d], 1).topk(k, 1, largest=False)
                    best_i = torch.cat([best_i, i + s], 1).gather(1, pick)

    ann = cb.memory.faiss_index

    def bare_ann() -> None:
        for qb in h_np:
            ann.search(qb, k)

    def plain_forward() -> None:
        with torch.inference_mode():
            for x, _ in loader:
                model(x.to(device))

    search_watch, gather_watch = _Stopwatch(device), _Stopwatch(device)
    hook_watch = _Stopwatch(device)
    memory = cb.memory
    memory.search = search_watch.wrap(memory.search)
    # the search's gather step, looked up in its module at every search: restored below
    gathers = _neighbours.gather_cpu, _neighbours.gather_on_device
    _neighbours.gather_cpu, _neighbours.gather_on_device = map(gather_watch.wrap, gathers)
    cb._adapter._hook = hook_watch.wrap(cb._adapter._hook)  # registered at each test start
    hook_seconds = []

    def with_callback() -> None:
        search_watch.seconds = gather_watch.seconds = hook_watch.seconds = 0.0
        _trainer(device, [cb]).test(model, loader, verbose=False)
        hook_seconds.append(hook_watch.seconds)

    def without_callback() -> None:
        _trainer(device, []).test(model, loader, verbose=False)

    variants = {
        "bare faiss": bare_faiss,
        "bare faiss+norms": bare_faiss_norms,
        "bare torch": bare_torch,
        "forward": plain_forward,
        "test+MbPA": with_callback,
        "test": without_callback,
    }
    if ann is not None:
        variants["bare ann"] = bare_ann
    for fn in variants.values():  # warm-up: libraries, thread pools, allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    search_s, gather_s = [], []
    hook_seconds.clear()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(_timed(fn, device))
            if name == "test+MbPA":
                search_s.append(search_watch.seconds)
                gather_s.append(gather_watch.seconds)
    _neighbours.gather_cpu, _neighbours.gather_on_device = gathers
    med = {name: statistics.median(t) for name, t in times.items()}
    total, fwd = med["test+MbPA"], med["forward"]
    hook, searching, gathering = (statistics.median(v) for v in (hook_seconds, search_s, gather_s))
    recall = ""
    if index != "Flat":
        _, truth = bare.search(h.cpu().numpy(), k)
        got = memory.search(h, k).indices.cpu().numpy()
        hits = sum(len(set(a) & set(b)) for a, b in zip(truth.tolist(), got.tolist(), strict=True))
        recall = f"{hits / truth.size:.3f}"
    us = 1e6 / q
    floor_faiss, floor_torch = med["bare faiss"] + fwd, med["bare torch"] + fwd
    row = [
        f"{n:,}",
        index + (f" {_index_params(index)}" if _index_params(index) else ""),
        f"{q / floor_faiss:,.0f}",
        f"{q / total:,.0f}",
        f"{floor_faiss / total:.2f}",
        f"{floor_torch / total:.2f}",
        f"{med['bare faiss'] * us:.0f}",
        f"{med['bare faiss+norms'] * us:.0f}",
        f"{med['bare torch'] * us:.0f}",
        f"{(searching - gathering) * us:.0f}",
        f"{gathering * us:.1f}",
        f"{(hook - searching) * us:.1f}",
        f"{(total - hook - fwd) * us:.1f}",
        f"{(med['test'] - fwd) * us:.1f}",
        f"{fwd * us:.1f}",
    ]
    if ann is not None:
        row[-1] += (
            f" (bare {index.split(',')[0]} {med['bare ann'] * us:.0f}, ratio {(med['bare ann'] + fwd) / total:.2f})"
        )
    print("| " + " | ".join(row) + f" | {recall or '1 (exact)'} | {build:.0f} |", flush=True)
    # One more run of `trainer.test` with MbPA, under the profiler: where its time goes.
    profiled = _profile(with_callback, device) if device == "cpu" else {}
    return f"{n:,} {index.split(',')[0]}", profiled, total


TEST_HEADER = [
    "N",
    "index",
    "floor q/s",
    "test+MbPA q/s",
    "ratio (faiss floor)",
    "ratio (torch floor)",
    "bare faiss µs/q",
    "bare faiss + norms µs/q",
    "bare torch µs/q",
    "our search µs/q",
    "gather µs/q",
    "adapt µs/q",
    "test loop rest µs/q",
    "test loop w/o MbPA µs/q",
    "forward µs/q",
    "recall@K",
    "build s",
]


class HooksOnly(pl.Callback):
    """A callback that does nothing, with the hooks MbPA uses during ``fit`` and a forward
    pre-hook on the head: the floor any hook-based writer pays."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.handle = pl_module.head.register_forward_pre_hook(lambda module, args: None)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.handle.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pass


class TimedMbPA(MbPA):
    """MbPA whose per-batch work during ``fit`` is timed: the capture hook on the head, the
    batch start, the batch end (where the rows are checked and written) and the hook before the
    optimizer step. Wall time on ``perf_counter``: the hooks take microseconds, so another
    process rarely lands inside one, and a CPU-time clock would cost a system call per read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_batch: list[int] = []  # ns in MbPA's hooks, per training batch
        self.parts: dict[str, int] = {}  # ns in the parts of the write, summed over the run

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            out = fn(*args, **kwargs)
            self.per_batch[-1] += time.perf_counter_ns() - start
            return out

        return timed

    def on_fit_start(self, trainer, pl_module) -> None:
        writer = getattr(self, "_writer", self)  # versions before the writer part: the callback
        name = "_capture" if hasattr(writer, "_capture") else "_capture_hook"
        setattr(writer, name, self._timed(getattr(writer, name)))
        super().on_fit_start(trainer, pl_module)

    @contextlib.contextmanager
    def parts_timed(self) -> Iterator[None]:
        """Times the finite check, the copy into the pending buffer and the bulk writes (where
        this version of the package has them) while the block runs."""
        import lightning_mbpa._memory_checks as checks
        import lightning_mbpa._writing as writing

        targets = [
            (checks, "all_finite", "finite check"),
            (getattr(writing, "PendingRows", None), "append", "copy into the pending buffer"),
            (type(self.memory), "_settle", "bulk writes"),
        ]
        saved = []
        for owner, attribute, label in targets:
            if owner is None or not hasattr(owner, attribute):
                continue
            original = getattr(owner, attribute)
            saved.append((owner, attribute, original))
            setattr(owner, attribute, self._part(original, label))
        try:
            yield
        finally:
            for owner, attribute, original in saved:
                setattr(owner, attribute, original)

    def _part(self, fn: Callable, label: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[label] = self.parts.get(label, 0) + time.perf_counter_ns() - start

        return timed

    def on_train_batch_start(self, *args) -> None:
        self.per_batch.append(0)
        self._timed(super().on_train_batch_start)(*args)

    def on_train_batch_end(self, *args) -> None:
        self._timed(super().on_train_batch_end)(*args)

    def on_before_optimizer_step(self, *args) -> None:
        self._timed(super().on_before_optimizer_step)(*args)


def training(args: argparse.Namespace) -> None:
    from memory import cpu_model

    device = args.device
    g = torch.Generator().manual_seed(0)
    if args.model == "cnn":
        n = args.train or 2048
        x = torch.randn(n, 1, 28, 28, generator=g)
        make_model, described = CNN, "CNN conv16-conv32-pool-128-10 on 1x28x28"
    else:
        n = args.train or 20_000
        x = torch.randn(n, 64, generator=g)
        make_model, described = (lambda: MLP(64, 128, 10)), "MLP 64-128-10"
    y = torch.randint(0, 10, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    kinds = {
        "without": lambda: [],
        "hooks only": lambda: [HooksOnly()],
        "with MbPA": lambda: [MbPA(memory_size=n)],
    }
    epochs: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    fits: dict[str, list[float]] = {kind: [] for kind in kinds}

    def run(callbacks: list) -> EpochTimer:
        timer = EpochTimer()
        trainer = _trainer(device, [*callbacks, timer])
        start = time.perf_counter()
        trainer.fit(make_model(), loader)
        _sync(device)
        timer.fit_seconds = time.perf_counter() - start
        return timer

    def record(kind: str) -> None:
        timer = run(kinds[kind]())
        fits[kind].append(timer.fit_seconds)
        epochs[kind].append(timer.seconds)
        cpu[kind].append(timer.cpu_seconds)

    for kind in kinds:  # warm-up
        record(kind)
    for times in (epochs, cpu, fits):
        for kind in kinds:
            times[kind].clear()
    order = list(kinds)
    for r in range(args.rounds):
        for kind in order if r % 2 == 0 else order[::-1]:  # ABC CBA: drift cancels
            record(kind)
    batches = math.ceil(n / 64)
    timed_runs = [TimedMbPA(memory_size=n) for _ in range(3)]
    for timed in timed_runs:
        with timed.parts_timed():
            run([timed])
    print(
        f"training on {cpu_model()}: {n} examples, {described}, batch 64, one epoch, "
        f"{args.rounds} rounds alternated; with MbPA writing every example, and a do-nothing "
        "callback with the same hooks (the floor of any hook-based writer), vs without a callback"
    )
    step = statistics.median(epochs["without"]) / batches
    print(f"  a training step without a callback: {step * 1e3:.2f} ms (median epoch / batches)")
    for name, t in (("epoch wall", epochs), ("epoch CPU", cpu), ("fit wall", fits)):
        without = statistics.median(t["without"])
        spread = max(t["without"]) / min(t["without"])
        print(f"  {name:10s}: without {without:.3f}s (runs spread {spread:.2f}x slowest/fastest)")
        for kind in ("hooks only", "with MbPA"):
            with_ = statistics.median(t[kind])
            paired = statistics.median(a / b for a, b in zip(t[kind], t["without"], strict=True))
            print(
                f"    {kind:10s}: {with_:.3f}s: ratio of medians {with_ / without:.3f}x, median of"
                f" paired ratios {paired:.3f}x ({(with_ - without) / batches * 1e6:+.0f} µs per"
                " batch)",
                flush=True,
            )
    quarter = max(1, args.rounds // 4)
    fastest = {kind: statistics.mean(sorted(epochs[kind])[:quarter]) for kind in kinds}
    print(
        f"  fastest {quarter} runs of each (the least disturbed on shared cores): hooks only "
        f"{fastest['hooks only'] / fastest['without']:.3f}x, with MbPA "
        f"{fastest['with MbPA'] / fastest['without']:.3f}x the epoch without a callback"
    )
    median = statistics.median(statistics.median(t.per_batch) for t in timed_runs) / 1e3
    mean = statistics.median(statistics.mean(t.per_batch) for t in timed_runs) / 1e3
    print(
        f"  MbPA's own hooks (capture, batch start and end, before the optimizer step; median of"
        f" 3 runs): {median:.0f} µs in a batch's median, {mean:.0f} µs per batch on average with"
        f" the bulk writes: {mean / 1e6 / step:.1%} of a step",
        flush=True,
    )
    parts = ", ".join(
        f"{label} {statistics.median(t.parts.get(label, 0) for t in timed_runs) / batches / 1e3:.0f}"
        for label in timed_runs[0].parts
    )
    print(f"    of which, in µs per batch (the bulk writes averaged over the batches): {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[100_000], help="memory sizes (none: no test time)"
    )
    parser.add_argument(
        "--index",
        nargs="+",
        default=["Flat"],
        help="'Flat' (exact), 'IVF' (IVF 4·sqrt(N) lists, nprobe 16), 'HNSW32' (efSearch 64), ...",
    )
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="test-time rounds (medians)")
    parser.add_argument(
        "--train", type=int, default=0, help="training examples (0: 20000 for mlp, 2048 for cnn)"
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="training model")
    parser.add_argument("--train-rounds", type=int, default=9)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and faiss threads (they share one OpenMP runtime); 0: leave the default (all"
        " cores). 1 by default: on shared cores OpenMP's spin-waiting makes 2 threads up to 30x"
        " slower for the small training steps (see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="test-time clock: wall-clock time, or the process's CPU time (on shared cores it"
        " leaves out the time spent waiting for a core; with --threads 1 the two agree on an idle"
        " machine)",
    )
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-Trainer banners
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(
        f"{cpu_model()}: torch {torch.__version__}, faiss {faiss.__version__},"
        f" lightning {pl.__version__}, device {args.device}, torch threads {torch.get_num_threads()},"
        f" faiss threads {faiss.omp_get_max_threads()}"
    )
    pl.seed_everything(0, verbose=False)
    if not args.skip_training:
        training(argparse.Namespace(**{**vars(args), "rounds": args.train_rounds}))
    if not args.sizes:
        return
    print(
        f"\ntest time: D={DIM}, C={args.classes}, K={args.k}, 5 steps, {args.queries} queries in"
        f" batches of {args.batch}; medians of {args.rounds} alternated rounds; µs per query"
        f" of {'CPU' if args.clock == 'cpu' else 'wall-clock'} time"
    )
    print("| " + " | ".join(TEST_HEADER) + " |")
    print("|" + "|".join("---:" for _ in TEST_HEADER) + "|")
    profiles = []
    for n in args.sizes:
        for index in args.index:
            profiles.append(test_time(n, index, args))
            gc.collect()
    if args.device == "cpu":
        print_profile(profiles, args.queries)


def print_profile(profiles: list[tuple[str, dict[str, float], float]], queries: int) -> None:
    """Where the time of ``trainer.test`` with MbPA goes, per query, from one profiled run per
    configuration (the profiler's own cost included: compare its total to the median of the
    unprofiled runs, on the last line)."""
    print(
        f"\nwhere test+MbPA's time goes on {cpu_model()}, µs per query (one run under"
        " torch.profiler, wall-clock time; the mbpa.* ranges of lightning_mbpa._profiling):"
    )
    print("| phase | " + " | ".join(name for name, _, _ in profiles) + " |")
    print("|---|" + "|".join("---:" for _ in profiles) + "|")
    us = 1e6 / queries
    for label, part in PROFILE_ROWS:
        cells = [f"{part(t) * us:,.1f}" for _, t, _ in profiles]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{t['total'] * us:,.0f} ({median * us:,.0f})" for _, t, median in profiles]
    print("| total, profiled (median of the timed runs) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
