"""An ordinary Lightning MLP classifier for flattened 28x28 images.

It knows nothing of MbPA: the callback is attached from the Trainer (or a LightningCLI YAML)
and told which module is the head (``net.classifier``, whose input, the last hidden layer, is
the memory key; or ``net``, the whole MLP, to key the memory by the pixels themselves). Run it through LightningCLI::

    python -m examples.classifier fit --config examples/configs/quickstart.yaml
    python -m examples.classifier test --config examples/configs/quickstart.yaml \
        --ckpt_path examples/out/quickstart/checkpoints/mlp.ckpt
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from examples.datamodules import MNISTDataModule


class MLPClassifier(pl.LightningModule):
    """An MLP: ``net.encoder`` (Linear + ReLU layers), then a linear ``net.classifier`` head.

    Args:
        input_dim: Number of input features (784 for flattened 28x28 images).
        hidden_dims: Widths of the hidden layers.
        num_classes: Number of classes.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (256, 256),
        num_classes: int = 10,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(
            OrderedDict(encoder=nn.Sequential(*layers), classifier=nn.Linear(width, num_classes))
        )
        self.lr = lr
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(args: list[str] | None = None) -> LightningCLI:
    """``LightningCLI`` over :class:`MLPClassifier` and the single-task MNIST datamodule."""
    return LightningCLI(MLPClassifier, MNISTDataModule, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
