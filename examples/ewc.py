"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, arXiv:1612.00796) as a small
Lightning callback: the continual-learning baseline ``examples/baselines.py`` compares MbPA with.

Each ``trainer.fit`` call is one task. When it ends, the callback computes the diagonal
(empirical) Fisher information of the finished task at the final weights ``θ*``:

    F_i = (1/N) Σ_n (∂ log p(y_n | x_n; θ) / ∂θ_i)²  at θ = θ*

over the task's ``N`` training examples, with ``y_n`` the example's **label** (the empirical
Fisher, not a sample from the model's predictive distribution), one gradient per example, in
eval mode. In later tasks every optimizer step sees the penalty of every finished task ``t``

    λ/2 · Σ_t Σ_i F_{t,i} (θ_i − θ*_{t,i})²

added to the loss through its gradient ``λ Σ_t F_{t,i} (θ_i − θ*_{t,i})``, which is added to the
parameters' gradients in ``on_before_optimizer_step`` (after the training step's backward, before
gradient clipping and the step); the logged training loss does not include it. One penalty term
per finished task, each with its own anchor ``θ*_t`` (the original multi-task EWC, not online
EWC's single running anchor).

Training batches must be ``(inputs, labels)`` with ``pl_module(inputs)`` returning class logits
(override :meth:`EWC.split_batch` otherwise). The per-example gradients use ``torch.func``
(``vmap`` of ``grad`` over ``functional_call``), so the forward must be vmappable (no
BatchNorm in train mode; the Fisher pass runs in eval mode).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader


class EWC(Callback):
    r"""Elastic Weight Consolidation: a quadratic pull toward each finished task's weights.

    Args:
        ewc_lambda: ``λ``, the strength of the penalty ``λ/2 · Σ_t Σ_i F_{t,i}(θ_i − θ*_{t,i})²``
            (a finite float >= 0; 0 is plain fine-tuning).
        fisher_batch_size: Examples per vmapped batch of per-example gradients when the Fisher
            is computed.

    Example::

        trainer = pl.Trainer(callbacks=[EWC(ewc_lambda=100.0)])
        for task in tasks:                  # one fit per task
            trainer.fit(model, task_loader)  # the Fisher of the task is computed when fit ends
    """

    def __init__(self, ewc_lambda: float = 100.0, fisher_batch_size: int = 256) -> None:
        super().__init__()
        if (
            isinstance(ewc_lambda, bool)
            or not isinstance(ewc_lambda, (int, float))
            or not float(ewc_lambda) >= 0
            or ewc_lambda == float("inf")
        ):
            raise MisconfigurationException(
                f"`ewc_lambda`={ewc_lambda!r} is invalid: expected a finite float >= 0."
            )
        if (
            isinstance(fisher_batch_size, bool)
            or not isinstance(fisher_batch_size, int)
            or (fisher_batch_size < 1)
        ):
            raise MisconfigurationException(
                f"`fisher_batch_size`={fisher_batch_size!r} is invalid: expected an int >= 1."
            )
        self.ewc_lambda = float(ewc_lambda)
        self.fisher_batch_size = fisher_batch_size
        #: one dict per finished task: parameter name -> diagonal Fisher / weights at the task end
        self.fishers: list[dict[str, Tensor]] = []
        self.anchors: list[dict[str, Tensor]] = []
        self._dataset: Any = None
        self._trained = False

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, labels)`` of a training batch; override for other batch layouts."""
        return batch[0], batch[1]

    # ------------------------------------------------------------------ the Fisher

    def fisher(self, model: nn.Module, dataloader: DataLoader) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of ``model`` at its current weights over ``dataloader``:
        the mean over examples of the squared gradient of ``log p(label | input)``."""
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return -F.cross_entropy(logits, y.unsqueeze(0))

        per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        was_training = model.training
        model.eval()
        try:
            for batch in dataloader:
                x, y = self.split_batch(batch)
                device = next(iter(params.values())).device
                grads = per_example(params, x.to(device), y.to(device))
                for name, g in grads.items():
                    total[name] += g.pow(2).sum(0)
                count += len(y)
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("EWC: the finished task's training data is empty.")
        return {name: t / count for name, t in total.items()}

    def consolidate(self, model: nn.Module, dataloader: DataLoader) -> None:
        """Close a task: store its Fisher over ``dataloader`` and the current weights."""
        self.fishers.append(self.fisher(model, dataloader))
        self.anchors.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )

    # ------------------------------------------------------------------ the penalty

    def penalty(self, model: nn.Module) -> Tensor:
        """``λ/2 · Σ_t Σ_i F_{t,i}(θ_i − θ*_{t,i})²`` at the model's current weights."""
        params = dict(model.named_parameters())
        value = torch.zeros(())
        for fisher, anchor in zip(self.fishers, self.anchors, strict=True):
            for name, f in fisher.items():
                value = value + (f * (params[name] - anchor[name]).pow(2)).sum()
        return 0.5 * self.ewc_lambda * value

    @torch.no_grad()
    def add_penalty_gradient(self, model: nn.Module) -> None:
        """Add ``λ Σ_t F_t (θ − θ*_t)`` to every parameter's gradient."""
        if not self.fishers or self.ewc_lambda == 0:
            return
        for name, param in model.named_parameters():
            if name not in self.fishers[0]:
                continue
            g = sum(
                (
                    f[name] * (param - a[name])
                    for f, a in zip(self.fishers, self.anchors, strict=True)
                ),
                torch.zeros_like(param),
            )
            g.mul_(self.ewc_lambda)
            if param.grad is None:
                param.grad = g
            else:
                param.grad.add_(g)

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        self._dataset = loader.dataset if isinstance(loader, DataLoader) else None
        self._trained = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.add_penalty_gradient(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._trained:  # a fit that ran no epoch finished no task
            return
        if self._dataset is None:
            raise MisconfigurationException(
                "EWC needs the task's training data as one torch DataLoader of (inputs, labels) "
                "batches; this fit had none."
            )
        # a fresh, unshuffled loader: the Fisher pass draws nothing from the global RNG
        self.consolidate(pl_module, DataLoader(self._dataset, batch_size=self.fisher_batch_size))
        self._dataset, self._trained = None, False

    def state_dict(self) -> dict[str, Any]:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fishers = list(state_dict["fishers"])
        self.anchors = list(state_dict["anchors"])
