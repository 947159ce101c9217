"""The longer steps of :class:`~lightning_mbpa.MbPA`'s hooks: the checks of ``setup``, the
start of validate/test/predict (filling an empty memory, refreshing keys, arming the adapter),
:meth:`~lightning_mbpa.MbPA.populate`'s loop, key refresh and replay.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_mbpa._adapter import AdaptSettings
from lightning_mbpa._checks import module_device
from lightning_mbpa._drift import Drift
from lightning_mbpa._head import linear_names
from lightning_mbpa._labelled import write_batch

if TYPE_CHECKING:
    from lightning_mbpa.callback import MbPA


def setup(cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """Check the trainer's setup, remember the run and bind the named head (or check that one
    can be found)."""
    from lightning_mbpa.callback import MbPA  # imported here: callback.py imports this module

    others = [c for c in trainer.callbacks if isinstance(c, MbPA) and c is not cb]  # type: ignore[attr-defined]
    if others:
        raise MisconfigurationException(
            "MbPA: only one MbPA callback per Trainer is supported (found "
            f"{len(others) + 1}); they would adapt the same head twice. Keep one."
        )
    cb._module_ref = weakref.ref(pl_module)
    cb._strategy = trainer.strategy if trainer.world_size > 1 else None
    cb._head.classes_seen = None
    if cb._head.name is not None:
        cb._head.bind(pl_module, cb._head.name, cb.memory.dim)
    elif not linear_names(pl_module):
        raise MisconfigurationException(
            f"MbPA(head=None): {type(pl_module).__name__} has no nn.Linear module to use as "
            "the head. Name the output head with `head=...`."
        )
    if cb.replay_every_n_steps is not None and stage == "fit":
        Drift.check_replay_setup(cb.replay_every_n_steps, trainer, pl_module)
    if cb.save_memory and stage == "fit":
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_weights_only:
                rank_zero_warn(
                    "MbPA(save_memory=True): a ModelCheckpoint with save_weights_only=True "
                    "drops callback state, so its checkpoints will not hold the episodic "
                    "memory. Use save_weights_only=False to keep it.",
                    category=UserWarning,
                )


def move_memory(cb: MbPA, pl_module: nn.Module) -> None:
    """Put the memory on the module's GPU (a CPU module leaves it where it is)."""
    device = pl_module.device if isinstance(pl_module, pl.LightningModule) else None
    if device is not None and device.type == "cuda":
        cb.memory.to(device)


def start_stage(cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """``on_{validation,test,predict}_start``: adapt in the stages of ``adapt_on`` (not in the
    sanity check); a test that does not adapt may still write online."""
    if stage in cb.adapt_on and not (stage == "validate" and trainer.sanity_checking):
        start_adapting(cb, trainer, pl_module, stage)
    elif stage == "test" and cb.online_writes:
        cb._writer.install(pl_module)


def start_adapting(
    cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
) -> None:
    """Prepare the memory for ``stage`` (validate/test/predict) and arm the adapter."""
    move_memory(cb, pl_module)
    # write_on_fit=False with online_writes: the memory is this test run's history only
    test_history = not cb.write_on_fit and cb.online_writes
    if test_history and stage == "test":
        cb.memory.clear()
    populated = len(cb.memory) == 0 and not test_history  # then filled with current weights
    if populated:
        auto_populate(trainer, pl_module, cb.populate)
    cb._head.bind_named(pl_module, cb.memory.dim)
    if cb.refresh_keys == "on_test" and not populated:
        refresh(cb, pl_module, trainer)
    if len(cb.memory) == 0 and not cb.write_on_fit and not cb.online_writes:
        raise MisconfigurationException(
            f"MbPA(write_on_fit=False, online_writes=False): the memory is empty at the start "
            f"of {stage} and nothing can fill it. Call `MbPA.populate(model, dataloader)` "
            "first (or give the datamodule a train_dataloader), or set online_writes=True "
            "(memory from the test history) or write_on_fit=True."
        )
    if len(cb.memory) == 0 and not (test_history and stage == "test"):
        rank_zero_warn(
            f"MbPA: the episodic memory is empty, so {stage} uses the model's base "
            "predictions until something is written. Fit with the callback attached, restore "
            "a checkpoint that holds the memory, or call `MbPA.populate(model, dataloader)`.",
            category=UserWarning,
        )
    settings = AdaptSettings(
        k=cb.k,
        steps=cb.adaptation_steps,
        lr=cb.adaptation_lr,
        beta=cb.beta,
        kernel_eps=cb.kernel_eps,
        adaptation_loss=cb.adaptation_loss,
        base_weight=cb.base_weight,
        memory_weight=cb.memory_weight,
        memory_temperature=cb.memory_temperature,
        output_cache_bytes=cb.output_cache_bytes,
    )
    cb._adapter.start(stage, settings, lambda: cb.memory)
    if cb._head.module is None and cb.online_writes and stage == "test":
        cb._writer.install(pl_module)  # nothing was ever written: find the head


def auto_populate(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    populate: Callable[[nn.Module, Iterable[Any]], int],
) -> None:
    """Fill an empty memory from the datamodule's ``train_dataloader()``, if it has one."""
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if datamodule is None or not is_overridden("train_dataloader", datamodule):
        return
    try:
        loader = datamodule.train_dataloader()
    except Exception:  # the datamodule may only set up its train split for stage="fit"
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    rank_zero_info(
        "MbPA: the memory is empty; populating it from the datamodule's train_dataloader() "
        "with the model's current weights."
    )
    populate(pl_module, loader)


def populate(cb: MbPA, model: nn.Module, dataloader: Iterable[Any]) -> int:
    """:meth:`~lightning_mbpa.MbPA.populate`'s loop (under ``torch.no_grad``)."""
    was_training = model.training
    model.eval()
    before = cb.memory.num_seen
    writer = cb._writer
    writer.install(model)
    device = module_device(model)
    try:
        for batch in dataloader:
            if isinstance(model, pl.LightningModule):
                batch = model.transfer_batch_to_device(batch, device, 0)
            else:
                batch = move_data_to_device(batch, device)
            cb.extract_labels(batch)  # a wrong `label_key` fails before the model runs
            writer.start_batch()
            model(cb.extract_inputs(batch))
            writer.capturing = False
            writer.finish_discovery(model)
            write_batch(cb, batch, "batch of the populate() dataloader", strategy=None)
    finally:
        writer.end_batch()
        writer.remove()
        model.train(was_training)
    return cb.memory.num_seen - before


@contextlib.contextmanager
def hooks_paused(cb: MbPA) -> Iterator[None]:
    """No writes and no adaptation while the callback runs the model on stored inputs."""
    with cb._writer.paused(), cb._adapter.paused():
        yield


def refresh(cb: MbPA, model: nn.Module, trainer: pl.Trainer | None) -> int:
    """:meth:`~lightning_mbpa.MbPA.refresh`, also run by ``refresh_keys`` (with the trainer)."""
    memory = cb.memory
    if len(memory) == 0:
        return 0
    option = ("refresh_keys", cb.refresh_keys)
    cb._drift.stored_inputs(memory, *option)  # its error before the head's
    cb._head.bind_named(model, memory.dim)
    with hooks_paused(cb):
        n = cb._drift.refresh(
            memory,
            model,
            cb.embed,
            batch_size=cb.refresh_batch_size,
            option=option,
            strategy=cb._strategy,
            trainer=trainer,
        )
    cb._adapter.invalidate()
    return n


def end_train_epoch(cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """``on_train_epoch_end``: refresh the keys with ``refresh_keys="epoch_end"``, and log how
    long that took."""
    if cb.refresh_keys == "epoch_end" and len(cb.memory) > 0:
        refresh(cb, pl_module, trainer)
        pl_module.log("mbpa/refresh_s", float(cb._drift.last_refresh_seconds or 0.0))


def replay(
    cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> None:
    """Sparse experience replay before every ``replay_every_n_steps``-th optimizer step."""
    every = cb.replay_every_n_steps
    if every is not None and trainer.training and (trainer.global_step + 1) % every == 0:
        with hooks_paused(cb):
            cb._drift.replay(
                cb.memory,
                trainer,
                pl_module,
                optimizer,
                cb.embed,
                batch_size=cb.replay_batch_size,
                sampling=cb.replay_sampling,
                option=("replay_every_n_steps", every),
                strategy=cb._strategy,
            )


def abandon(cb: MbPA) -> None:
    """After an exception: remove the hooks (the batches that finished before it are in the
    memory already)."""
    cb._writer.remove()
    cb._writer.end_batch()
    cb._adapter.stop()


def start_eval_batch(
    cb: MbPA, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any
) -> None:
    """Before a validate/test/predict step: clear the last step's records, find the head on a
    first forward pass if nothing has bound it yet, and capture for ``online_writes``."""
    cb._adapter.calls.clear()
    cb._writer.captured.clear()
    if cb._adapter.stage is not None and cb._head.module is None and len(cb.memory):
        cb._writer.discover_with_forward(pl_module, cb.extract_inputs(batch))
        cb._adapter.attach()
    cb._writer.capturing = cb._writer.installed and trainer.testing and cb.online_writes
