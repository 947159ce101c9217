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
        self._fisher_sum: dict[str, Tensor] = {}
        self._anchored_sum: dict[str, Tensor] = {}
        self._dataset: Any = None
        self._trained = False

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, labels)`` of a training batch; override for other batch layouts."""
        return batch[0], batch[1]

    # ------------------------------------------------------------------ the Fisher

    def fisher(self, model: nn.Module, dataloader: DataLoader) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of ``model`` at its current weights over ``dataloader``:
        the mean over examples of the squared gradient of ``log p(label | input)``, in eval mode.

        When every trainable parameter belongs to an ``nn.Linear`` that sees one row per example,
        the per-example squared gradients are summed in closed form (``Σ_n (δ_n a_nᵀ)² =
        (δ²)ᵀ(a²)``, with ``a_n`` the layer's input and ``δ_n`` the gradient at its output; one
        backward per batch); otherwise they come from ``torch.func`` (``vmap`` of ``grad``)."""
        was_training = model.training
        model.eval()
        try:
            total: dict[str, Tensor] | None = None
            if _linear_only(model):
                total, count = self._linear_squared_grads(model, dataloader)
            if total is None:
                total, count = self._vmap_squared_grads(model, dataloader)
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("EWC: the finished task's training data is empty.")
        return {name: t / count for name, t in total.items()}

    def _vmap_squared_grads(
        self, model: nn.Module, dataloader: DataLoader
    ) -> tuple[dict[str, Tensor], int]:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return -F.cross_entropy(logits, y.unsqueeze(0))

        per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        device = next(iter(params.values())).device
        for batch in dataloader:
            x, y = self.split_batch(batch)
            grads = per_example(params, x.to(device), y.to(device))
            for name, g in grads.items():
                total[name] += g.pow(2).sum(0)
            count += len(y)
        return total, count

    def _linear_squared_grads(
        self, model: nn.Module, dataloader: DataLoader
    ) -> tuple[dict[str, Tensor] | None, int]:
        """``None`` if a layer is called twice or on more than one row per example."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        calls: dict[str, list[tuple[Tensor, Tensor]]] = {}

        def capture(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
                calls.setdefault(name, []).append((args[0].detach(), output))

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in linears.items()]
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
        count = 0
        try:
            device = next(model.parameters()).device
            for batch in dataloader:
                x, y = self.split_batch(batch)
                calls.clear()
                logits = model(x.to(device))
                rows = len(y)
                if len(calls) != len(linears) or any(
                    len(c) != 1 or c[0][0].dim() != 2 or len(c[0][0]) != rows
                    for c in calls.values()
                ):
                    return None, 0
                log_likelihood = -F.cross_entropy(logits, y.to(device), reduction="sum")
                names = list(calls)
                deltas = torch.autograd.grad(
                    log_likelihood, [calls[n][0][1] for n in names], allow_unused=True
                )
                for name, delta in zip(names, deltas, strict=True):
                    if delta is None:  # the layer's output does not reach the logits
                        continue
                    a, d2 = calls[name][0][0], delta.pow(2)
                    module, prefix = linears[name], f"{name}." if name else ""
                    if module.weight.requires_grad:
                        total[f"{prefix}weight"] += d2.T @ a.pow(2)
                    if module.bias is not None and module.bias.requires_grad:
                        total[f"{prefix}bias"] += d2.sum(0)
                count += rows
        finally:
            for handle in handles:
                handle.remove()
        return total, count

    def consolidate(self, model: nn.Module, dataloader: DataLoader) -> None:
        """Close a task: store its Fisher over ``dataloader`` and the current weights."""
        fisher = self.fisher(model, dataloader)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.fishers.append(fisher)
        self.anchors.append(anchor)
        self._accumulate(fisher, anchor)

    def _accumulate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        # Σ_t F_t(θ − θ*_t) = (Σ_t F_t)·θ − Σ_t F_t·θ*_t: two running sums, one fused op per step
        for name, f in fisher.items():
            if name in self._fisher_sum:
                self._fisher_sum[name] += f
                self._anchored_sum[name] += f * anchor[name]
            else:
                self._fisher_sum[name] = f.clone()
                self._anchored_sum[name] = f * anchor[name]

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
        """Add ``λ Σ_t F_t (θ − θ*_t)``, the penalty's gradient, to every parameter's gradient."""
        if not self.fishers or self.ewc_lambda == 0:
            return
        for name, param in model.named_parameters():
            if name not in self._fisher_sum:
                continue
            g = torch.addcmul(-self._anchored_sum[name], self._fisher_sum[name], param)
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
        self.fishers, self.anchors = [], []
        self._fisher_sum, self._anchored_sum = {}, {}
        for fisher, anchor in zip(state_dict["fishers"], state_dict["anchors"], strict=True):
            self.fishers.append(fisher)
            self.anchors.append(anchor)
            self._accumulate(fisher, anchor)


def _linear_only(model: nn.Module) -> bool:
    """Every trainable parameter belongs to an ``nn.Linear`` (and none is shared)."""
    in_linears = [
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Linear)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    ]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    return bool(trainable) and sorted(in_linears) == sorted(trainable)
