"""The key-drift part of :class:`~lightning_mbpa.MbPA`: stored inputs, refreshed keys, replay.

The paper keeps each key as computed at write time; while the network keeps learning those keys
drift away from where the same inputs now land. With ``store_inputs`` the memory keeps every
example's model input, so the keys can be recomputed with the current weights (``refresh``) and
stored examples can be replayed during training (de Masson d'Autume et al., "Episodic Memory in
Lifelong Language Learning", NeurIPS 2019, arXiv:1906.01076, "MbPA++").
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_mbpa._checks import module_device
from lightning_mbpa._head import HeadBinding
from lightning_mbpa._writer import generator_from_bytes, generator_state_bytes
from lightning_mbpa.adaptation import _eval_mode
from lightning_mbpa.batches import join_inputs, split_inputs
from lightning_mbpa.memory import EpisodicMemory

#: Memories at least this large say when their keys are being refreshed and how long it took.
_ANNOUNCE_REFRESH = 50_000

#: How replay draws the stored examples (``MbPA(replay_sampling=...)``).
ReplaySampling = Literal["uniform", "class_balanced"]
REPLAY_SAMPLING: tuple[str, ...] = ("uniform", "class_balanced")

#: ``embed(model, inputs) -> keys`` (``MbPA.embed``).
Embed = Callable[[nn.Module, Any], Tensor]


class Drift:
    """Stored inputs, key refresh and replay.

    Attributes:
        inputs_structure: How the stored input leaves join into a model input (a JSON string
            from :func:`~lightning_mbpa.batches.split_inputs`; checkpointed), or ``None``.
        replay_generator: Draws the replayed slots (checkpointed).
        replay_slots: The memory slots the last replay step used (transient).
        refresh_seconds: Seconds spent recomputing keys so far; ``last_refresh_seconds`` the
            last refresh's.
    """

    def __init__(self, head: HeadBinding, seed: int) -> None:
        self.head = head
        self.inputs_structure: str | None = None
        self.replay_generator = torch.Generator().manual_seed(seed)
        self.refresh_seconds = 0.0
        self.last_refresh_seconds: float | None = None
        self._init_transient()

    def _init_transient(self) -> None:
        self.replay_slots: Tensor | None = None
        self._warnings = WarningCache()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "inputs_structure": self.inputs_structure,
            "replay_generator": generator_state_bytes(self.replay_generator),
            "refresh_seconds": self.refresh_seconds,
            "last_refresh_seconds": self.last_refresh_seconds,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.replay_generator = generator_from_bytes(state.pop("replay_generator"))
        self.__dict__.update(state)
        self._init_transient()

    # ---- stored inputs
    def payload(
        self,
        inputs: Any,
        head_inputs: Tensor,
        labels: Tensor,
        calls: int,
        where: str,
        memory_len: int,
        describe_inputs: Callable[[], str],
    ) -> dict[str, Tensor]:
        """A batch's model ``inputs`` per example, as the memory payload ``{"0": leaf, ...}``."""
        if head_inputs.dim() != 2 or labels.dim() != 1 or calls != 1:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True) needs one key per example: one call of the head "
                f"{self.head.name!r} per batch with inputs [B, D] and labels [B]; the {where} "
                f"gave {calls} call(s) with inputs of shape {tuple(head_inputs.shape)} and labels "
                f"of shape {tuple(labels.shape)}. Set store_inputs=False."
            )
        try:
            leaves, structure = split_inputs(inputs, labels.shape[0])
        except ValueError as err:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): cannot store the model inputs of the {where} per "
                f"example: {err} Override `MbPA.extract_inputs` to return a tensor or "
                "tuples/lists/dicts of tensors with one row per example, or set "
                "store_inputs=False."
            ) from err
        if memory_len > 0 and structure != self.inputs_structure:
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): the model inputs of the {where} are structured as "
                f"{describe_inputs()}, unlike the inputs already stored; clear the memory "
                "(`mbpa.memory.clear()`) to store the new kind."
            )
        self.inputs_structure = structure
        # one row per label: the writer drops the rows labelled IGNORE_INDEX with their keys
        return {str(i): leaf for i, leaf in enumerate(leaves)}

    def stored_inputs(
        self, memory: EpisodicMemory, option: str, value: Any
    ) -> tuple[list[Tensor], str]:
        """The stored input leaves (in slot order) and their structure, or a clear error."""
        payload = memory.payload
        names = [str(i) for i in range(len(payload))]
        if self.inputs_structure is None or not payload or sorted(payload) != sorted(names):
            raise MisconfigurationException(
                f"MbPA({option}={value!r}): the memory holds {len(memory)} entries without "
                "stored model inputs (written with store_inputs=False, or loaded from such a "
                "checkpoint), so their keys cannot be recomputed. Refill it with "
                "store_inputs=True (fit, or `MbPA.populate`)."
            )
        return [payload[name] for name in names], self.inputs_structure

    @staticmethod
    def checked_memory_state(
        memory_state: dict[str, Any], structure: Any, store_inputs: bool
    ) -> dict[str, Any]:
        """A checkpoint's memory state fit for ``store_inputs``; raises before anything is
        loaded."""
        if not store_inputs:
            # stored inputs are of no use without store_inputs: load the keys alone
            return {name: value for name, value in memory_state.items() if name != "payload"}
        keys = memory_state.get("keys")
        entries = keys.shape[0] if isinstance(keys, Tensor) and keys.dim() == 2 else 0
        has_inputs = memory_state.get("payload") is not None
        if entries > 0 and (not has_inputs or not isinstance(structure, str)):
            raise MisconfigurationException(
                f"MbPA(store_inputs=True): the checkpoint's memory holds {entries} entries "
                "without stored model inputs (it was written with store_inputs=False), so their "
                "keys could never be refreshed or replayed. Load it with store_inputs=False, or "
                "refill the memory with store_inputs=True."
            )
        return memory_state

    # ---- refresh
    def refresh(
        self,
        memory: EpisodicMemory,
        model: nn.Module,
        embed: Embed,
        *,
        batch_size: int,
        option: tuple[str, Any],
        strategy: Any,
        trainer: pl.Trainer | None,
    ) -> int:
        """Recompute every stored key with ``embed`` (see ``MbPA.refresh``)."""
        n = len(memory)
        if n == 0:
            return 0
        leaves, structure = self.stored_inputs(memory, *option)
        start = time.perf_counter()
        if n >= _ANNOUNCE_REFRESH:
            rank_zero_info(
                f"MbPA: refreshing {n:,} stored keys with the current weights "
                f"({math.ceil(n / batch_size)} forward passes of up to {batch_size})."
            )
        device = module_device(model)
        show_bar = (
            n >= _ANNOUNCE_REFRESH
            and (strategy is None or strategy.global_rank == 0)
            and (trainer is None or trainer.progress_bar_callback is not None)
        )
        bar = Tqdm(total=n, desc="MbPA refresh", unit="keys", leave=False) if show_bar else None
        with (
            torch.no_grad(),
            _eval_mode(model),
            _forward_context(trainer),
            bar if bar is not None else contextlib.nullcontext(),
        ):
            for first in range(0, n, batch_size):
                last = min(n, first + batch_size)
                inputs = join_inputs([leaf[first:last] for leaf in leaves], structure)
                keys = _checked_keys(
                    embed(model, move_data_to_device(inputs, device)), last - first
                )
                if strategy is not None:
                    # ranks may differ in buffers (DDP syncs BatchNorm statistics only at the
                    # next forward): keep rank 0's keys, those of the weights it checkpoints
                    rank_zero = float(strategy.global_rank == 0)
                    keys = strategy.reduce(keys.float() * rank_zero, reduce_op="sum")
                try:
                    memory.update_keys(torch.arange(first, last), keys)
                except ValueError as err:
                    raise MisconfigurationException(
                        f"MbPA({option[0]}={option[1]!r}): the recomputed keys cannot be "
                        f"stored: {err}"
                    ) from err
                if bar is not None:
                    bar.update(last - first)
        self.last_refresh_seconds = time.perf_counter() - start
        self.refresh_seconds += self.last_refresh_seconds
        if n >= _ANNOUNCE_REFRESH:
            rank_zero_info(f"MbPA: refreshed {n:,} keys in {self.last_refresh_seconds:.1f} s.")
        return n

    # ---- replay
    def replay(
        self,
        memory: EpisodicMemory,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        embed: Embed,
        *,
        batch_size: int,
        sampling: ReplaySampling,
        option: tuple[str, Any],
        strategy: Any,
    ) -> None:
        """Add the gradient of a replayed batch's loss to the gradients the optimizer will use.

        Runs after the training step's backward (and, under ``16-mixed``, after the gradients
        were unscaled), before gradient clipping and ``optimizer.step``.
        """
        n = len(memory)
        if n == 0:
            return
        leaves, structure = self.stored_inputs(memory, *option)
        head = self.head.require()
        slots = draw_replay_slots(memory.values, batch_size, sampling, self.replay_generator)
        self.replay_slots = slots
        device = module_device(pl_module)
        inputs = join_inputs([leaf.index_select(0, slots) for leaf in leaves], structure)
        labels = memory.values[slots.to(memory.device)].to(device)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # under 16-mixed the gradients were unscaled before this hook, unless the optimizer
        # unscales inside its step (torch's `_step_supports_amp_scaling`); scale the replay loss
        # like the training loss to avoid fp16 underflow, and bring its gradients to the state
        # the others are in
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        unscale = scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False)
        with torch.enable_grad(), _norm_statistics_kept(pl_module):
            with _forward_context(trainer):
                keys = embed(pl_module, move_data_to_device(inputs, device))
                logits = head(_checked_keys(keys, len(slots)))
                loss = _replay_loss(logits, labels, self.head.name)
            grads: tuple[Tensor | None, ...] = torch.autograd.grad(
                loss * scale if scale != 1.0 else loss, params, allow_unused=True
            )
        if strategy is not None:  # every rank replayed the same slots: average anyway
            grads = _mean_over_ranks(strategy, grads)
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

    @staticmethod
    def check_replay_setup(value: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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


def draw_replay_slots(
    labels: Tensor, batch_size: int, sampling: ReplaySampling, generator: torch.Generator
) -> Tensor:
    """The memory slots one replay step uses, drawn with ``generator`` (CPU int64).

    ``labels`` are the ``n`` stored labels in slot order; ``min(n, batch_size)`` slots are drawn.

    * ``"uniform"``: distinct slots, uniformly: ``torch.randperm(n)[:batch_size]``.
    * ``"class_balanced"``: each draw independently (with replacement) picks a class uniformly
      among the distinct labels in ``labels``, then a slot of that class uniformly. Consumes
      ``torch.randint(C, (m,))`` (the classes, in increasing label order) then
      ``torch.rand(m, dtype=float64)`` (slot ``floor(u * count)`` among the class's slots in
      increasing slot order) from ``generator``.
    """
    n = int(labels.shape[0])
    if sampling == "uniform":
        return torch.randperm(n, generator=generator)[:batch_size]
    m = min(n, batch_size)
    labels = labels.detach().to("cpu", torch.int64)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    by_class = torch.argsort(labels, stable=True)  # slots grouped by label, slot order within
    starts = torch.cumsum(counts, 0) - counts
    picked = torch.randint(int(classes.shape[0]), (m,), generator=generator)
    u = torch.rand(m, dtype=torch.float64, generator=generator)
    within = torch.floor(u * counts[picked].to(torch.float64)).to(torch.int64)
    return by_class[starts[picked] + within]


def _mean_over_ranks(strategy: Any, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = strategy.reduce(torch.cat([g.reshape(-1) for g in present]), reduce_op="mean")
    pieces = iter(flat.split([g.numel() for g in present]))
    return tuple(None if g is None else next(pieces).view_as(g) for g in grads)


def _checked_keys(keys: Any, rows: int) -> Tensor:
    if not isinstance(keys, Tensor) or keys.dim() != 2 or keys.shape[0] != rows:
        got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
        raise MisconfigurationException(
            f"MbPA.embed must return keys of shape [{rows}, D] for {rows} stored inputs; got {got}."
        )
    return keys


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


def _forward_context(trainer: pl.Trainer | None) -> contextlib.AbstractContextManager[Any]:
    """The precision plugin's forward context (autocast under mixed precision), if attached."""
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.precision_plugin.forward_context()
