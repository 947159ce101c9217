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

This module holds the configuration, the Lightning hooks, checkpointing and the extension points;
the work is in three mixins, one module each: ``_writes`` (capture and writing during ``fit``),
``_adapting`` (the head's adapted output at test time) and ``_drift`` (stored inputs, refreshed
keys, replay).
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mbpa._adapting import _AdaptsPredictions
from lightning_mbpa._drift import _KeyDrift, _module_device
from lightning_mbpa._writes import _labels_outside, _MemoryWrites, _sentence
from lightning_mbpa.batches import (
    as_label_tensor,
    describe,
    find_label_name,
    get_item,
    slice_inputs,
)
from lightning_mbpa.memory import EpisodicMemory
from lightning_mbpa.mixture import mixture_weights

Stage = Literal["validate", "test", "predict"]
_STAGES: tuple[str, ...] = ("validate", "test", "predict")
_REFRESH: tuple[str, ...] = ("never", "on_test", "epoch_end")


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name]


class MbPA(_MemoryWrites, _KeyDrift, _AdaptsPredictions, Callback):
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
            The defaults of these three (20, 0.01, 0) had the best mean gain over the three
            demo streams on their validation splits with hidden-layer keys
            (``examples/sweep.py``; the README says how).
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
            ``"predict"``). Empty only with ``replay_every_n_steps`` (replay alone).
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
        base_weight: Output mixtures (language models): weight ``λb`` of the trained head's
            distribution in the head's output ``log(λa·p_adapted + λb·p_base + λm·p_memory)``,
            with ``λa = 1 − base_weight − memory_weight`` (:func:`~lightning_mbpa.mix_log_probs`).
            When either weight is non-zero the head returns these log-probabilities (floored at
            about −87.3, so a class no component gives mass to keeps a finite loss) instead of
            logits; ``mbpa/adapted_acc`` measures the mixture. Both 0 (the default): no mixture,
            the adapted logits as they are. In [0, 1].
        memory_weight: Weight ``λm`` of the neighbours' label distribution
            ``p_memory(y) = Σ_k w_k·[y_k = y]``. A query without neighbours (empty memory, all
            neighbours masked) uses ``p_base`` for the memory part. ``λa = 0`` with
            ``write_on_fit=False, online_writes=True`` is the neural cache (Grave et al., 2017);
            ``λa = 0`` with ``memory_temperature`` set and the training tokens in memory is
            kNN-LM (Khandelwal et al., 2020). In [0, 1], ``base_weight + memory_weight <= 1``.
        memory_temperature: ``None``: ``p_memory`` uses MbPA's kernel weights
            ``w_k ∝ 1/(kernel_eps + d_k)``; a float ``τ > 0``: kNN-LM's ``softmax(−d_k/τ)`` over
            the K neighbours' squared distances.
        write_on_fit: Write the training examples to memory during ``fit`` (the paper).
            ``False``: nothing is written during ``fit``. With ``online_writes=True`` the memory
            then holds only the test history (the neural-cache setting, ``memory_size`` being
            the cache length): it is cleared when ``test`` starts, never filled from the train
            data, and each token is written after it was predicted. With ``online_writes=False``
            the memory is filled only by :meth:`populate` (or, when it is empty at the start of
            validate/test/predict, from the datamodule's ``train_dataloader()`` with the current
            weights, as kNN-LM builds its datastore with the trained model); a stage that
            starts with an empty memory then raises, as nothing else could fill it.

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
        adaptation_steps: int = 20,
        adaptation_lr: float = 0.01,
        beta: float = 0.0,
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
        base_weight: float = 0.0,
        memory_weight: float = 0.0,
        memory_temperature: float | None = None,
        write_on_fit: bool = True,
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
            isinstance(adapt_on, Iterable) and all(stage in _STAGES for stage in adapt_on),
            "adapt_on",
            adapt_on,
            f"a list of stages from {list(_STAGES)}",
        )
        adapt_on = list(adapt_on)
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
        _check(
            len(adapt_on) > 0 or replay_every_n_steps is not None,
            "adapt_on",
            adapt_on,
            f"a non-empty list of stages from {list(_STAGES)}, unless replay_every_n_steps is "
            "set (without adaptation or replay nothing reads the memory)",
        )
        # ---- output mixtures and the test-history memory (lightning_mbpa.mixture)
        try:
            mixture_weights(base_weight, memory_weight)
        except ValueError as err:
            raise MisconfigurationException(f"MbPA: {err}") from err
        _check(
            memory_temperature is None or (_is_real(memory_temperature) and memory_temperature > 0),
            "memory_temperature",
            memory_temperature,
            "a float > 0 (kNN-LM's softmax(-d/τ)) or None (MbPA's kernel weights)",
        )
        _check(isinstance(write_on_fit, bool), "write_on_fit", write_on_fit, "a bool")
        # ----
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
        self.base_weight = float(base_weight)
        self.memory_weight = float(memory_weight)
        self.memory_temperature = None if memory_temperature is None else float(memory_temperature)
        self.write_on_fit = write_on_fit
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
        self._queries = 0
        self._adapt_seconds = 0.0
        self._classes_seen: int | None = None  # outputs of the head, once it ran adapted
        self._index_checked_dim: int | None = None  # key width the index was checked to take
        self._warned_unmatched_calls = False  # head calls skipped for not matching the labels
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
        self._index_checked_dim = None

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
        if self.label_key is None and type(batch) in (list, tuple) and len(batch) >= 2:
            # the common `(x, y)` batch, looked up as below without the generic look-up's cost
            labels = batch[1]
            if type(labels) is Tensor and labels.dtype == torch.int64 and labels.dim() == 1:
                return labels
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
                f"MbPA: the batch's labels under {name!r} are unusable: {_sentence(err)} MbPA needs one "
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
        if self.write_on_fit:
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
        self._capturing = self.write_on_fit

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._capturing = False
        if not self.write_on_fit:
            return
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

    def _require_head(self) -> nn.Module:
        if self._head_module is None:
            raise MisconfigurationException(
                "MbPA: the head is not known yet (no batch has been written by this callback); "
                "name it with `head=...`."
            )
        return self._head_module


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise MisconfigurationException(f"MbPA(`{name}`={value!r}) is invalid: expected {allowed}.")
