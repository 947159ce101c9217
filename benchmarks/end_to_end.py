"""End-to-end cost of MbPA, measured side by side in one run (ratios, not wall-clock targets).

Test time: ``trainer.test`` with the callback over a memory of N keys, against the floor that
any MbPA must pay: a bare neighbour search of the same queries (``faiss.IndexFlatL2`` on CPU,
matmul + topk on CUDA) plus the model's plain forward pass. Printed with the split of where
the time goes (search, neighbour gathering + adaptation, Lightning and hook overhead).

Training: an epoch with the callback writing every example against the same epoch without it,
alternated, ratio of medians, for a small MLP (where the overhead is most visible).

    python benchmarks/end_to_end.py                 # CPU, N = 100k
    python benchmarks/end_to_end.py --sizes 10000 100000 1000000 --index HNSW32
    python benchmarks/end_to_end.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mbpa import MbPA, kernel_weights, local_adapt


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


def _time(fn, device: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def test_time(n: int, args: argparse.Namespace) -> None:
    device, dim, classes, k = args.device, 512, args.classes, args.k
    g = torch.Generator().manual_seed(0)
    model = MLP(dim, dim, classes).eval()
    queries_x = torch.randn(args.queries, dim, generator=g)
    labels = torch.randint(0, classes, (args.queries,), generator=g)
    keys = torch.relu(torch.randn(n, dim, generator=g))
    values = torch.randint(0, classes, (n,), generator=g)
    cb = MbPA(
        head="head",
        memory_size=n,
        k=k,
        adaptation_steps=5,
        adaptation_lr=0.1,
        beta=0.01,
        index=args.index,
    )
    cb.memory.to(device)
    for start in range(0, n, 65536):
        cb.memory.add(
            keys[start : start + 65536].to(device), values[start : start + 65536].to(device)
        )
    loader = DataLoader(TensorDataset(queries_x, labels), batch_size=args.batch)
    model = model.to(device)
    with torch.no_grad():
        h = model.encoder(queries_x.to(device))

    # the floor: bare search + plain forward
    if device == "cuda":
        bank = keys.to(device)
        norms = (bank * bank).sum(1)

        def bare_search():
            for q in h.split(args.batch):
                d = norms[None] - 2 * q @ bank.T
                d.topk(k, largest=False)
    else:
        bare = faiss.IndexFlatL2(dim)
        bare.add(keys.numpy())
        if args.index != "Flat":
            bare = faiss.index_factory(dim, args.index)
            bare.train(keys.numpy())
            bare.add(keys.numpy())

        def bare_search():
            for q in h.split(args.batch):
                bare.search(q.numpy(), k)

    def plain_forward():
        with torch.inference_mode():
            for x, _ in loader:
                model(x.to(device))

    def ours_search():
        for q in h.split(args.batch):
            cb.memory.search(q, k)

    def ours_adapt():
        for q in h.split(args.batch):
            nb = cb.memory.search(q, k)
            w = kernel_weights(nb.distances, nb.mask)
            local_adapt(model.head, q, nb.keys, nb.values, w, steps=5, lr=0.1, beta=0.01)

    def with_callback():
        _trainer(device, [cb]).test(model, loader, verbose=False)

    def without_callback():
        _trainer(device, []).test(model, loader, verbose=False)

    t_bare = _time(bare_search, device)
    t_fwd = _time(plain_forward, device)
    t_search = _time(ours_search, device)
    t_search_adapt = _time(ours_adapt, device)
    t_cb = _time(with_callback, device)
    t_lightning = _time(without_callback, device)
    recall = ""
    if args.index != "Flat":
        exact = faiss.IndexFlatL2(dim)
        exact.add(keys.numpy())
        _, truth = exact.search(h.cpu().numpy(), k)
        got = cb.memory.search(h, k).indices.cpu().numpy()
        hits = sum(len(set(a) & set(b)) for a, b in zip(truth.tolist(), got.tolist(), strict=True))
        recall = f"  recall@{k}={hits / truth.size:.3f}"
    q = args.queries
    print(
        f"N={n:>8} {args.index:<10} floor (bare search + forward) {q / (t_bare + t_fwd):8.0f} q/s | "
        f"trainer.test+MbPA {q / t_cb:8.0f} q/s | ratio {(t_bare + t_fwd) / t_cb:5.2f}x{recall}"
    )
    print(
        f"    split per query (us): bare search {1e6 * t_bare / q:7.1f}  our search {1e6 * t_search / q:7.1f}  "
        f"gather+adapt {1e6 * (t_search_adapt - t_search) / q:7.1f}  plain test loop {1e6 * t_lightning / q:7.1f}  "
        f"rest (hooks, metrics) {1e6 * max(t_cb - t_search_adapt - t_lightning, 0) / q:7.1f}"
    )


def training(args: argparse.Namespace) -> None:
    device = args.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.train, 64, generator=g)
    y = torch.randint(0, 10, (args.train,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with_cb, without = [], []
    for _ in range(args.rounds):
        for callbacks, times in (([], without), ([MbPA(memory_size=args.train)], with_cb)):
            model = MLP(64, 128, 10)
            trainer = _trainer(device, callbacks)
            start = time.perf_counter()
            trainer.fit(model, loader)
            _sync(device)
            times.append(time.perf_counter() - start)
    ratio = statistics.median(with_cb) / statistics.median(without)
    print(
        f"training epoch ({args.train} examples, MLP 64-128-10, batch 64): without {statistics.median(without):.3f}s, "
        f"with MbPA writing every example {statistics.median(with_cb):.3f}s: ratio of medians {ratio:.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--index", default="Flat")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and faiss threads (default: all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, faiss {faiss.__version__}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    pl.seed_everything(0, verbose=False)
    training(args)  # first: faiss' OpenMP threads, once started, slow torch's down on few cores
    for n in args.sizes:
        test_time(n, args)


if __name__ == "__main__":
    main()
