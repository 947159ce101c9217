"""Key drift: stored model inputs, refreshed keys and sparse replay (MbPA++).

The paper keeps each key as computed at write time; while the network keeps learning those keys
drift away from where the same inputs now land. With ``store_inputs`` the memory keeps every
example's model input, so the keys can be recomputed with the current weights (``refresh``) and
stored examples can be replayed during training (de Masson d'Autume et al., "Episodic Memory in
Lifelong Language Learning", NeurIPS 2019, arXiv:1906.01076).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_mbpa._writes import _IGNORE_INDEX
from lightning_mbpa.adaptation import _eval_mode
from lightning_mbpa.batches import (
    describe,
    join_inputs,
    split_inputs,
)

#: Memories at least this large say when their keys are being refreshed and how long it took.
_ANNOUNCE_REFRESH = 50_000


class _KeyDrift:
    """The key-drift options of :class:`~lightning_mbpa.MbPA` (a mixin: the state it uses is
    set up in ``MbPA.__init__`` and ``MbPA._init_runtime_state``)."""

    def refresh(self, model: nn.Module) -> int:
        """Recompute every stored key from its stored input with the model's current weights.

        What ``refresh_keys`` runs: batches of ``refresh_batch_size`` stored inputs through
        :meth:`embed`, under ``torch.no_grad`` with every module in eval mode (each module's
        mode is restored afterwards); labels and inputs stay. Needs ``store_inputs=True``.
        Under DDP every rank recomputes the keys and keeps rank 0's, so the ranks' memories
        stay identical.

        Returns:
            The number of keys recomputed.
        """
        return self._refresh(model, None)

    def _refresh(self, model: nn.Module, trainer: pl.Trainer | None) -> int:
        n = len(self.memory)
        if n == 0:
            return 0
        leaves, structure = self._require_stored_inputs("refresh_keys")
        if self._head_module is None and self._head_name is not None:
            self._set_head(model, self._head_name)
        start = time.perf_counter()
        size = self.refresh_batch_size
        if n >= _ANNOUNCE_REFRESH:
            rank_zero_info(
                f"MbPA: refreshing {n:,} stored keys with the current weights "
                f"({math.ceil(n / size)} forward passes of up to {size})."
            )
        device = _module_device(model)
        show_bar = (
            n >= _ANNOUNCE_REFRESH
            and (self._strategy is None or self._strategy.global_rank == 0)
            and (trainer is None or trainer.progress_bar_callback is not None)
        )
        bar = Tqdm(total=n, desc="MbPA refresh", unit="keys", leave=False) if show_bar else None
        with (
            torch.no_grad(),
            self._hooks_paused(),
            _eval_mode(model),
            _forward_context(trainer),
            bar if bar is not None else contextlib.nullcontext(),
        ):
            for first in range(0, n, size):
                last = min(n, first + size)
                inputs = join_inputs([leaf[first:last] for leaf in leaves], structure)
                keys = self._checked_keys(
                    self.embed(model, move_data_to_device(inputs, device)), last - first
                )
                if self._strategy is not None:
                    # ranks may differ in buffers (DDP syncs BatchNorm statistics only at the
                    # next forward): keep rank 0's keys, those of the weights it checkpoints
                    rank_zero = float(self._strategy.global_rank == 0)
                    keys = self._strategy.reduce(keys.float() * rank_zero, reduce_op="sum")
                try:
                    self.memory.update_keys(torch.arange(first, last), keys)
                except ValueError as err:
                    raise MisconfigurationException(
                        f"MbPA(refresh_keys={self.refresh_keys!r}): the recomputed keys cannot be "
                        f"stored: {err}"
                    ) from err
                if bar is not None:
                    bar.update(last - first)
        self._slot_outputs = None
        self._last_refresh_seconds = time.perf_counter() - start
        self.refresh_seconds += self._last_refresh_seconds
        if n >= _ANNOUNCE_REFRESH:
            rank_zero_info(f"MbPA: refreshed {n:,} keys in {self._last_refresh_seconds:.1f} s.")
        return n

    def _replay(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradient of a replayed batch's loss to the gradients the optimizer will use.

        Runs after the training step's backward (and, under ``16-mixed``, after the gradients
        were unscaled), before gradient clipping and ``optimizer.step``.
        """
        n = len(self.memory)
        if n == 0:
            return
        leaves, structure = self._require_stored_inputs("replay_every_n_steps")
        head = self._require_head()
        slots = torch.randperm(n, generator=self._replay_generator)[: self.replay_batch_size]
        self._replay_slots = slots
        device = _module_device(pl_module)
        inputs = join_inputs([leaf.index_select(0, slots) for leaf in leaves], structure)
        labels = self.memory.values[slots.to(self.memory.device)].to(device)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # under 16-mixed the gradients were unscaled before this hook, unless the optimizer
        # unscales inside its step; scale the replay loss like the training loss to avoid fp16
        # underflow, and bring its gradients to the state the others are in
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        unscale = scaler is not None and not _optimizer_handles_unscaling(optimizer)
        with torch.enable_grad(), self._hooks_paused(), _norm_statistics_kept(pl_module):
            with _forward_context(trainer):
                keys = self.embed(pl_module, move_data_to_device(inputs, device))
                logits = head(self._checked_keys(keys, len(slots)))
                loss = _replay_loss(logits, labels, self._head_name)
            grads = torch.autograd.grad(
                loss * scale if scale != 1.0 else loss, params, allow_unused=True
            )
        if self._strategy is not None:  # every rank replayed the same slots: average anyway
            grads = self._mean_over_ranks(grads)
        if unscale:
            grads = tuple(None if g is None else g / scale for g in grads)
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            self._warnings.warn(
                "MbPA(replay_every_n_steps): a replay step's gradients were not finite and were "
                "skipped (fp16 overflow or a diverging model).",
                category=UserWarning,
            )
            return
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad.detach().clone()
                else:
                    param.grad.add_(grad)

    def _mean_over_ranks(self, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        flat = self._strategy.reduce(torch.cat([g.reshape(-1) for g in present]), reduce_op="mean")
        pieces = iter(flat.split([g.numel() for g in present]))
        return tuple(None if g is None else next(pieces).view_as(g) for g in grads)

    def _check_replay_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = self.replay_every_n_steps
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"MbPA(`replay_every_n_steps`={value!r}) needs automatic optimization: it adds "
                f"the replay gradients before Lightning's optimizer step. "
                f"{type(pl_module).__name__} sets automatic_optimization=False; set "
                "replay_every_n_steps=None (and replay in your own training_step)."
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
            strategy, DeepSpeedStrategy
        ):
            raise MisconfigurationException(
                f"MbPA(`replay_every_n_steps`={value!r}) supports single-device and DDP "
                f"strategies, whose parameters hold full gradients; got "
                f"{type(strategy).__name__}. Set replay_every_n_steps=None."
            )

    def _stored_inputs(
        self, batch: Any, head_inputs: Tensor, labels: Tensor, calls: int, where: str
    ) -> dict[str, Tensor] | None:
        """With ``store_inputs``: the batch's model inputs per example, as the memory payload."""
        if not self.store_inputs:
            return None
        if head_inputs.dim() != 2 or labels.dim() != 1 or calls != 1:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True) needs one key per example: one call of the head "
                f"{self._head_name!r} per batch with inputs [B, D] and labels [B]; the {where} "
                f"gave {calls} call(s) with inputs of shape {tuple(head_inputs.shape)} and labels "
                f"of shape {tuple(labels.shape)}. Set store_inputs=False."
            )
        try:
            leaves, structure = split_inputs(self.extract_inputs(batch), labels.shape[0])
        except ValueError as err:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): cannot store the model inputs of the {where} per "
                f"example: {err} Override `MbPA.extract_inputs` to return a tensor or "
                "tuples/lists/dicts of tensors with one row per example, or set "
                "store_inputs=False."
            ) from err
        if len(self.memory) > 0 and structure != self._inputs_structure:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): the model inputs of the {where} are structured as "
                f"{describe(self.extract_inputs(batch))}, unlike the inputs already stored; "
                "clear the memory (`mbpa.memory.clear()`) to store the new kind."
            )
        self._inputs_structure = structure
        keep = labels != _IGNORE_INDEX
        if not bool(keep.all()):
            leaves = [leaf[keep.to(leaf.device)] for leaf in leaves]
        return {str(i): leaf for i, leaf in enumerate(leaves)}

    def _require_stored_inputs(self, option: str) -> tuple[list[Tensor], str]:
        """The stored input leaves (in slot order) and their structure, or a clear error."""
        payload = self.memory.payload
        names = [str(i) for i in range(len(payload))]
        if self._inputs_structure is None or not payload or sorted(payload) != sorted(names):
            raise MisconfigurationException(
                f"MbPA({option}={getattr(self, option)!r}): the memory holds {len(self.memory)} "
                "entries without stored model inputs (written with store_inputs=False, or loaded "
                "from such a checkpoint), so their keys cannot be recomputed. Refill it with "
                "store_inputs=True (fit, or `MbPA.populate`)."
            )
        return [payload[name] for name in names], self._inputs_structure

    def _check_stored_inputs_state(
        self, memory_state: dict[str, Any], state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        """A checkpoint's memory state fit for this callback's ``store_inputs``; raises before
        anything is loaded."""
        keys = memory_state.get("keys")
        entries = keys.shape[0] if isinstance(keys, Tensor) and keys.dim() == 2 else 0
        has_inputs = memory_state.get("payload") is not None
        if not self.store_inputs:
            # stored inputs are of no use without store_inputs: load the keys alone
            return {name: value for name, value in memory_state.items() if name != "payload"}
        structure = state_dict.get("inputs_structure")
        if entries > 0 and (not has_inputs or not isinstance(structure, str)):
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): the checkpoint's memory holds {entries} entries "
                "without stored model inputs (it was written with store_inputs=False), so their "
                "keys could never be refreshed or replayed. Load it with store_inputs=False, or "
                "refill the memory with store_inputs=True."
            )
        return memory_state

    @staticmethod
    def _checked_keys(keys: Any, rows: int) -> Tensor:
        if not isinstance(keys, Tensor) or keys.dim() != 2 or keys.shape[0] != rows:
            got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise MisconfigurationException(
                f"MbPA.embed must return keys of shape [{rows}, D] for {rows} stored inputs; "
                f"got {got}."
            )
        return keys

    @contextlib.contextmanager
    def _hooks_paused(self) -> Iterator[None]:
        """No writes and no adaptation while the callback runs the model on stored inputs."""
        capturing, self._capturing = self._capturing, False
        adapting = self._adapt_handle is not None
        self._remove_adapt_hook()
        try:
            yield
        finally:
            self._capturing = capturing
            if adapting and self._head_module is not None:
                self._adapt_handle = self._head_module.register_forward_hook(self._adapt_hook)


@contextlib.contextmanager
def _norm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Running statistics of normalisation layers (BatchNorm ...) as they were before."""
    saved = [
        (buffer, buffer.detach().clone())
        for module in model.modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        for buffer in module.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _replay_loss(logits: Tensor, labels: Tensor, head: str | None) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise MisconfigurationException(
            f"MbPA(replay_every_n_steps): the head {head!r} must map [B, D] keys to [B, C] "
            f"logits; it returned shape {tuple(logits.shape)} for {labels.shape[0]} examples."
        )
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def _module_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _forward_context(trainer: pl.Trainer | None) -> contextlib.AbstractContextManager[Any]:
    """The precision plugin's forward context (autocast under mixed precision), if attached."""
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.precision_plugin.forward_context()
