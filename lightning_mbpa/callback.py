"""The MbPA callback: Memory-based Parameter Adaptation for any Lightning classifier.

Sprechmann et al., "Memory-based Parameter Adaptation", ICLR 2018 (arXiv:1802.10542), with the
sparse experience replay and key refresh of MbPA++ (de Masson d'Autume et al., "Episodic Memory
in Lifelong Language Learning", NeurIPS 2019, arXiv:1906.01076).

This module holds the configuration, the Lightning hooks, checkpointing and the extension points;
the state lives in one memory and four parts (``_head``, ``_writer``, ``_adapter``, ``_drift``),
and ``_stages`` and ``_labelled`` hold the longer steps of the hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_mbpa import _checkpoint, _labelled, _stages
from lightning_mbpa._adapter import Adapter
from lightning_mbpa._arguments import check_arguments
from lightning_mbpa._drift import Drift
from lightning_mbpa._head import HeadBinding
from lightning_mbpa._writer import Writer
from lightning_mbpa.batches import find_label_name, slice_inputs
from lightning_mbpa.memory import EpisodicMemory


class MbPA(Callback):
    r"""Memory-based Parameter Adaptation (Sprechmann et al., 2018) as a Lightning callback.

    Attach it to a ``Trainer``: ``fit`` fills an episodic memory with the head inputs and labels
    of the training examples; ``test`` and ``predict`` classify every query with a copy of the
    head adapted for ``adaptation_steps`` gradient steps on its ``k`` nearest memories,
    ``θx ← θx − adaptation_lr·∇Σ_k w_k·CE(g_θx(h_k), y_k) − beta·(θx − θ)``, then thrown away.

    Args:
        memory: The :class:`EpisodicMemory` to write and search (in YAML a ``class_path`` with
            ``init_args``); its own configuration is the truth (``memory_size``, ``eviction``
            and ``index`` read it). ``None``: one built from ``memory_size``, ``eviction``,
            ``index`` and ``seed``; giving a memory and one of those three is an error.
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
            demo streams on their validation splits with hidden-layer keys (``examples/sweep.py``).
        kernel_eps: ``ε`` of the neighbour weights ``w_k ∝ 1 / (ε + ||q − h_k||²)``, at least
            ``1.1755e-38`` (the smallest normal float32, so that ``1 / ε`` is finite).
        adaptation_loss: The neighbours' loss in local adaptation. ``"cross_entropy"`` (the
            paper): ``Σ_k w_k·CE(g_θx(h_k), y_k)``. ``"logit_adjusted"``: cross-entropy of the
            logits plus the memory's log class prior, ``CE(g_θx(h_k) + log π, y_k)`` with
            ``π_c ∝ 1 + (entries of class c in memory)`` (:func:`~lightning_mbpa.class_log_prior`),
            while the query is still predicted from ``g_θx(q)`` alone (logit adjustment, Menon
            et al. 2021; balanced softmax, Ren et al. 2020). It factors the memory's class
            imbalance out of what adaptation fits, so a rare class's few memories among a
            query's neighbours are not outvoted by the common classes' many; on a memory whose
            classes are equally frequent it changes nothing (a constant shift of the logits).
            Use it when some classes are rare in the memory (with ``replay_sampling=
            "class_balanced"``).
        label_key: Where training batches keep their labels: a mapping key or attribute name,
            or a position in a tuple. ``None``: a tuple's second element, or a key/attribute
            named ``y``, ``label``, ``labels``, ``target`` or ``targets``.
        eviction: What a full memory overwrites: ``"fifo"`` the oldest entry (the paper),
            ``"reservoir"`` a uniform sample of everything seen, ``"class_balanced"`` the oldest
            entry of the largest class: per-class quotas (ties: :class:`EpisodicMemory`).
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
            ``"class_balanced"`` each example independently (an entry may repeat): a class
            uniformly among the labels in memory, then an entry of that class uniformly.
            Ignored when ``replay_every_n_steps`` is ``None``.
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
            only :meth:`populate` fills it (or, if empty when a stage starts, the datamodule's
            ``train_dataloader()`` with the current weights, as kNN-LM builds its datastore); a
            stage that starts with an empty memory then raises.
        output_cache_bytes: The most memory, in bytes per process, that MbPA may use at
            test time to cache the trained head's outputs on memory slots, so that a slot
            retrieved again is not recomputed; ``0`` disables caching. One adaptation step of
            an ``nn.Linear`` head with 1024 classes or more (cross-entropy, on the CPU) keeps
            the softmax of the most recently used slots, ``4 · (C + D)`` bytes each, least
            recently used out first; any other ``nn.Linear`` head caches its logits on every
            memory slot when that table, ``len(memory) · C · 4`` bytes, fits the budget, and
            nothing otherwise. A head call uses one of the two caches and empties the other, so this one
            budget bounds both. The cache is dropped when the stage ends and never saved.
            Outputs do not depend on it, speed does: each lookup the cache misses costs the
            head's ``D · C`` multiply-adds again, which dominates the test time of language
            models on large vocabularies (a larger budget serves more of their lookups).

    Errors: a bad argument or setup (a missing head, a memory that does not fit the model or
    a checkpoint that does not fit the callback) raises ``MisconfigurationException`` naming
    the argument, the value and what is allowed; bad data (labels the head cannot predict,
    unusable label tensors) raises ``ValueError`` at the batch that carries it; non-finite head
    inputs are refused with a warning. Nothing of a refused batch or checkpoint is kept.

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
        adaptation_loss: Literal["cross_entropy", "logit_adjusted"] = "cross_entropy",
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
        output_cache_bytes: int = 2 * 2**30,
    ) -> None:
        super().__init__()
        # every argument but `memory` (build_memory checks it), by name: mypy checks the names
        self.adapt_on = check_arguments(
            head=head,
            memory_size=memory_size,
            k=k,
            adaptation_steps=adaptation_steps,
            adaptation_lr=adaptation_lr,
            beta=beta,
            kernel_eps=kernel_eps,
            adaptation_loss=adaptation_loss,
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
            output_cache_bytes=output_cache_bytes,
        )
        self.head, self.label_key, self.seed = head, label_key, int(seed)
        self.k, self.adaptation_steps = int(k), int(adaptation_steps)
        self.adaptation_lr, self.beta = float(adaptation_lr), float(beta)
        self.kernel_eps, self.adaptation_loss = float(kernel_eps), adaptation_loss
        self.write_fraction = float(write_fraction)
        self.online_writes, self.save_memory = online_writes, save_memory
        self.store_inputs, self.write_on_fit = store_inputs, write_on_fit
        self.refresh_keys, self.refresh_batch_size = refresh_keys, int(refresh_batch_size)
        self.replay_every_n_steps = (
            None if replay_every_n_steps is None else int(replay_every_n_steps)
        )
        self.replay_batch_size, self.replay_sampling = int(replay_batch_size), replay_sampling
        self.base_weight, self.memory_weight = float(base_weight), float(memory_weight)
        self.memory_temperature = None if memory_temperature is None else float(memory_temperature)
        self.output_cache_bytes = int(output_cache_bytes)
        self._memory = _checkpoint.build_memory(memory, memory_size, eviction, index, self.seed)
        self._head = HeadBinding(head)
        self._writer = Writer(self._memory, self._head, seed=self.seed)
        self._adapter = Adapter(self._head)
        self._drift = Drift(self._head, seed=self.seed + 1)
        self._init_transient()

    def _init_transient(self) -> None:
        """The run the callback is attached to (never pickled)."""
        self._module_ref: weakref.ReferenceType[nn.Module] | None = None
        self._strategy: Any = None  # set when running on several processes

    # ------------------------------------------------------------------ the memory
    @property
    def memory(self) -> EpisodicMemory:
        """The episodic memory, with every write made so far in it (each batch's rows are
        written when its step ends)."""
        return self._memory

    @memory.setter
    def memory(self, memory: EpisodicMemory) -> None:
        _checkpoint.replace_memory(self, memory)

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
    __getstate__ = _checkpoint.pickled_state
    __setstate__ = _checkpoint.unpickle

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key: depends only on ``head``, so changing the adaptation settings between
        fit and test still restores the memory."""
        return _checkpoint.state_key(self)

    # ------------------------------------------------------------------ extension points
    def extract_labels(self, batch: Any) -> Tensor | None:
        """The integer class labels of a batch, or ``None`` if it has none.

        Override in a subclass for batches the defaults do not cover; the subclass stays
        selectable from YAML by ``class_path``.
        """
        return _labelled.extract_labels(batch, self.label_key)

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
        _stages.setup(self, trainer, pl_module, stage)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._writer.remove()
        self._adapter.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        _stages.abandon(self)

    # ---- fit: writing
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _stages.move_memory(self, pl_module)
        if self.write_on_fit:  # else nothing is written during fit
            self._writer.install(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._writer.remove()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        _stages.replay(self, trainer, pl_module, optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _stages.end_train_epoch(self, trainer, pl_module)

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
        if self.write_on_fit:  # else the writer's hooks were not installed
            _labelled.write_training_batch(self, pl_module, batch)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _stages.start_stage(self, trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter.stop()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _stages.start_stage(self, trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter.stop()
        self._writer.remove()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _stages.start_stage(self, trainer, pl_module, "predict")

    on_predict_end = on_validation_end

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        _stages.start_eval_batch(self, trainer, pl_module, batch)

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
        _labelled.end_eval_batch(self, trainer, pl_module, batch)

    on_test_batch_end = on_validation_batch_end
    on_predict_batch_end = on_validation_batch_end

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._adapter.stage in ("validate", "test"):  # adapting in this stage: log its metrics
            self._adapter.log_epoch(pl_module, len(self.memory), self._strategy)

    on_test_epoch_end = on_validation_epoch_end

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return _checkpoint.checkpoint_entry(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the memory; everything is checked before anything changes, so a refused
        checkpoint leaves the callback and its memory exactly as they were."""
        _checkpoint.restore_checkpoint(self, state_dict)

    # ------------------------------------------------------------------ populate / refresh
    @torch.no_grad()
    def populate(self, model: nn.Module, dataloader: Iterable[Any]) -> int:
        """Fill the memory from ``dataloader`` with the model's current weights.

        This is how MbPA is added to a classifier trained without it. The model runs in eval
        mode on its own device; its weights are not changed.

        Returns:
            The number of examples offered to the memory.
        """
        return _stages.populate(self, model, dataloader)

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
        return _stages.refresh(self, model, None)
