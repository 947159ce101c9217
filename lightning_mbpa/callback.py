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

This module holds the configuration, the Lightning hooks, checkpointing and the extension points.
The callback owns one memory and four parts, each with its own state: the head binding
(``_head``), the writer (``_writer``: capture hooks, staging, checks), the adapter
(``_adapter``: the adapt hook, its caches and metrics) and the drift part (``_drift``: stored
inputs, refresh, replay).
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_mbpa._adapter import Adapter, AdaptSettings
from lightning_mbpa._arguments import check_arguments
from lightning_mbpa._checkpoint import build_memory, read_checkpoint
from lightning_mbpa._checks import module_device, sentence
from lightning_mbpa._drift import Drift
from lightning_mbpa._head import HeadBinding, linear_names
from lightning_mbpa._writer import Writer
from lightning_mbpa.batches import (
    as_label_tensor,
    describe,
    find_label_name,
    get_item,
    slice_inputs,
)
from lightning_mbpa.memory import EpisodicMemory


class MbPA(Callback):
    r"""Memory-based Parameter Adaptation (Sprechmann et al., 2018) as a Lightning callback.

    Attach it to a ``Trainer``: ``fit`` fills an episodic memory with the head inputs and labels
    of the training examples; ``test`` and ``predict`` classify every query with a copy of the
    head adapted for ``adaptation_steps`` gradient steps on its ``k`` nearest memories,
    ``θx ← θx − adaptation_lr·∇Σ_k w_k·CE(g_θx(h_k), y_k) − beta·(θx − θ)``, then thrown away.

    Args:
        memory: The episodic memory to write and search (an :class:`EpisodicMemory`, e.g. from
            YAML ``memory: {class_path: lightning_mbpa.EpisodicMemory, init_args: {capacity:
            500, index: HNSW32, index_params: efSearch=64}}``); its own configuration
            (capacity, eviction, index, backend, device, index_params) is the truth, and
            ``memory_size``, ``eviction`` and ``index`` read it. ``None``: a memory built from
            ``memory_size``, ``eviction``, ``index`` and ``seed``; giving both a memory and one
            of those three is an error.
        head: Dotted name of the output head (``pl_module.get_submodule(head)``), e.g.
            ``"model.classifier"``. ``None``: the ``nn.Linear`` that runs last in the forward
            pass, found by execution order on the first batch.
        memory_size: Capacity of the episodic memory (number of examples), when ``memory`` is
            not given.
        k: Number of nearest memories each query adapts on.
        adaptation_steps: Gradient steps of local adaptation per query (0 disables it).
        adaptation_lr: Step size ``α`` of local adaptation.
        beta: Pull toward the trained head per step, ``β`` in ``−β(θx − θ)``, in [0, 1]
            (the Gaussian prior of the paper's MAP view; 0 is plain weighted fine-tuning).
            The defaults of these three (20, 0.01, 0) had the best mean gain over the three
            demo streams on their validation splits with hidden-layer keys
            (``examples/sweep.py``; the README says how).
        kernel_eps: ``ε`` of the neighbour weights ``w_k ∝ 1 / (ε + ||q − h_k||²)``, at least
            ``1.1755e-38`` (the smallest normal float32, so that ``1 / ε`` is finite).
        label_key: Where training batches keep their labels: a mapping key or attribute name,
            or a position in a tuple. ``None``: a tuple's second element, or a key/attribute
            named ``y``, ``label``, ``labels``, ``target`` or ``targets``.
        eviction: What a full memory overwrites: ``"fifo"`` the oldest entry (the paper),
            ``"reservoir"`` a uniform sample of everything seen, ``"class_balanced"`` the oldest
            entry of the class holding the most entries (on ties the new entry's own class if
            it is one of them, else the smallest label), so an imbalanced stream keeps equal
            per-class quotas and its rare classes (see :class:`EpisodicMemory`).
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
            steps, ``replay_batch_size`` stored examples drawn from the memory (see
            ``replay_sampling``) add the gradient of their loss (cross-entropy of the head's
            logits against the stored labels; binary cross-entropy for a one-logit head) to the
            step's gradients, after the training step's backward and before the optimizer
            steps (and gradient clipping). ``None`` disables it. Needs ``store_inputs`` and
            automatic optimization. The replay forward runs in train mode but leaves
            normalisation running statistics unchanged and writes nothing to the memory.
        replay_batch_size: Stored examples per replay step (MbPA++ replays about 1% of the
            examples seen: ``replay_batch_size / (replay_every_n_steps * batch size)``).
        replay_sampling: How a replay step draws its ``min(len(memory), replay_batch_size)``
            stored examples, with the seeded replay generator (checkpointed; the same draws on
            every DDP rank): ``"uniform"`` distinct entries uniformly from the memory (MbPA++);
            ``"class_balanced"`` each example independently (so an entry may repeat) by picking a
            class uniformly among the labels present in memory, then an entry of that class
            uniformly, so on an imbalanced stream a rare class is replayed as often as a
            frequent one. Harmless (ignored) when ``replay_every_n_steps`` is ``None``.
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

    Errors: a bad argument or setup (a missing head, a memory that does not fit the model or
    a checkpoint that does not fit the callback) raises ``MisconfigurationException`` naming
    the argument, the value and what is allowed; bad data (labels the head cannot predict,
    unusable label tensors) raises ``ValueError`` at the batch that carries it; non-finite head
    inputs are refused with a warning. Nothing of a refused batch or checkpoint is kept.

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
        eviction: Literal["fifo", "reservoir", "class_balanced"] = "fifo",
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
        replay_sampling: Literal["uniform", "class_balanced"] = "uniform",
        memory: EpisodicMemory | None = None,
        base_weight: float = 0.0,
        memory_weight: float = 0.0,
        memory_temperature: float | None = None,
        write_on_fit: bool = True,
    ) -> None:
        super().__init__()
        self.adapt_on = check_arguments(
            head=head,
            memory_size=memory_size,
            k=k,
            adaptation_steps=adaptation_steps,
            adaptation_lr=adaptation_lr,
            beta=beta,
            kernel_eps=kernel_eps,
            label_key=label_key,
            eviction=eviction,
            index=index,
            write_fraction=write_fraction,
            adapt_on=adapt_on,
            online_writes=online_writes,
            save_memory=save_memory,
            seed=seed,
            store_inputs=store_inputs,
            refresh_keys=refresh_keys,
            refresh_batch_size=refresh_batch_size,
            replay_every_n_steps=replay_every_n_steps,
            replay_batch_size=replay_batch_size,
            replay_sampling=replay_sampling,
            base_weight=base_weight,
            memory_weight=memory_weight,
            memory_temperature=memory_temperature,
            write_on_fit=write_on_fit,
        )
        self.head = head
        self.k = int(k)
        self.adaptation_steps = int(adaptation_steps)
        self.adaptation_lr = float(adaptation_lr)
        self.beta = float(beta)
        self.kernel_eps = float(kernel_eps)
        self.label_key = label_key
        self.write_fraction = float(write_fraction)
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
        self.replay_sampling = replay_sampling
        self.base_weight = float(base_weight)
        self.memory_weight = float(memory_weight)
        self.memory_temperature = None if memory_temperature is None else float(memory_temperature)
        self.write_on_fit = write_on_fit
        self._memory = build_memory(memory, memory_size, eviction, index, self.seed)
        self._head = HeadBinding(head)
        self._writer = Writer(self._memory, self._head, seed=self.seed)
        self._adapter = Adapter(self._head)
        self._drift = Drift(self._head, seed=self.seed + 1, replay_sampling=replay_sampling)
        self._init_transient()

    def _init_transient(self) -> None:
        """The run the callback is attached to (never pickled)."""
        self._module_ref: weakref.ReferenceType[nn.Module] | None = None
        self._strategy: Any = None  # set when running on several processes

    # ------------------------------------------------------------------ the memory
    @property
    def memory(self) -> EpisodicMemory:
        """The episodic memory, with every write made so far in it.

        Training writes are staged and reach the memory in bulk (one ``add`` per few thousand
        rows instead of one per batch); reading this attribute writes what is staged first, and
        so do epoch ends, checkpoints and the start of validate/test/predict.
        """
        self._writer.flush()
        return self._memory

    @memory.setter
    def memory(self, memory: EpisodicMemory) -> None:
        if not isinstance(memory, EpisodicMemory):
            raise MisconfigurationException(
                f"MbPA.memory must be an EpisodicMemory; got {type(memory).__name__}."
            )
        self._writer.rebind(memory, self._head)  # what was staged goes to the old memory
        self._memory = memory
        self._adapter.invalidate()

    @property
    def memory_size(self) -> int:
        """The memory's capacity."""
        return self._memory.capacity

    @property
    def eviction(self) -> str:
        """The memory's eviction policy."""
        return self._memory.eviction

    @property
    def index(self) -> str:
        """The memory's faiss index string."""
        return self._memory.index_string

    @property
    def head_name(self) -> str | None:
        """The dotted name of the head module, once known (given, or found on the first batch)."""
        return self._head.name

    @property
    def refresh_seconds(self) -> float:
        """Seconds spent recomputing stored keys so far (every refresh of this callback)."""
        return self._drift.refresh_seconds

    @property
    def refused_batches(self) -> int:
        """Training batches refused so far for non-finite head inputs."""
        return self._writer.refused_batches

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        self._writer.flush()
        state = {k: v for k, v in self.__dict__.items() if k not in ("_module_ref", "_strategy")}
        # bytes, not tensors: torch's multiprocessing pickler (ddp_spawn) would share tensors
        # through file descriptors, which fails for empty ones
        buffer = io.BytesIO()
        torch.save({"config": self._memory.config, "state": self._memory.state_dict()}, buffer)
        state["_memory"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = torch.load(io.BytesIO(state.pop("_memory")), weights_only=True)
        self.__dict__.update(state)
        self._init_transient()
        self._memory = EpisodicMemory(**saved["config"])
        self._memory.load_state_dict(saved["state"])
        self._writer.rebind(self._memory, self._head)

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key: depends only on ``head``, so changing the adaptation settings between
        fit and test still restores the memory."""
        # Lightning reads it for every hook call of every callback: build the string once per head.
        cached = self.__dict__.get("_state_key_for")
        if cached is None or cached[0] != self.head:
            cached = self._state_key_for = (self.head, self._generate_state_key(head=self.head))
        return cached[1]

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
                f"MbPA: the batch's labels under {name!r} are unusable: {sentence(err)} MbPA needs one "
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
        return self._head.embed(pl_module, inputs)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, MbPA) and cb is not self]  # type: ignore[attr-defined]
        if others:
            raise MisconfigurationException(
                "MbPA: only one MbPA callback per Trainer is supported (found "
                f"{len(others) + 1}); they would adapt the same head twice. Keep one."
            )
        self._module_ref = weakref.ref(pl_module)
        self._strategy = trainer.strategy if trainer.world_size > 1 else None
        self._head.classes_seen = None
        if self._head.name is not None:
            self._head.bind(pl_module, self._head.name, self.memory.dim)
        elif not linear_names(pl_module):
            raise MisconfigurationException(
                f"MbPA(head=None): {type(pl_module).__name__} has no nn.Linear module to use as "
                "the head. Name the output head with `head=...`."
            )
        if self.replay_every_n_steps is not None and stage == "fit":
            Drift.check_replay_setup(self.replay_every_n_steps, trainer, pl_module)
        if self.save_memory and stage == "fit":
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.save_weights_only:
                    rank_zero_warn(
                        "MbPA(save_memory=True): a ModelCheckpoint with save_weights_only=True "
                        "drops callback state, so its checkpoints will not hold the episodic "
                        "memory. Use save_weights_only=False to keep it.",
                        category=UserWarning,
                    )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._writer.remove()
        self._adapter.detach()
        self._writer.release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._writer.remove()
        self._writer.end_batch()
        self._adapter.stop()
        # The batches that finished before the exception are in the memory, as without the
        # write buffer; a failing write must not hide the original exception.
        try:
            self._writer.flush()
        except ValueError as err:
            rank_zero_warn(f"MbPA: staged writes could not be written after an exception: {err}")

    # ---- fit: writing
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move_memory(pl_module)
        if self.write_on_fit:  # else nothing is written during fit
            self._writer.install(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._writer.remove()
        self._writer.flush()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        every = self.replay_every_n_steps
        if every is not None and trainer.training and (trainer.global_step + 1) % every == 0:
            with self._hooks_paused():
                self._drift.replay(
                    self.memory,
                    trainer,
                    pl_module,
                    optimizer,
                    self.embed,
                    batch_size=self.replay_batch_size,
                    option=("replay_every_n_steps", every),
                    strategy=self._strategy,
                )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.refresh_keys == "epoch_end" and len(self.memory) > 0:
            self._refresh(pl_module, trainer)
            pl_module.log("mbpa/refresh_s", float(self._drift.last_refresh_seconds or 0.0))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.write_on_fit:
            self._writer.start_batch()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.write_on_fit:  # the writer's hooks were not installed
            return
        self._writer.capturing = False
        try:
            self._writer.finish_discovery(pl_module)
            if self._writer.skipped_training_step():
                return
            self._write_batch(batch, "training batch", self._strategy)
            self._writer.head_has_run = True
        finally:
            self._writer.end_batch()

    def _write_batch(self, batch: Any, where: str, strategy: Any) -> None:
        self._writer.require_captured(where)
        labels = self.extract_labels(batch)
        if labels is None:
            raise MisconfigurationException(
                f"MbPA: cannot find labels in the {where}: it contains {describe(batch)}. "
                f"Labels are looked for as a tuple's second element or under the keys/attributes "
                f"y, label, labels, target, targets. Set `label_key=...` or override "
                f"`MbPA.extract_labels`."
            )
        self._write_labelled(batch, labels, where, strategy)

    def _write_labelled(
        self,
        batch: Any,
        labels: Tensor,
        where: str,
        strategy: Any,
        inputs: list[Tensor] | None = None,
        required: bool = True,
    ) -> None:
        payload_of = None
        if self.store_inputs:

            def payload_of(head_inputs: Tensor, labels: Tensor, calls: int) -> dict[str, Tensor]:
                return self._drift.payload(
                    self.extract_inputs(batch),
                    head_inputs,
                    labels,
                    calls,
                    where,
                    len(self.memory),
                    lambda: describe(self.extract_inputs(batch)),
                )

        self._writer.write_captured(
            labels,
            where,
            fraction=self.write_fraction,
            strategy=strategy,
            describe_batch=lambda: describe(batch),
            payload_of=payload_of,
            inputs=inputs,
            required=required,
        )

    # ---- validate/test/predict: adapting
    def _start_adapting(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        self._move_memory(pl_module)
        # write_on_fit=False with online_writes: the memory is this test run's history only
        test_history = not self.write_on_fit and self.online_writes
        if test_history and stage == "test":
            self.memory.clear()
        populated = len(self.memory) == 0 and not test_history  # then filled with current weights
        if populated:
            self._auto_populate(trainer, pl_module)
        self._head.bind_named(pl_module, self.memory.dim)
        if self.refresh_keys == "on_test" and not populated:
            self._refresh(pl_module, trainer)
        if len(self.memory) == 0 and not self.write_on_fit and not self.online_writes:
            raise MisconfigurationException(
                f"MbPA(write_on_fit=False, online_writes=False): the memory is empty at the start "
                f"of {stage} and nothing can fill it. Call `MbPA.populate(model, dataloader)` "
                "first (or give the datamodule a train_dataloader), or set online_writes=True "
                "(memory from the test history) or write_on_fit=True."
            )
        if len(self.memory) == 0 and not (test_history and stage == "test"):
            rank_zero_warn(
                f"MbPA: the episodic memory is empty, so {stage} uses the model's base "
                "predictions until something is written. Fit with the callback attached, restore "
                "a checkpoint that holds the memory, or call `MbPA.populate(model, dataloader)`.",
                category=UserWarning,
            )
        settings = AdaptSettings(
            k=self.k,
            steps=self.adaptation_steps,
            lr=self.adaptation_lr,
            beta=self.beta,
            kernel_eps=self.kernel_eps,
            base_weight=self.base_weight,
            memory_weight=self.memory_weight,
            memory_temperature=self.memory_temperature,
        )
        self._adapter.start(stage, settings, lambda: self.memory)
        if self._head.module is None and self.online_writes and stage == "test":
            self._writer.install(pl_module)  # nothing was ever written: find the head

    def _move_memory(self, pl_module: nn.Module) -> None:
        device = pl_module.device if isinstance(pl_module, pl.LightningModule) else None
        if device is not None and device.type == "cuda":
            self.memory.to(device)

    def _auto_populate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        self.populate(pl_module, loader)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validate" in self.adapt_on and not trainer.sanity_checking:
            self._start_adapting(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter.stop()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.adapt_on:
            self._start_adapting(trainer, pl_module, "test")
        elif self.online_writes:
            self._writer.install(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter.stop()
        self._writer.remove()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.adapt_on:
            self._start_adapting(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter.stop()

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._adapter.calls.clear()
        self._writer.captured.clear()
        if self._adapter.stage is not None and self._head.module is None and len(self.memory):
            self._writer.discover_with_forward(pl_module, self.extract_inputs(batch))
            self._adapter.attach()
        self._writer.capturing = self._writer.installed and trainer.testing and self.online_writes

    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._adapter.stage == "validate":
            self._adapter.check_head_was_called("validate")
            self._update_metrics(batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._adapter.stage == "validate":
            self._adapter.log_epoch(pl_module, len(self.memory), self._strategy)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._adapter.stage == "test":
            self._adapter.log_epoch(pl_module, len(self.memory), self._strategy)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._writer.capturing = False
        try:
            self._adapter.check_head_was_called("test")
            labels = self._update_metrics(batch) if self._adapter.stage == "test" else None
            if self.online_writes:
                self._online_write(pl_module, batch, labels)
        finally:
            self._adapter.calls.clear()
            self._writer.captured.clear()

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._adapter.check_head_was_called("predict")
        self._adapter.calls.clear()

    def _update_metrics(self, batch: Any) -> Tensor | None:
        """Update base vs adapted accuracy when the batch carries labels; return the labels."""
        if not self._adapter.calls:
            return None
        try:
            labels = self.extract_labels(batch)
        except (ValueError, MisconfigurationException):
            labels = None
        self._adapter.update_metrics(labels)
        return labels

    def _online_write(self, pl_module: nn.Module, batch: Any, labels: Tensor | None) -> None:
        """Write a labelled test batch after it was predicted (fast learning during evaluation)."""
        if labels is None:
            labels = self.extract_labels(batch)
        if labels is None:
            return
        if self._writer.discovering:
            self._writer.finish_discovery(pl_module)
            self._adapter.attach()
        inputs = [q for q, _, _ in self._adapter.calls] or [x for _, x in self._writer.captured]
        self._write_labelled(
            batch, labels, "test batch (online_writes)", self._strategy, inputs, required=False
        )

    @contextlib.contextmanager
    def _hooks_paused(self) -> Iterator[None]:
        """No writes and no adaptation while the callback runs the model on stored inputs."""
        with self._writer.paused(), self._adapter.paused():
            yield

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.save_memory:
            return {}
        return {
            "memory": self.memory.state_dict(),
            "memory_config": self._memory.config,
            "head": self._head.name,
            "write_generator": self._writer.generator.get_state(),
            "replay_generator": self._drift.replay_generator.get_state(),
            "inputs_structure": self._drift.inputs_structure,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the memory; everything is checked before anything changes, so a refused
        checkpoint leaves the callback and its memory exactly as they were."""
        if not self.save_memory or not state_dict:
            return
        module = self._module_ref() if self._module_ref is not None else None
        saved = read_checkpoint(
            state_dict,
            self._head,
            configured_head=self.head,
            model=module,
            capacity=self._memory.capacity,
            store_inputs=self.store_inputs,
        )
        try:
            self.memory.load_state_dict(saved.memory_state)  # validates everything before mutating
        except ValueError as err:
            raise MisconfigurationException(
                f"MbPA: cannot restore the memory from the checkpoint: {err}"
            ) from err
        self._head.module, self._head.name = saved.head_module, saved.head_name
        if saved.write_generator is not None:
            self._writer.generator = saved.write_generator
        if saved.replay_generator is not None:
            self._drift.replay_generator = saved.replay_generator
        self._adapter.invalidate()
        self._drift.inputs_structure = saved.inputs_structure if self.store_inputs else None

    # ------------------------------------------------------------------ populate / refresh
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
        writer = self._writer
        writer.install(model)
        device = module_device(model)
        try:
            for batch in dataloader:
                if isinstance(model, pl.LightningModule):
                    batch = model.transfer_batch_to_device(batch, device, 0)
                else:
                    batch = move_data_to_device(batch, device)
                self.extract_labels(batch)  # a wrong `label_key` fails before the model runs
                writer.start_batch()
                model(self.extract_inputs(batch))
                writer.capturing = False
                writer.finish_discovery(model)
                self._write_batch(batch, "batch of the populate() dataloader", strategy=None)
        finally:
            writer.end_batch()
            writer.remove()
            model.train(was_training)
        return self.memory.num_seen - before

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
        memory = self.memory
        if len(memory) == 0:
            return 0
        option = ("refresh_keys", self.refresh_keys)
        self._drift.stored_inputs(memory, *option)  # its error before the head's
        self._head.bind_named(model, memory.dim)
        with self._hooks_paused():
            n = self._drift.refresh(
                memory,
                model,
                self.embed,
                batch_size=self.refresh_batch_size,
                option=option,
                strategy=self._strategy,
                trainer=trainer,
            )
        self._adapter.invalidate()
        return n
