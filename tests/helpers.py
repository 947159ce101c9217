"""Tiny models and data shared by the callback tests (BoringModel-style)."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def blobs(n: int = 96, dim: int = 8, num_classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian clusters, one per class: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g)
    return x, y


class TinyClassifier(pl.LightningModule):
    """An ordinary classifier that knows nothing of MbPA.

    The head is registered *before* the encoder, so finding the head by registration order
    would pick the wrong module; MbPA must find it by execution order.
    """

    def __init__(self, dim: int = 8, hidden: int = 16, num_classes: int = 4, lr: float = 0.1):
        super().__init__()
        self.head = nn.Linear(hidden, num_classes)
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.lr = lr
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def _xy(self, batch):
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx):
        x, _ = self._xy(batch)
        return self(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TwoLayerHead(TinyClassifier):
    """A non-Linear head (an MLP block): adapted through the generic path."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def loader(x: Tensor, y: Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def params(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_bit_identical(before: dict[str, Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"parameter {name} changed"


class XY(NamedTuple):
    X: Tensor
    Y: Tensor


@dataclasses.dataclass
class Record:
    inputs: Tensor
    Target: Tensor


class RecordDataset(Dataset):
    """Yields dicts, NamedTuples or dataclasses, to exercise label discovery."""

    def __init__(self, x: Tensor, y: Tensor, kind: str):
        self.x, self.y, self.kind = x, y, kind

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if self.kind == "dict":
            return {"inputs": self.x[i], "label": self.y[i]}
        if self.kind == "namedtuple":
            return XY(self.x[i], self.y[i])
        return Record(self.x[i], self.y[i])


def ddp_environment(rank: int, world: int, port: int) -> None:
    """What Lightning reads to join an externally launched process group (CPU, one node)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_writes_and_adaptations(monkeypatch) -> dict[str, int]:
    """Counts rows written to an ``EpisodicMemory`` (every write goes to the storage at once or
    to the pending buffer, once each) and calls of the callback's ``local_adapt``."""
    import lightning_mbpa.adaptation as adaptation_module
    import lightning_mbpa.memory as memory_module
    from lightning_mbpa._writing import PendingRows

    calls = {"add": 0, "adapt": 0}
    real_write, real_append = memory_module.write_placed, PendingRows.append
    real_adapt = adaptation_module.local_adapt

    def counting_write(store, slots, ann, rows):
        calls["add"] += len(rows)
        return real_write(store, slots, ann, rows)

    def counting_append(self, rows):
        calls["add"] += len(rows)
        return real_append(self, rows)

    def counting_adapt(*args, **kwargs):
        calls["adapt"] += 1
        return real_adapt(*args, **kwargs)

    monkeypatch.setattr(memory_module, "write_placed", counting_write)
    monkeypatch.setattr(PendingRows, "append", counting_append)
    monkeypatch.setattr("lightning_mbpa.adaptation.local_adapt", counting_adapt)
    return calls
