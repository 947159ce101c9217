"""The MbPA callback: Memory-based Parameter Adaptation for any Lightning classifier.

Sprechmann et al., "Memory-based Parameter Adaptation", ICLR 2018 (arXiv:1802.10542).

The callback splits the user's model at its output head ``g_θ``: the head's input ``h = f(x)``
is the memory key. During ``fit`` a forward pre-hook on the head captures ``h`` for every
training example and the callback writes ``(h, y)`` into an :class:`~lightning_mbpa.EpisodicMemory`.
During ``test``/``predict`` a forward hook replaces the head's output with the output of a
copy of the head adapted, per query, on the query's K nearest memories
(:func:`~lightning_mbpa.local_adapt`), so the module's own ``test_step`` and its metrics see the
adapted predictions. The trained parameters are never modified.

Key drift (the keys of a network that keeps learning go stale): with ``store_inputs`` the memory
also keeps every example's model input, so ``refresh_keys`` can recompute the keys with the
current weights, and ``replay_every_n_steps`` can replay stored examples during training (sparse
experience replay, de Masson d'Autume et al., "Episodic Memory in Lifelong Language Learning",
NeurIPS 2019, arXiv:1906.01076, "MbPA++").
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from lightning_mbpa.adaptation import _eval_mode, kernel_weights, local_adapt
from lightning_mbpa.batches import (
    as_label_tensor,
    describe,
    find_label_name,
    get_item,
    join_inputs,
    slice_inputs,
    split_inputs,
)
from lightning_mbpa.memory import EXACT_INDEX, EpisodicMemory

Stage = Literal["validate", "test", "predict"]
_STAGES: tuple[str, ...] = ("validate", "test", "predict")
_REFRESH: tuple[str, ...] = ("never", "on_test", "epoch_end")
_IGNORE_INDEX = -100
# Training writes are staged in a buffer of about this size and written to the memory in bulk.
_WRITE_BUFFER_BYTES = 1 << 20
#: Memories at least this large say when their keys are being refreshed and how long it took.
_ANNOUNCE_REFRESH = 50_000


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name]


class MbPA(Callback):
    r"""Memory-based Parameter Adaptation (Sprechmann et al., 2018) as a Lightning callback.

    Attach it to a ``Trainer``: ``fit`` fills an episodic memory with the head inputs and labels
    of the training examples; ``test`` and ``predict`` classify every query with a copy of the
    head adapted for ``adaptation_steps`` gradient steps on its ``k`` nearest memories,
    ``θx ← θx − adaptation_lr·∇Σ_k w_k·CE(g_θx(h_k), y_k) − beta·(θx − θ)``, then thrown away.

    Args:
        head: Dotted name of the output head (``pl_module.get_submodule(head)``), e.g.
            ``"model.classifier"``. ``None``: the ``nn.Linear`` that runs last in the forward
            pass, found by execution order on the first batch.
        memory_size: Capacity of the episodic memory (number of examples).
        k: Number of nearest memories each query adapts on.
        adaptation_steps: Gradient steps of local adaptation per query (0 disables it).
        adaptation_lr: Step size ``α`` of local adaptation.
        beta: Pull toward the trained head per step, ``β`` in ``−β(θx − θ)``, in [0, 1]
            (the Gaussian prior of the paper's MAP view; 0 is plain weighted fine-tuning).
        kernel_eps: ``ε`` of the neighbour weights ``w_k ∝ 1 / (ε + ||q − h_k||²)``.
        label_key: Where training batches keep their labels: a mapping key or attribute name,
            or a position in a tuple. ``None``: a tuple's second element, or a key/attribute
            named ``y``, ``label``, ``labels``, ``target`` or ``targets``.
        eviction: What a full memory overwrites: ``"fifo"`` the oldest entry (the paper),
            ``"reservoir"`` a uniform sample of everything seen.
        index: A faiss ``index_factory`` string: ``"Flat"`` (exact) or approximate indexes
            such as ``"HNSW32"`` or ``"IVF1024,Flat"`` for large memories.
        write_fraction: Fraction of training examples written to memory, chosen at random
            (MbPA++ stores 10–50% with little loss).
        adapt_on: Stages whose predictions are adapted (any of ``"validate"``, ``"test"``,
            ``"predict"``).
        online_writes: During ``test``, write each labelled batch to memory after predicting
            it (the paper's fast learning during evaluation).
        save_memory: Put the memory into checkpoints (``trainer.test(ckpt_path=...)`` then
            restores it).
        seed: Seed of the random choices (``write_fraction``, reservoir eviction, replay).
        store_inputs: Also keep each written example's model input (what :meth:`extract_inputs`
            returns: a tensor, or tuples/lists/dicts of tensors, sliced per example) on the CPU,
            at the same slot as its key. Needed by ``refresh_keys`` and replay. Costs the inputs'
            bytes per entry (3 KB for a 28x28 float image); needs one key per example.
        refresh_keys: When to recompute every stored key from its stored input with the current
            weights (:meth:`refresh`; one forward pass over the memory, in eval mode, no grad):
            ``"never"`` (the paper: keys as written), ``"on_test"`` (at the start of every stage
            that adapts: validate/test/predict) or ``"epoch_end"`` (after every training epoch,
            so the keys are fresh when ``fit`` ends and in its checkpoints). Needs
            ``store_inputs``.
        refresh_batch_size: Stored inputs per forward pass when refreshing keys.
        replay_every_n_steps: Sparse experience replay (MbPA++): every this many optimizer
            steps, ``replay_batch_size`` stored examples drawn uniformly from the memory add the
            gradient of their loss (cross-entropy of the head's logits against the stored labels;
            binary cross-entropy for a one-logit head) to the step's gradients, after the
            training step's backward and before the optimizer steps (and gradient clipping).
            ``None`` disables it. Needs ``store_inputs`` and automatic optimization. The replay
            forward runs in train mode but leaves normalisation running statistics unchanged and
            writes nothing to the memory.
        replay_batch_size: Stored examples per replay step (MbPA++ replays about 1% of the
            examples seen: ``replay_batch_size / (replay_every_n_steps * batch size)``).

    Training writes are staged in a small buffer and reach the memory in bulk; reading
    ``mbpa.memory`` (and every epoch end, checkpoint and stage start) writes what is staged, so
    whoever looks sees every finished batch.

    Example::

        trainer = pl.Trainer(callbacks=[MbPA(k=32)])
        trainer.fit(model, datamodule=dm)   # writes the memory
        trainer.test(model, datamodule=dm)  # test_step sees MbPA-adapted logits
    """

    def __init__(
        self,
        head: str | None = None,
        memory_size: int = 100_000,
        k: int = 32,
        adaptation_steps: int = 5,
        adaptation_lr: float = 0.1,
        beta: float = 0.01,
        kernel_eps: float = 1e-3,
        label_key: str | int | None = None,
        eviction: Literal["fifo", "reservoir"] = "fifo",
        index: str = "Flat",
        write_fraction: float = 1.0,
        adapt_on: Sequence[Literal["validate", "test", "predict"]] = ("test", "predict"),
        online_writes: bool = False,
        save_memory: bool = True,
        seed: int = 0,
        store_inputs: bool = False,
        refresh_keys: Literal["never", "on_test", "epoch_end"] = "never",
        refresh_batch_size: int = 1024,
        replay_every_n_steps: int | None = None,
        replay_batch_size: int = 64,
    ) -> None:
        super().__init__()
        _check(
            head is None or (isinstance(head, str) and head != ""),
            "head",
            head,
            "a non-empty dotted module name or None",
        )
        _check(_is_int(memory_size) and memory_size >= 1, "memory_size", memory_size, "an int >= 1")
        _check(_is_int(k) and k >= 1, "k", k, "an int >= 1")
        _check(
            _is_int(adaptation_steps) and adaptation_steps >= 0,
            "adaptation_steps",
            adaptation_steps,
            "an int >= 0",
        )
        _check(
            _is_real(adaptation_lr) and adaptation_lr >= 0,
            "adaptation_lr",
            adaptation_lr,
            "a finite float >= 0",
        )
        _check(_is_real(beta) and 0 <= beta <= 1, "beta", beta, "a float in [0, 1]")
        _check(
            _is_real(kernel_eps) and kernel_eps > 0, "kernel_eps", kernel_eps, "a finite float > 0"
        )
        _check(
            label_key is None
            or (isinstance(label_key, (str, int)) and not isinstance(label_key, bool)),
            "label_key",
            label_key,
            "a str, an int or None",
        )
        _check(eviction in ("fifo", "reservoir"), "eviction", eviction, "'fifo' or 'reservoir'")
        _check(
            isinstance(index, str) and index.strip() != "",
            "index",
            index,
            "a faiss index_factory string such as 'Flat' or 'HNSW32'",
        )
        _check(
            _is_real(write_fraction) and 0 < write_fraction <= 1,
            "write_fraction",
            write_fraction,
            "a float in (0, 1]",
        )
        if isinstance(adapt_on, str):
            adapt_on = (adapt_on,)
        _check(
            isinstance(adapt_on, Iterable)
            and len(adapt_on := list(adapt_on)) > 0
            and all(stage in _STAGES for stage in adapt_on),
            "adapt_on",
            adapt_on,
            f"a non-empty list of stages from {list(_STAGES)} (without adaptation the callback "
            "only fills a memory that nothing reads)",
        )
        _check(isinstance(online_writes, bool), "online_writes", online_writes, "a bool")
        _check(isinstance(save_memory, bool), "save_memory", save_memory, "a bool")
        _check(_is_int(seed), "seed", seed, "an int")
        _check(isinstance(store_inputs, bool), "store_inputs", store_inputs, "a bool")
        _check(refresh_keys in _REFRESH, "refresh_keys", refresh_keys, f"one of {list(_REFRESH)}")
        _check(
            _is_int(refresh_batch_size) and refresh_batch_size >= 1,
            "refresh_batch_size",
            refresh_batch_size,
            "an int >= 1",
        )
        _check(
            replay_every_n_steps is None
            or (_is_int(replay_every_n_steps) and replay_every_n_steps >= 1),
            "replay_every_n_steps",
            replay_every_n_steps,
            "an int >= 1 or None (no replay)",
        )
        _check(
            _is_int(replay_batch_size) and replay_batch_size >= 1,
            "replay_batch_size",
            replay_batch_size,
            "an int >= 1",
        )
        for name, value, off in (
            ("refresh_keys", refresh_keys, "'never'"),
            ("replay_every_n_steps", replay_every_n_steps, "None"),
        ):
            if value not in ("never", None) and not store_inputs:
                raise MisconfigurationException(
                    f"MbPA(`{name}`={value!r}) needs `store_inputs`=True: it recomputes keys "
                    f"from the stored model inputs. Set store_inputs=True or {name}={off}."
                )

        self.head = head
        self.memory_size = int(memory_size)
        self.k = int(k)
        self.adaptation_steps = int(adaptation_steps)
        self.adaptation_lr = float(adaptation_lr)
        self.beta = float(beta)
        self.kernel_eps = float(kernel_eps)
        self.label_key = label_key
        self.eviction = eviction
        self.index = index
        self.write_fraction = float(write_fraction)
        self.adapt_on = tuple(dict.fromkeys(adapt_on))
        self.online_writes = online_writes
        self.save_memory = save_memory
        self.seed = int(seed)
        self.store_inputs = store_inputs
        self.refresh_keys = refresh_keys
        self.refresh_batch_size = int(refresh_batch_size)
        self.replay_every_n_steps = (
            None if replay_every_n_steps is None else int(replay_every_n_steps)
        )
        self.replay_batch_size = int(replay_batch_size)
        self._inputs_structure: str | None = None  # how stored input leaves join into inputs

        try:
            self.memory = EpisodicMemory(
                capacity=self.memory_size, eviction=eviction, index=index, seed=self.seed
            )
        except ValueError as err:
            raise MisconfigurationException(f"MbPA: {err}") from err
        self._write_generator = torch.Generator().manual_seed(self.seed)
        self._replay_generator = torch.Generator().manual_seed(self.seed + 1)
        #: Seconds spent recomputing stored keys so far (every refresh of this callback).
        self.refresh_seconds = 0.0
        self._init_runtime_state()

    # ------------------------------------------------------------------ runtime state
    def _init_runtime_state(self) -> None:
        self._module_ref: weakref.ReferenceType[nn.Module] | None = None
        self._strategy: Any = None  # set when training on several processes
        self._head_module: nn.Module | None = None
        self._head_name: str | None = getattr(self, "_head_name", None) or self.head
        self._capture_handles: list[RemovableHandle] = []
        self._adapt_handle: RemovableHandle | None = None
        self._discovering = False
        self._capturing = False
        self._captured: list[tuple[nn.Module, Tensor]] = []
        self._adapted_calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self._head_called_in_stage = False
        self._adapting_stage: str | None = None
        self._slot_outputs: Tensor | None = None
        self._slot_row: Tensor | None = None  # CPU: row of each slot in _slot_outputs, or -1
        self._slot_rows_used = 0
        self._slot_version = -1  # the memory's version the cache was made for
        self._base_acc: torchmetrics.Metric | None = None
        self._adapted_acc: torchmetrics.Metric | None = None
        self._metric_classes = 0  # outputs of the head the metrics were made for
        self._queries = 0
        self._adapt_seconds = 0.0
        self._classes_seen: int | None = None  # outputs of the head, once it ran adapted
        self._index_checked_dim: int | None = None  # key width the index was checked to take
        self._labels_checked: int | None = None  # memory labels verified for this many classes
        self._refused_batches = 0
        self._refused_rows = 0
        self._warnings = WarningCache()
        self._replay_slots: Tensor | None = None  # the slots the last replay step used
        self._last_refresh_seconds: float | None = None
        # Write buffer: rows staged by `_add`, written to the memory in bulk by `_flush_writes`.
        self._pending_keys: Tensor | None = None
        self._pending_values: Tensor | None = None
        self._pending_rows = 0
        self._pending_sizes: list[int] = []  # rows of each staged `_add` call

    @property
    def memory(self) -> EpisodicMemory:
        """The episodic memory, with every write made so far in it.

        Training writes are staged and reach the memory in bulk (one ``add`` per few thousand
        rows instead of one per batch); reading this attribute writes what is staged first, and
        so do epoch ends, checkpoints and the start of validate/test/predict.
        """
        self._flush_writes()
        return self._memory

    @memory.setter
    def memory(self, memory: EpisodicMemory) -> None:
        if getattr(self, "_pending_sizes", None):
            self._flush_writes()
        self._memory = memory

    def __getstate__(self) -> dict[str, Any]:
        self._flush_writes()
        state = self.__dict__.copy()
        for transient in (
            "_memory",
            "_pending_keys",
            "_pending_values",
            "_pending_rows",
            "_pending_sizes",
            "_module_ref",
            "_strategy",
            "_head_module",
            "_capture_handles",
            "_adapt_handle",
            "_captured",
            "_adapted_calls",
            "_slot_outputs",
            "_slot_row",
            "_base_acc",
            "_adapted_acc",
            "_warnings",
        ):
            state.pop(transient, None)
        # bytes, not tensors: torch's multiprocessing pickler (ddp_spawn) would share tensors
        # through file descriptors, which fails for empty ones
        buffer = io.BytesIO()
        torch.save(
            {
                "memory": self.memory.state_dict(),
                "write_generator": self._write_generator.get_state(),
                "replay_generator": self._replay_generator.get_state(),
            },
            buffer,
        )
        state["memory"] = buffer.getvalue()
        state["_write_generator"] = None
        state["_replay_generator"] = None
        state.pop("_replay_slots", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = torch.load(io.BytesIO(state.pop("memory")), weights_only=True)
        self.__dict__.update(state)
        self._init_runtime_state()
        self.memory = EpisodicMemory(
            capacity=self.memory_size, eviction=self.eviction, index=self.index, seed=self.seed
        )
        self.memory.load_state_dict(saved["memory"])
        self._write_generator = torch.Generator()
        self._write_generator.set_state(saved["write_generator"])
        self._replay_generator = torch.Generator()
        self._replay_generator.set_state(saved["replay_generator"])

    @property
    def state_key(self) -> str:
        """Checkpoint key: depends only on ``head``, so changing the adaptation settings between
        fit and test still restores the memory."""
        # Lightning reads it for every hook call of every callback: build the string once per head.
        cached = self.__dict__.get("_state_key_for")
        if cached is None or cached[0] != self.head:
            cached = self._state_key_for = (self.head, self._generate_state_key(head=self.head))
        return cached[1]

    @property
    def head_name(self) -> str | None:
        """The dotted name of the head module, once known (given, or found on the first batch)."""
        return self._head_name

    # ------------------------------------------------------------------ extension points
    def extract_labels(self, batch: Any) -> Tensor | None:
        """The integer class labels of a batch, or ``None`` if it has none.

        Override in a subclass for batches the defaults do not cover; the subclass stays
        selectable from YAML by ``class_path``.
        """
        name = find_label_name(batch, self.label_key)
        if name is None:
            return None
        try:
            labels = get_item(batch, name)
        except KeyError:
            if self.label_key is not None:
                raise MisconfigurationException(
                    f"MbPA(label_key={self.label_key!r}): the batch has no such item; it contains "
                    f"{describe(batch)}."
                ) from None
            return None
        if labels is None:
            return None
        try:
            return as_label_tensor(labels)
        except ValueError as err:
            raise ValueError(
                f"MbPA: the batch's labels under {name!r} are unusable: {err} MbPA needs one "
                "integer class index per example: point `label_key=...` at the class labels, or "
                "override `MbPA.extract_labels` to return them."
            ) from err

    def extract_inputs(self, batch: Any) -> Any:
        """What the module's ``forward`` takes from a batch (used by :meth:`populate`).

        Default: a tuple's first element, a mapping without its label key, a tensor itself.
        """
        return slice_inputs(batch, find_label_name(batch, self.label_key))

    def embed(self, pl_module: nn.Module, inputs: Any) -> Tensor:
        """Memory keys ``[N, D]`` of ``N`` model inputs with the module's current weights.

        Default: run the module's forward on ``inputs`` and capture the head's input. Used to
        refresh stored keys (``refresh_keys``, under ``torch.no_grad``) and by replay (which
        differentiates through it, so an override must keep the autograd graph). Override in a
        subclass when the forward pass does more than the embedding needs.
        """
        head = self._require_head()
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                captured.append(args[0])

        handle = head.register_forward_pre_hook(capture)
        try:
            pl_module(inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise MisconfigurationException(
                f"MbPA.embed: the head {self._head_name!r} ran {len(captured)} times in one "
                "forward pass over stored inputs; keys need exactly one head call. Override "
                "`MbPA.embed` to say which input is the key."
            )
        return captured[0]

    # ------------------------------------------------------------------ head resolution
    def _resolve_named_head(self, pl_module: nn.Module, name: str) -> nn.Module:
        try:
            module = pl_module.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or module is pl_module:
            raise MisconfigurationException(
                f"MbPA(head={name!r}): {type(pl_module).__name__} has no submodule {name!r}. "
                f"Its nn.Linear modules are: {_linear_names(pl_module)}."
            )
        return module

    def _set_head(self, pl_module: nn.Module, name: str) -> None:
        self._head_module = self._resolve_named_head(pl_module, name)
        self._head_name = name
        self._check_memory_width(self.memory.dim)

    def _head_in_features(self, head: nn.Module | None = None) -> int | None:
        head = self._head_module if head is None else head
        if isinstance(head, nn.Linear):
            return head.in_features
        return None

    def _head_out_features(self, head: nn.Module | None = None) -> int | None:
        head = self._head_module if head is None else head
        if isinstance(head, nn.Linear):
            return head.out_features
        return None

    def _check_memory_width(
        self, dim: int | None, head: nn.Module | None = None, name: str | None = None
    ) -> None:
        width = self._head_in_features(head)
        if dim is not None and width is not None and dim != width:
            raise MisconfigurationException(
                f"MbPA: the memory holds keys of width {dim} but the head "
                f"{name or self._head_name!r} takes inputs of width {width}. The memory (e.g. "
                "from a checkpoint) was written by a different model; use a fresh MbPA callback "
                "(`mbpa.memory.clear()` keeps the key width) or fix `head`."
            )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, MbPA) and cb is not self]
        if others:
            raise MisconfigurationException(
                "MbPA: only one MbPA callback per Trainer is supported (found "
                f"{len(others) + 1}); they would adapt the same head twice. Keep one."
            )
        self._module_ref = weakref.ref(pl_module)
        self._strategy = trainer.strategy if trainer.world_size > 1 else None
        self._classes_seen = None
        if self._head_name is not None:
            self._set_head(pl_module, self._head_name)
        elif not _linear_names(pl_module):
            raise MisconfigurationException(
                f"MbPA(head=None): {type(pl_module).__name__} has no nn.Linear module to use as "
                "the head. Name the output head with `head=...`."
            )
        if self.replay_every_n_steps is not None and stage == "fit":
            self._check_replay_setup(trainer, pl_module)
        if self.save_memory and stage == "fit":
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.save_weights_only:
                    rank_zero_warn(
                        "MbPA(save_memory=True): a ModelCheckpoint with save_weights_only=True "
                        "drops callback state, so its checkpoints will not hold the episodic "
                        "memory. Use save_weights_only=False to keep it.",
                        category=UserWarning,
                    )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_capture_hooks()
        self._remove_adapt_hook()
        self._flush_writes()
        self._pending_keys = self._pending_values = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_capture_hooks()
        self._captured.clear()
        self._stop_adapting()
        # The batches that finished before the exception are in the memory, as without the
        # write buffer; a failing write must not hide the original exception.
        try:
            self._flush_writes()
        except ValueError as err:
            rank_zero_warn(f"MbPA: staged writes could not be written after an exception: {err}")

    # ---- fit: writing
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move_memory(pl_module)
        self._install_capture_hooks(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_capture_hooks()
        self._flush_writes()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        every = self.replay_every_n_steps
        if every is not None and trainer.training and (trainer.global_step + 1) % every == 0:
            self._replay(trainer, pl_module, optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_writes()
        if self.refresh_keys == "epoch_end" and len(self.memory) > 0:
            self._refresh(pl_module, trainer)
            pl_module.log("mbpa/refresh_s", float(self._last_refresh_seconds or 0.0))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._captured.clear()
        self._capturing = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._capturing = False
        try:
            self._finish_discovery(pl_module)
            self._write_batch(batch, where="training batch")
        finally:
            self._captured.clear()

    # ---- validate/test/predict: adapting
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validate" in self.adapt_on and not trainer.sanity_checking:
            self._start_adapting(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_adapting()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.adapt_on:
            self._start_adapting(trainer, pl_module, "test")
        elif self.online_writes:
            self._install_capture_hooks(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_adapting()
        self._remove_capture_hooks()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.adapt_on:
            self._start_adapting(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_adapting()

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._adapted_calls.clear()
        self._captured.clear()
        if self._adapting_stage is not None and self._head_module is None and len(self.memory) > 0:
            self._discover_head_with_forward(pl_module, batch)
        self._capturing = bool(self._capture_handles) and trainer.testing and self.online_writes

    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._adapting_stage == "validate":
            self._check_head_was_called("validate")
            self._update_metrics(batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._adapting_stage == "validate":
            self._log_epoch(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._adapting_stage == "test":
            self._log_epoch(pl_module)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._capturing = False
        try:
            self._check_head_was_called("test")
            labels = self._update_metrics(batch) if self._adapting_stage == "test" else None
            if self.online_writes:
                self._online_write(pl_module, batch, labels)
        finally:
            self._adapted_calls.clear()
            self._captured.clear()

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._check_head_was_called("predict")
        self._adapted_calls.clear()

    def _check_head_was_called(self, stage: str) -> None:
        """A head never called in the stage's batches so far is a misconfiguration; a step that
        skips the head for one batch after it ran for others is the user's business."""
        if (
            self._adapting_stage == stage
            and self._adapt_handle is not None
            and not self._head_called_in_stage
        ):
            raise MisconfigurationException(
                f"MbPA: the head {self._head_name!r} was not called while processing the "
                f"{stage} batch, so its predictions cannot be adapted. Name the module your "
                "forward pass ends with via `head=...`."
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if not self.save_memory:
            return {}
        return {
            "memory": self.memory.state_dict(),
            "head": self._head_name,
            "write_generator": self._write_generator.get_state(),
            "replay_generator": self._replay_generator.get_state(),
            "inputs_structure": self._inputs_structure,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the memory; everything is checked before anything changes, so a refused
        checkpoint leaves the callback and its memory exactly as they were."""
        if not self.save_memory or not state_dict:
            return
        saved_head = state_dict.get("head")
        if saved_head is not None and not (isinstance(saved_head, str) and saved_head):
            raise MisconfigurationException(
                f"MbPA: the checkpoint's MbPA 'head' entry is {saved_head!r}, not a module name; "
                "the checkpoint is corrupted or was written by another callback."
            )
        if self.head is not None and saved_head is not None and saved_head != self.head:
            raise MisconfigurationException(
                f"MbPA(head={self.head!r}): the checkpoint's memory was written from head "
                f"{saved_head!r}. Use head={saved_head!r} or clear the memory."
            )
        memory_state = state_dict.get("memory")
        if not isinstance(memory_state, dict):
            raise MisconfigurationException(
                "MbPA: the checkpoint's MbPA state has no 'memory' entry; it is truncated or "
                "was written by another callback."
            )
        write_generator = _saved_generator(state_dict, "write_generator")
        replay_generator = _saved_generator(state_dict, "replay_generator")
        module = self._module_ref() if self._module_ref is not None else None
        head, head_name = self._head_module, self._head_name
        if saved_head is not None and (head is None or saved_head != head_name):
            head_name = saved_head  # the memory's keys are this module's inputs
            head = None
            if module is not None:
                try:
                    head = self._resolve_named_head(module, saved_head)
                except MisconfigurationException as err:
                    raise MisconfigurationException(
                        f"MbPA: the checkpoint's memory was written from head {saved_head!r}, "
                        f"which this model lacks. {err}"
                    ) from err
        keys, values = memory_state.get("keys"), memory_state.get("values")
        if isinstance(keys, Tensor) and keys.dim() == 2 and keys.shape[0] > 0:
            self._check_memory_width(keys.shape[1], head, head_name)
        problem = (
            _labels_outside(values, self._head_out_features(head))
            if isinstance(values, Tensor) and not values.is_floating_point()
            else None
        )
        if problem is not None:
            raise MisconfigurationException(
                f"MbPA: the checkpoint's memory holds labels {problem[1]}, but the head "
                f"{head_name!r} needs {problem[0]}; it was written by another model or is "
                "corrupted. Use a fresh MbPA callback with `save_memory=False` to ignore it."
            )
        capacity = memory_state.get("capacity")
        if isinstance(capacity, Tensor) and capacity.numel() == 1 and capacity != self.memory_size:
            raise MisconfigurationException(
                f"MbPA(memory_size={self.memory_size}): the checkpoint's memory has capacity "
                f"{int(capacity.item())}; use memory_size={int(capacity.item())} to restore it, "
                "or save_memory=False to ignore it."
            )
        memory_state = self._check_stored_inputs_state(memory_state, state_dict)
        try:
            self.memory.load_state_dict(memory_state)  # validates everything before mutating
        except ValueError as err:
            raise MisconfigurationException(
                f"MbPA: cannot restore the memory from the checkpoint: {err}"
            ) from err
        self._head_module, self._head_name = head, head_name
        if write_generator is not None:
            self._write_generator = write_generator
        self._slot_outputs = None
        self._labels_checked = None
        if replay_generator is not None:
            self._replay_generator = replay_generator
        self._inputs_structure = state_dict.get("inputs_structure") if self.store_inputs else None

    # ------------------------------------------------------------------ populate
    @torch.no_grad()
    def populate(self, model: nn.Module, dataloader: Iterable[Any]) -> int:
        """Fill the memory from ``dataloader`` with the model's current weights.

        This is how MbPA is added to a classifier trained without it. The model runs in eval
        mode on its own device; its weights are not changed.

        Returns:
            The number of examples offered to the memory.
        """
        was_training = model.training
        model.eval()
        before = self.memory.num_seen
        self._install_capture_hooks(model)
        device = _module_device(model)
        try:
            for batch in dataloader:
                if isinstance(model, pl.LightningModule):
                    batch = model.transfer_batch_to_device(batch, device, 0)
                else:
                    batch = move_data_to_device(batch, device)
                self._captured.clear()
                self._capturing = True
                model(self.extract_inputs(batch))
                self._capturing = False
                self._finish_discovery(model)
                self._write_batch(batch, where="batch of the populate() dataloader", gather=False)
        finally:
            self._capturing = False
            self._captured.clear()
            self._remove_capture_hooks()
            model.train(was_training)
        return self.memory.num_seen - before

    # ------------------------------------------------------------------ key drift
    @torch.no_grad()
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

    def _require_head(self) -> nn.Module:
        if self._head_module is None:
            raise MisconfigurationException(
                "MbPA: the head is not known yet (no batch has been written by this callback); "
                "name it with `head=...`."
            )
        return self._head_module

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

    # ------------------------------------------------------------------ internals: capture
    def _install_capture_hooks(self, module: nn.Module) -> None:
        if self._capture_handles:
            return
        if self._head_module is None and self._head_name is not None:
            self._set_head(module, self._head_name)
        if self._head_module is not None:
            candidates = [self._head_module]
            self._discovering = False
        else:
            candidates = [
                sub for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name
            ]
            self._discovering = True
        for candidate in candidates:
            self._capture_handles.append(candidate.register_forward_pre_hook(self._capture_hook))

    def _remove_capture_hooks(self) -> None:
        for handle in self._capture_handles:
            handle.remove()
        self._capture_handles.clear()
        self._capturing = False

    @torch.compiler.disable
    def _capture_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._capturing and args and isinstance(args[0], Tensor):
            self._captured.append((module, args[0].detach()))

    def _finish_discovery(self, pl_module: nn.Module) -> None:
        """After the first captured batch, the last Linear that ran is the head."""
        if not self._discovering or not self._captured:
            return
        head = self._captured[-1][0]
        name = next(name for name, sub in pl_module.named_modules() if sub is head)
        self._head_module, self._head_name = head, name
        self._captured = [(m, x) for m, x in self._captured if m is head]
        self._remove_capture_hooks()
        self._install_capture_hooks(pl_module)
        self._check_memory_width(self.memory.dim)
        rank_zero_info(
            f"MbPA: using `{name}` (the last nn.Linear in the forward pass) as the head."
        )

    def _discover_head_with_forward(self, pl_module: nn.Module, batch: Any) -> None:
        """A memory exists (e.g. loaded by hand) but the head was never seen: one dry forward."""
        self._install_capture_hooks(pl_module)
        self._capturing = True
        try:
            with torch.no_grad():
                pl_module(self.extract_inputs(batch))
            self._finish_discovery(pl_module)
        finally:
            self._capturing = False
            self._captured.clear()
            self._remove_capture_hooks()
        if self._head_module is None:
            raise MisconfigurationException(
                "MbPA(head=None): no nn.Linear ran in the forward pass, so the head cannot be "
                "found. Name it with `head=...`."
            )
        self._check_memory_width(self.memory.dim)
        self._adapt_handle = self._head_module.register_forward_hook(self._adapt_hook)

    def _write_batch(self, batch: Any, where: str, gather: bool = True) -> None:
        if not self._captured and self._head_name is None:
            raise MisconfigurationException(
                f"MbPA(head=None): no nn.Linear ran while processing the {where}, so the head "
                "cannot be found. Name the module your forward pass ends with via `head=...`."
            )
        if not self._captured:
            raise MisconfigurationException(
                f"MbPA: the head {self._head_name!r} was not called while processing the {where}, so "
                "there is nothing to write to memory. Name the module your forward pass ends "
                "with via `head=...`."
            )
        labels = self.extract_labels(batch)
        if labels is None:
            raise MisconfigurationException(
                f"MbPA: cannot find labels in the {where}: it contains {describe(batch)}. "
                f"Labels are looked for as a tuple's second element or under the keys/attributes "
                f"y, label, labels, target, targets. Set `label_key=...` or override "
                f"`MbPA.extract_labels`."
            )
        pairs = self._pairs([inputs for _, inputs in self._captured], labels)
        if not pairs:
            shapes = [tuple(x.shape) for _, x in self._captured]
            raise MisconfigurationException(
                f"MbPA: the labels of the {where} (shape {tuple(labels.shape)}) do not match the "
                f"inputs of the head {self._head_name!r} (shapes {shapes}): need one label per "
                f"head input row ([B, D] with [B] labels, or [B, T, D] with [B, T]). The batch "
                f"contains {describe(batch)}."
            )
        calls = len(self._captured)
        payload = self._stored_inputs(batch, self._captured[0][1], labels, calls, where)
        self._write_pairs(pairs, where, gather, payload)

    def _pairs(self, inputs: list[Tensor], labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The ``(keys, labels)`` of every head input that matches the labels.

        A head called several times per step writes every call whose input matches the labels;
        calls that do not match (a head reused on other data) are skipped with a warning, once.
        """
        pairs = [self._pair(batch_inputs, labels) for batch_inputs in inputs]
        kept = [(keys, values) for keys, values in pairs if keys is not None]
        if kept and len(kept) < len(pairs):
            shapes = [tuple(x.shape) for x in inputs]
            self._warnings.warn(
                f"MbPA: the head {self._head_name!r} ran {len(pairs)} times in one step with "
                f"inputs of shapes {shapes}; only the {len(kept)} call(s) whose rows match the "
                f"labels (shape {tuple(labels.shape)}) are written to memory. If that is not "
                "what you want, name the module whose inputs match the labels with `head=...`.",
                category=UserWarning,
            )
        return kept

    def _write_pairs(
        self,
        pairs: list[tuple[Tensor, Tensor]],
        where: str,
        gather: bool,
        payload: dict[str, Tensor] | None = None,
    ) -> None:
        """Write one batch's ``(keys, labels)`` (and, with ``store_inputs``, the one pair's
        model inputs), or nothing of it: every check runs first.

        Under DDP the checks run on the gathered batch, so every rank refuses the same batches
        and the collectives stay matched.
        """
        if gather and self._strategy is not None:
            if payload is None:
                pairs = [self._gather(keys.float(), values) for keys, values in pairs]
            else:  # store_inputs: exactly one pair, gathered with its inputs
                ((keys, values),) = pairs
                keys, values, *rows = self._gather(keys.float(), values, *payload.values())
                pairs, payload = [(keys, values)], dict(zip(payload, rows, strict=True))
        self._check_pairs(pairs, where)
        if not all(_keys_finite(keys) for keys, _ in pairs):
            bad = [~_finite_rows(keys) for keys, _ in pairs]
            count = sum(int(rows.sum()) for rows in bad)
            total = sum(keys.shape[0] for keys, _ in pairs)
            self._refused_batches += 1
            self._refused_rows += count
            self._warnings.warn(
                f"MbPA: refused a {where}: {count} of its {total} head inputs hold NaN or "
                f"infinite values, so nothing of it was written to memory ({self._refused_batches} "
                f"batches, {self._refused_rows} rows refused so far). Non-finite embeddings "
                "usually mean training diverged: lower the learning rate or clip gradients.",
                category=UserWarning,
            )
            return
        for keys, values in pairs:
            self._add(keys, values, gather=False, payload=payload)

    def _check_pairs(self, pairs: list[tuple[Tensor, Tensor]], where: str) -> None:
        """Refuse keys whose width differs from the memory's and labels the head cannot predict."""
        # `_memory`, not `memory`: reading the latter would write the staged rows every batch
        if len(self._memory) > 0:
            dim = self._memory.dim
        else:  # the staged rows (if any) fix the width until they are written
            dim = self._pending_keys.shape[1] if self._pending_rows else None
        if (
            dim is None
            and pairs
            and self._memory.dim is None
            and self._index_checked_dim != pairs[0][0].shape[1]
        ):
            # the first key fixes the width: an index that cannot take it fails now, not at the
            # first bulk write of the staged rows (an epoch later)
            width = pairs[0][0].shape[1]
            try:
                self._memory.check_dim(width)
            except ValueError as err:
                raise MisconfigurationException(
                    f"MbPA(index={self.index!r}) cannot index the keys of the head "
                    f"{self._head_name!r}, which are {width} wide: {err} Choose an index for "
                    "that width (for 'PQm' and 'IVFn,PQm', m must divide it) or 'Flat'."
                ) from err
            self._index_checked_dim = width
        for keys, values in pairs:
            dim = keys.shape[1] if dim is None else dim
            if keys.shape[1] != dim:
                raise MisconfigurationException(
                    f"MbPA: the head {self._head_name!r} was called with inputs of width "
                    f"{keys.shape[1]} in the {where}, but the memory holds keys of width {dim}. "
                    "MbPA needs a head with a fixed input width: name such a module with "
                    "`head=...`."
                )
            problem = _labels_outside(values, self._head_out_features() or self._classes_seen)
            if problem is not None:
                raise ValueError(
                    f"MbPA: the labels of the {where} must be {problem[0]} for the head "
                    f"{self._head_name!r}, or {_IGNORE_INDEX} to skip a row; got {problem[1]}. "
                    "Fix the labels, or name the module that outputs one logit per class with "
                    "`head=...`."
                )

    def _pair(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """Match a head input ``[*lead, D]`` with labels ``[*lead]``; drop ignore_index."""
        if inputs.dim() < 2 or tuple(inputs.shape[:-1]) != tuple(labels.shape):
            return None, labels
        keys = inputs.reshape(-1, inputs.shape[-1]) if inputs.dim() > 2 else inputs
        values = labels.reshape(-1).to(keys.device)
        if _small_cpu(values) and _IGNORE_INDEX not in values.tolist():
            return keys, values  # the common case, without tensor ops (run for every batch)
        keep = values != _IGNORE_INDEX
        if not bool(keep.all()):
            keys, values = keys[keep], values[keep]
        return keys, values

    def _add(
        self,
        keys: Tensor,
        values: Tensor,
        gather: bool = True,
        payload: dict[str, Tensor] | None = None,
    ) -> None:
        names = list(payload or {})
        if gather and self._strategy is not None:
            keys, values, *rows = self._gather(keys.float(), values, *(payload or {}).values())
            payload = dict(zip(names, rows, strict=True)) if payload is not None else None
        if self.write_fraction < 1.0 and keys.shape[0] > 0:
            # after the gather, so every rank makes the same choice from the same generator
            chosen = (
                torch.rand(keys.shape[0], generator=self._write_generator) < self.write_fraction
            )
            chosen = chosen.to(keys.device)
            keys, values = keys[chosen], values[chosen]
            if payload is not None:
                payload = {name: t[chosen.to(t.device)] for name, t in payload.items()}
        if keys.shape[0] == 0:
            return
        if payload is not None:  # stored inputs (store_inputs=True) are written unstaged
            self._flush_writes()
            self._memory.add(keys.float(), values, payload)
            return
        self._stage(keys, values)

    def _stage(self, keys: Tensor, values: Tensor) -> None:
        """Copy rows into the write buffer (about 1 MiB of float32 keys), which is written to the
        memory in bulk when full. The copy is made now, so nothing of the batch is held on to; a
        batch as large as the buffer is written directly."""
        n, dim = keys.shape
        if n * dim * 4 >= _WRITE_BUFFER_BYTES:
            self._flush_writes()
            self._write(keys, values, [n])
            return
        buffer = self._pending_keys
        if (
            buffer is None
            or buffer.shape[1] != dim
            or buffer.device != keys.device
            or self._pending_rows + n > buffer.shape[0]
        ):
            self._flush_writes()
            if buffer is None or buffer.shape[1] != dim or buffer.device != keys.device:
                rows = _WRITE_BUFFER_BYTES // (4 * dim)
                with torch.inference_mode(False):  # online writes happen under inference mode
                    self._pending_keys = keys.new_empty((rows, dim), dtype=torch.float32)
                    self._pending_values = values.new_empty((rows,), dtype=torch.int64)
        assert self._pending_keys is not None and self._pending_values is not None
        start = self._pending_rows
        if (
            keys.device.type == "cpu"
            and keys.dtype == torch.float32
            and values.device.type == "cpu"
        ):
            # numpy slice assignment: a few µs less per batch than two torch copies
            self._pending_keys.numpy()[start : start + n] = keys.numpy()
            self._pending_values.numpy()[start : start + n] = values.numpy()
        else:
            self._pending_keys[start : start + n].copy_(keys)
            self._pending_values[start : start + n].copy_(values)
        self._pending_rows += n
        self._pending_sizes.append(n)

    def _flush_writes(self) -> None:
        """Writes the staged rows to the memory."""
        rows, sizes = self._pending_rows, self._pending_sizes
        if not sizes:
            return
        self._pending_rows, self._pending_sizes = 0, []
        assert self._pending_keys is not None and self._pending_values is not None
        self._write(self._pending_keys[:rows], self._pending_values[:rows], sizes)

    def _write(self, keys: Tensor, values: Tensor, sizes: list[int]) -> None:
        """Writes rows staged by ``len(sizes)`` calls of ``_add`` (``sizes`` rows each).

        One ``add`` for all of them, which leaves the memory exactly as one ``add`` per call
        would (FIFO and reservoir slots follow the row order). An approximate index gets one
        ``add`` per call, since when it trains and compacts depends on those boundaries. If a
        write is refused, the calls before the refused one are written and its error is raised,
        as without the buffer.
        """
        memory = self._memory
        if len(sizes) > 1 and memory.index_string == EXACT_INDEX:
            try:
                memory.add(keys, values)
                return
            except ValueError:
                pass  # nothing was written: find the refused call below
        start = 0
        for n in sizes:
            memory.add(keys[start : start + n], values[start : start + n])
            start += n

    def _gather(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Rows of every rank (keys, labels, stored inputs), in rank order, so all ranks hold
        the same memory.

        Collectives run on every rank; batches of different sizes are padded to the largest.
        """
        strategy = self._strategy
        count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
        counts = strategy.all_gather(count).reshape(-1).tolist()
        largest = max(counts)
        gathered = []
        for tensor in tensors:
            padded = tensor.new_zeros((largest, *tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
            every = strategy.all_gather(padded)
            gathered.append(torch.cat([every[rank, :n] for rank, n in enumerate(counts)]))
        return tuple(gathered)

    def _online_write(self, pl_module: nn.Module, batch: Any, labels: Tensor | None) -> None:
        """Write a labelled test batch after it was predicted (fast learning during evaluation)."""
        if labels is None:
            labels = self.extract_labels(batch)
        if labels is None:
            return
        if self._discovering:
            self._finish_discovery(pl_module)
            if self._head_module is not None and self._adapt_handle is None:
                self._adapt_handle = self._head_module.register_forward_hook(self._adapt_hook)
        inputs = [q for q, _, _ in self._adapted_calls] or [x for _, x in self._captured]
        pairs = self._pairs(inputs, labels)
        if pairs:
            where = "test batch (online_writes)"
            payload = self._stored_inputs(batch, inputs[0], labels, len(inputs), where)
            self._write_pairs(pairs, where, gather=True, payload=payload)

    def _move_memory(self, pl_module: nn.Module) -> None:
        device = pl_module.device if isinstance(pl_module, pl.LightningModule) else None
        if device is not None and device.type == "cuda":
            self.memory.to(device)

    # ------------------------------------------------------------------ internals: adapt
    def _start_adapting(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        self._move_memory(pl_module)
        populated = len(self.memory) == 0  # then filled below with the current weights
        if populated:
            self._auto_populate(trainer, pl_module)
        if self._head_module is None and self._head_name is not None:
            self._set_head(pl_module, self._head_name)
        if self.refresh_keys == "on_test" and not populated:
            self._refresh(pl_module, trainer)
        if len(self.memory) == 0:
            rank_zero_warn(
                f"MbPA: the episodic memory is empty, so {stage} uses the model's base "
                "predictions until something is written. Fit with the callback attached, restore "
                "a checkpoint that holds the memory, or call `MbPA.populate(model, dataloader)`.",
                category=UserWarning,
            )
        self._adapting_stage = stage
        self._labels_checked = None
        self._queries, self._adapt_seconds = 0, 0.0
        self._head_called_in_stage = False
        self._base_acc = self._adapted_acc = None
        if self._head_module is None:  # nothing was ever written: find the head for online writes
            if self.online_writes and stage == "test":
                self._install_capture_hooks(pl_module)
            return
        self._check_memory_width(self.memory.dim)
        if self._adapt_handle is None:
            self._adapt_handle = self._head_module.register_forward_hook(self._adapt_hook)

    def _stop_adapting(self) -> None:
        self._remove_adapt_hook()
        self._adapting_stage = None
        self._adapted_calls.clear()
        self._slot_outputs = None

    def _remove_adapt_hook(self) -> None:
        if self._adapt_handle is not None:
            self._adapt_handle.remove()
            self._adapt_handle = None

    def _auto_populate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
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
        self.populate(pl_module, loader)

    def _neighbour_outputs(self, indices: Tensor, mask: Tensor) -> Tensor | None:
        """For a Linear head, the trained head's outputs on the neighbours, cached per memory slot
        for the rest of the run (any change of the memory clears the cache).

        On the CPU a slot's output is computed the first time a query retrieves it and appended
        to a dense table (``_slot_row`` maps slots to its rows), so a run never computes more
        than ``min(len(memory), queries · k)`` of them: computing all of a large memory up front
        costs more than a test set of fewer than ``len / k`` queries needs, and a sparse
        ``[len, C]`` table would page-fault once per retrieved slot. On a GPU all of them are
        computed at once: no per-batch synchronisation.
        """
        head = self._head_module
        if not isinstance(head, nn.Linear):
            return None
        memory = self.memory
        keys = memory.keys
        if keys.shape[0] * head.out_features * 4 > 512 * 2**20:  # too large to cache
            return None
        lazy = keys.device.type == "cpu"
        if self._slot_outputs is None or self._slot_version != memory._version:
            self._slot_version = memory._version
            with torch.inference_mode(False):
                if lazy:
                    rows = min(keys.shape[0], 4096)
                    self._slot_outputs = keys.new_empty((rows, head.out_features))
                    self._slot_row = torch.full((keys.shape[0],), -1, dtype=torch.int32)
                    self._slot_rows_used = 0
                else:
                    self._slot_outputs = self._head_outputs(head, keys)
        safe = indices.clamp_min(0).to(self._slot_outputs.device)
        if not lazy:
            return self._slot_outputs[safe].to(indices.device)
        assert self._slot_row is not None
        flat = safe.reshape(-1)
        rows = self._slot_row[flat]
        missing = rows < 0
        if bool(missing.any()):
            new = torch.unique(flat[missing])
            start = self._slot_rows_used
            stop = start + new.numel()
            if stop > self._slot_outputs.shape[0]:  # grow the table by doubling
                with torch.inference_mode(False):
                    grown = self._slot_outputs.new_empty(
                        (
                            min(keys.shape[0], max(stop, 2 * self._slot_outputs.shape[0])),
                            head.out_features,
                        )
                    )
                grown[:start] = self._slot_outputs[:start]
                self._slot_outputs = grown
            self._slot_outputs[start:stop] = self._head_outputs(head, keys[new])
            self._slot_row[new] = torch.arange(start, stop, dtype=torch.int32)
            self._slot_rows_used = stop
            rows = self._slot_row[flat]
        table = self._slot_outputs[rows.long()]
        return table.view(*indices.shape, table.shape[-1]).to(indices.device)

    @staticmethod
    def _head_outputs(head: nn.Linear, keys: Tensor) -> Tensor:
        """``head(keys)`` in float32 with the trained weights, autocast off."""
        with torch.autocast(keys.device.type, enabled=False):
            weight = head.weight.detach().to(device=keys.device, dtype=torch.float32)
            bias = (
                None
                if head.bias is None
                else head.bias.detach().to(device=keys.device, dtype=torch.float32)
            )
            return torch.nn.functional.linear(keys, weight, bias)

    @torch.compiler.disable
    def _adapt_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise MisconfigurationException(
                f"MbPA: the head {self._head_name!r} must take a tensor and return a tensor of "
                f"logits; it returned {type(output).__name__}."
            )
        inputs = args[0]
        if output.dim() != inputs.dim() or output.shape[:-1] != inputs.shape[:-1]:
            raise MisconfigurationException(
                f"MbPA: the head {self._head_name!r} maps inputs of shape {tuple(inputs.shape)} to "
                f"outputs of shape {tuple(output.shape)}; MbPA needs [B, C] logits for [B, D] "
                "inputs (or [B, T, C] for [B, T, D])."
            )
        start = time.perf_counter()
        queries = inputs.detach().reshape(-1, inputs.shape[-1])
        base = output.detach().reshape(-1, output.shape[-1])
        if queries.shape[0] == 0 or len(self.memory) == 0:
            self._adapted_calls.append((inputs.detach(), base, base))
            self._head_called_in_stage = True
            return output
        self._check_query_geometry(queries.shape[1], base.shape[1])
        finite = None
        if not bool(torch.isfinite(queries).all()):
            # no neighbours for non-finite queries: they keep the base prediction
            finite = _finite_rows(queries)
            queries = queries.masked_fill(~finite[:, None], 0)
            self._warnings.warn(
                f"MbPA: {int((~finite).sum())} of {finite.numel()} {self._adapting_stage} queries "
                "hold NaN or infinite head inputs; they keep the model's base prediction.",
                category=UserWarning,
            )
        neighbours = self.memory.search(queries, self.k)
        mask = neighbours.mask if finite is None else neighbours.mask & finite[:, None]
        weights = kernel_weights(neighbours.distances, mask, self.kernel_eps)
        adapted = local_adapt(
            module,
            queries,
            neighbours.keys,
            neighbours.values,
            weights,
            steps=self.adaptation_steps,
            lr=self.adaptation_lr,
            beta=self.beta,
            base_outputs=base,
            neighbour_outputs=self._neighbour_outputs(neighbours.indices, neighbours.mask),
        )
        self._adapt_seconds += time.perf_counter() - start
        self._queries += queries.shape[0]
        self._adapted_calls.append((inputs.detach(), base, adapted))
        self._head_called_in_stage = True
        return adapted.reshape(output.shape).to(output.dtype)

    def _check_query_geometry(self, width: int, classes: int) -> None:
        """The head's inputs must match the keys, and the stored labels its outputs."""
        dim = self.memory.dim
        if width != dim:
            raise MisconfigurationException(
                f"MbPA: the head {self._head_name!r} was called with inputs of width {width}, but "
                f"the memory holds keys of width {dim}. MbPA needs a head with a fixed input width "
                "that matches the memory: name such a module with `head=...`, or use a fresh MbPA "
                "callback if the memory was written by another model."
            )
        self._classes_seen = classes  # later writes are checked against it
        if self._labels_checked != classes:
            problem = _labels_outside(self.memory.values, classes)
            if problem is not None:
                raise MisconfigurationException(
                    f"MbPA: the memory holds labels {problem[1]}, but the head "
                    f"{self._head_name!r} needs {problem[0]}. The memory was written with labels "
                    "this head does not predict (another model's checkpoint, or labels that are "
                    "not class indices): use a fresh MbPA callback, or name the module that "
                    "outputs one logit per class with `head=...`."
                )
            self._labels_checked = classes

    def _update_metrics(self, batch: Any) -> Tensor | None:
        """Update base vs adapted accuracy when the batch carries labels; return the labels."""
        if not self._adapted_calls:
            return None
        try:
            labels = self.extract_labels(batch)
        except (ValueError, MisconfigurationException):
            labels = None
        if labels is None:
            return None
        for inputs, base, adapted in self._adapted_calls:
            if tuple(inputs.shape[:-1]) != tuple(labels.shape):
                continue
            flat = labels.reshape(-1).to(base.device)
            keep = flat != _IGNORE_INDEX
            if not bool(keep.all()):
                flat, base, adapted = flat[keep], base[keep], adapted[keep]
            if flat.numel() == 0:
                continue
            if self._base_acc is None:
                self._metric_classes = base.shape[-1]
                self._base_acc, self._adapted_acc = self._make_metrics(base.shape[-1], base.device)
            self._base_acc.update(self._predictions(base), flat)
            self._adapted_acc.update(self._predictions(adapted), flat)
        return labels

    def _log_epoch(self, pl_module: pl.LightningModule) -> None:
        """Log the stage's metrics once, at epoch end (``compute()`` syncs across processes)."""
        pl_module.log("mbpa/memory_size", float(len(self.memory)), sync_dist=True, reduce_fx="max")
        # Every rank makes the same calls, whatever its own batches held: each synced log and
        # each `compute()` is a collective, and a call one rank skips would hang the others.
        classes = 0 if self._base_acc is None else self._metric_classes
        adapted = self._adapt_seconds > 0
        if self._strategy is not None:
            flags = torch.tensor([classes, int(adapted)], device=pl_module.device)
            classes, adapted = (int(v) for v in self._strategy.reduce(flags, reduce_op="max"))
        if adapted:
            rate = self._queries / self._adapt_seconds if self._adapt_seconds > 0 else 0.0
            pl_module.log("mbpa/queries_per_s", rate, sync_dist=True, reduce_fx="sum")
        if classes > 0:
            if self._base_acc is None:  # this rank saw no labelled batch: it adds nothing
                self._base_acc, self._adapted_acc = self._make_metrics(classes, pl_module.device)
            assert self._adapted_acc is not None
            # compute() syncs the metric states, so both values are equal on all ranks
            pl_module.log("mbpa/base_acc", self._base_acc.compute(), sync_dist=True)
            pl_module.log("mbpa/adapted_acc", self._adapted_acc.compute(), sync_dist=True)
            self._base_acc.reset()
            self._adapted_acc.reset()

    @staticmethod
    def _make_metrics(
        num_classes: int, device: torch.device
    ) -> tuple[torchmetrics.Metric, torchmetrics.Metric]:
        if num_classes == 1:
            return (
                torchmetrics.classification.BinaryAccuracy().to(device),
                torchmetrics.classification.BinaryAccuracy().to(device),
            )
        return (
            torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro").to(device),
            torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro").to(device),
        )

    @staticmethod
    def _predictions(logits: Tensor) -> Tensor:
        if logits.shape[-1] == 1:
            return (logits[..., 0] > 0).long()
        return logits.argmax(-1)


def _saved_generator(state_dict: dict[str, Any], name: str) -> torch.Generator | None:
    """The generator a checkpoint's ``name`` entry holds (None if absent); raises if corrupted."""
    state = state_dict.get(name)
    if state is None:
        return None
    generator = torch.Generator()
    try:
        generator.set_state(state)
    except (RuntimeError, TypeError) as err:
        raise MisconfigurationException(
            f"MbPA: the checkpoint's {name!r} entry is not a CPU generator state ({err}); the "
            "checkpoint is corrupted."
        ) from err
    return generator


def _module_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _forward_context(trainer: pl.Trainer | None) -> contextlib.AbstractContextManager[Any]:
    """The precision plugin's forward context (autocast under mixed precision), if attached."""
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.precision_plugin.forward_context()


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def _finite_rows(keys: Tensor) -> Tensor:
    """``[N]`` bool: rows that are finite, also once stored as float32."""
    return torch.isfinite(keys.float() if keys.dtype == torch.float64 else keys).all(-1)


def _small_cpu(values: Tensor) -> bool:
    """A CPU tensor small enough that Python on ``tolist()`` beats tensor ops (~10 µs each
    between two training steps, when caches are cold)."""
    return values.device.type == "cpu" and values.numel() <= 1024


def _keys_finite(keys: Tensor) -> bool:
    """``_finite_rows(keys).all()``, in one reduction when it holds (run for every batch): a NaN
    or inf anywhere makes the sum non-finite; only a sum that overflows needs the row check."""
    keys = keys if keys.dtype == torch.float32 else keys.float()
    return math.isfinite(keys.sum().item()) or bool(torch.isfinite(keys).all())


def _labels_outside(values: Tensor, classes: int | None) -> tuple[str, list[int]] | None:
    """``(what the labels must be, up to 5 offending values)`` if the head cannot predict some."""
    high = None if classes is None else (2 if classes == 1 else classes)
    if values.numel() == 0:
        return None
    if _small_cpu(values) and not values.is_floating_point():  # every batch: no tensor ops
        listed = values.tolist()
        if min(listed) >= 0 and (high is None or max(listed) < high):
            return None
    bad = values < 0 if high is None else (values < 0) | (values >= high)
    if not bool(bad.any()):
        return None
    if high is None:
        return "non-negative class indices", values[bad].unique()[:5].tolist()
    outputs = f"{classes} output{'s' if classes != 1 else ''}"
    return f"class indices in [0, {high}) ({outputs})", values[bad].unique()[:5].tolist()


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise MisconfigurationException(f"MbPA(`{name}`={value!r}) is invalid: expected {allowed}.")
