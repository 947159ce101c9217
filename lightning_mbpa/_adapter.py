"""The adapter of :class:`~lightning_mbpa.MbPA`: the head's adapted output at test time.

During ``validate``/``test``/``predict`` a forward hook on the head replaces its output with the
output of a copy of the head adapted, per query, on the query's K nearest memories
(:func:`~lightning_mbpa.local_adapt`), so the module's own ``test_step`` and metrics see the
adapted predictions; base vs adapted accuracy is logged at epoch end. With ``base_weight`` or
``memory_weight`` set the head returns the output mixture of :mod:`lightning_mbpa.mixture`
instead (the adapted heads computed only when their weight ``λa`` is non-zero).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mbpa import adaptation
from lightning_mbpa._checks import IGNORE_INDEX, finite_rows, keys_finite, labels_outside
from lightning_mbpa._guards import (
    drop_overflowed_neighbours,
    overflowed_neighbours_message,
    unstorable_queries_message,
)
from lightning_mbpa._head import HeadBinding
from lightning_mbpa._neighbours import Neighbours
from lightning_mbpa._profiling import phase
from lightning_mbpa._vocab_form import (
    SLOT_CACHE_BYTES,
    VOCAB_MIN_CLASSES,
    SlotSoftmaxCache,
    one_step_outputs,
)
from lightning_mbpa.memory import EpisodicMemory
from lightning_mbpa.mixture import mix_log_probs, mixture_weights, neighbour_weights


@dataclass(frozen=True)
class AdaptSettings:
    """The callback's adaptation arguments, as read when a stage starts.

    ``base_weight``/``memory_weight`` (``λb``/``λm``) and ``memory_temperature`` configure the
    output mixture (:mod:`lightning_mbpa.mixture`); both weights 0 (the default) is no mixture.
    ``output_cache_bytes`` bounds the cache of the trained head's outputs on memory slots, of
    whichever path a head call takes (:meth:`Adapter.neighbour_outputs` or the
    :class:`~lightning_mbpa._vocab_form.SlotSoftmaxCache`); 0 caches nothing.
    """

    k: int
    steps: int
    lr: float
    beta: float
    kernel_eps: float
    adaptation_loss: str = "cross_entropy"
    base_weight: float = 0.0
    memory_weight: float = 0.0
    memory_temperature: float | None = None
    output_cache_bytes: int = SLOT_CACHE_BYTES

    @property
    def mixing(self) -> bool:
        """Whether the head returns the output mixture instead of the adapted logits."""
        return self.base_weight > 0 or self.memory_weight > 0

    @property
    def adapted_weight(self) -> float:
        """``λa = 1 − base_weight − memory_weight`` (exactly 0 within float round-off)."""
        return mixture_weights(self.base_weight, self.memory_weight)[0]


class Adapter:
    """Adapts the head's predictions during one stage at a time.

    State (all transient: nothing of it is pickled or checkpointed):
        stage: The stage being adapted (``"validate"``, ``"test"``, ``"predict"``) or ``None``.
        calls: ``(head input, base output, adapted output)`` of the head's calls in the batch.
        head_called: Whether the head ran adapted in the stage so far.
        base_acc, adapted_acc: Accuracy of the base and adapted predictions (torchmetrics).
        queries, seconds: Queries adapted in the stage and the time it took.
        The per-slot cache of the trained head's outputs on the memory's keys (general path)
        and the per-slot softmax cache (one step at vocabulary scale): each bounded by
        ``settings.output_cache_bytes``, and at most one of them holds rows at a time (a head
        call takes one path; taking the other frees the first's cache).
    """

    def __init__(self, head: HeadBinding) -> None:
        self.head = head
        self._init_transient()

    def _init_transient(self) -> None:
        self.stage: str | None = None
        self.settings: AdaptSettings | None = None
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self.head_called = False
        self.base_acc: torchmetrics.Metric | None = None
        self.adapted_acc: torchmetrics.Metric | None = None
        self.queries = 0
        self.seconds = 0.0
        self._memory_of: Callable[[], EpisodicMemory] | None = None
        self._handle: RemovableHandle | None = None
        self._labels_checked: int | None = None  # memory labels verified for this many classes
        self._warnings = WarningCache()
        self._slot_outputs: Tensor | None = None
        self._slot_row: Tensor | None = None  # CPU: row of each slot in _slot_outputs, or -1
        self._slot_rows_used = 0
        self._slot_version = -1  # the memory's version the cache was made for
        self._log_prior: tuple[int, Tensor] | None = None  # (memory version, log class prior)
        self._slot_softmax = SlotSoftmaxCache()  # one step at vocabulary scale

    def __getstate__(self) -> dict[str, Any]:
        return {"head": self.head}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.head = state["head"]
        self._init_transient()

    # ---- the stage
    def start(
        self, stage: str, settings: AdaptSettings, memory_of: Callable[[], EpisodicMemory]
    ) -> None:
        """Adapt ``stage``'s predictions with ``settings`` on the memory ``memory_of()`` returns
        (read at every call, so writes made during the stage count)."""
        self.stage, self.settings, self._memory_of = stage, settings, memory_of
        if self._slot_softmax.budget_bytes != settings.output_cache_bytes:
            self._slot_softmax.budget_bytes = settings.output_cache_bytes
            self._slot_softmax.reset()
        self._slot_outputs = None  # sized for the budget at the next call
        self._labels_checked = None
        self.queries, self.seconds = 0, 0.0
        self.head_called = False
        self.base_acc = self.adapted_acc = None
        self.attach()

    def stop(self) -> None:
        self.detach()
        self.stage = None
        self.calls.clear()
        self.invalidate()

    def invalidate(self) -> None:
        """Forget everything derived from the memory's contents (after a refresh or a load)."""
        self._slot_outputs = None
        self._log_prior = None
        self._labels_checked = None
        self._slot_softmax.reset()

    # ---- the adapt hook (registered and removed here only)
    def attach(self) -> None:
        """Adapt the bound head's outputs while a stage is active."""
        if self.stage is not None and self._handle is None and self.head.module is not None:
            self.head.check_width(self._memory().dim)
            self._handle = self.head.module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The head's plain outputs while the callback itself runs the model."""
        attached = self.attached
        self.detach()
        try:
            yield
        finally:
            if attached:
                self.attach()

    def _memory(self) -> EpisodicMemory:
        assert self._memory_of is not None, "Adapter.start() was not called"
        return self._memory_of()

    def check_head_was_called(self, stage: str) -> None:
        """A head never called in the stage's batches so far is a misconfiguration; a step that
        skips the head for one batch after it ran for others is the user's business."""
        if self.stage == stage and self.attached and not self.head_called:
            raise MisconfigurationException(
                f"MbPA: the head {self.head.name!r} was not called while processing the "
                f"{stage} batch, so its predictions cannot be adapted. Name the module your "
                "forward pass ends with via `head=...`."
            )

    @torch.compiler.disable
    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        with phase("mbpa.hook"):
            return self._adapted_output(module, args, output)

    def _adapted_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise MisconfigurationException(
                f"MbPA: the head {self.head.name!r} must take a tensor and return a tensor of "
                f"logits; it returned {type(output).__name__}."
            )
        inputs = args[0]
        if output.dim() != inputs.dim() or output.shape[:-1] != inputs.shape[:-1]:
            raise MisconfigurationException(
                f"MbPA: the head {self.head.name!r} maps inputs of shape {tuple(inputs.shape)} "
                f"to outputs of shape {tuple(output.shape)}; MbPA needs [B, C] logits for "
                "[B, D] inputs (or [B, T, C] for [B, T, D])."
            )
        start = time.perf_counter()
        memory = self._memory()
        settings = self.settings
        assert settings is not None
        queries = inputs.detach().reshape(-1, inputs.shape[-1])
        base = output.detach().reshape(-1, output.shape[-1])
        mixing = settings.mixing
        if mixing and base.shape[1] < 2:
            raise MisconfigurationException(
                f"MbPA(base_weight={settings.base_weight}, memory_weight="
                f"{settings.memory_weight}): output mixtures need a head with one output per "
                f"class (>= 2); {self.head.name!r} has 1. Set both weights to 0."
            )
        if queries.shape[0] == 0 or len(memory) == 0:
            if not mixing:
                self.calls.append((inputs.detach(), base, base))
                self.head_called = True
                return output
            mixed = self._mix(settings, base, None, None)
            self.calls.append((inputs.detach(), base, mixed))
            self.head_called = True
            return mixed.reshape(output.shape).to(output.dtype)
        self._check_query_geometry(memory, queries.shape[1], base.shape[1])
        finite = None
        if not keys_finite(queries):  # NaN/inf, or beyond float32 (float64 heads)
            # no neighbours for such queries: they keep the base prediction
            finite = finite_rows(queries)
            queries = queries.masked_fill(~finite[:, None], 0)
            message = unstorable_queries_message(~finite, self.stage)
            self._warnings.warn(message, category=UserWarning)
        with phase("mbpa.search"):
            neighbours = memory.search(queries, settings.k)
        mask = neighbours.mask if finite is None else neighbours.mask & finite[:, None]
        mask, lost = drop_overflowed_neighbours(neighbours.distances, mask)  # huge head inputs
        if lost is not None:
            message = overflowed_neighbours_message(lost, self.stage)
            self._warnings.warn(message, category=UserWarning)
        if not mixing or (settings.adapted_weight > 0 and settings.steps > 0):
            with phase("mbpa.weights"):
                weights = adaptation.kernel_weights(neighbours.distances, mask, settings.kernel_eps)
            vocab_head = self._vocab_head(module, settings, queries, memory)
            if vocab_head is not None:  # one step at vocabulary scale
                self._slot_outputs = self._slot_row = None  # one cache at a time (the budget)
                with phase("mbpa.adapt"):
                    adapted = self._one_step(vocab_head, memory, queries, base, neighbours, weights)
            else:
                if self._slot_softmax.probs is not None:  # one cache at a time (the budget)
                    self._slot_softmax.reset()
                with phase("mbpa.neighbour_outputs"):
                    outputs = self.neighbour_outputs(memory, neighbours.indices, neighbours.keys)
                with phase("mbpa.adapt"):
                    adapted = adaptation.local_adapt(
                        module,
                        queries,
                        neighbours.keys,
                        neighbours.values,
                        weights,
                        steps=settings.steps,
                        lr=settings.lr,
                        beta=settings.beta,
                        base_outputs=base,
                        neighbour_outputs=outputs,
                        logit_offsets=self.logit_offsets(memory, base.shape[1]),
                    )
        else:  # no adaptation steps, or λa = 0 (cache, kNN-LM): no adapted heads to compute
            adapted = base
        if mixing:
            found = (neighbours, mask)
            adapted = self._mix(settings, base, None if adapted is base else adapted, found)
        self.seconds += time.perf_counter() - start
        self.queries += queries.shape[0]
        self.calls.append((inputs.detach(), base, adapted))
        self.head_called = True
        return adapted.reshape(output.shape).to(output.dtype)

    # ---- one adaptation step at vocabulary scale (`_vocab_form`)
    def _vocab_head(
        self, module: nn.Module, settings: AdaptSettings, queries: Tensor, memory: EpisodicMemory
    ) -> nn.Linear | None:
        """The float32 ``nn.Linear`` head with at least ``VOCAB_MIN_CLASSES`` outputs when the
        adaptation is one step with queries and memory on the CPU (None: the general path)."""
        head = adaptation._linear_head(module)
        if (
            settings.steps != 1
            or settings.adaptation_loss != "cross_entropy"
            or head is None
            or head.out_features < VOCAB_MIN_CLASSES
            or head.weight.dtype != torch.float32
            or queries.device.type != "cpu"
            or memory.keys.device.type != "cpu"
        ):
            return None
        return head

    def _one_step(
        self,
        head: nn.Linear,
        memory: EpisodicMemory,
        queries: Tensor,
        base: Tensor,
        neighbours: Neighbours,
        weights: Tensor,
    ) -> Tensor:
        """:func:`~lightning_mbpa.local_adapt` with one step, computed as
        :func:`~lightning_mbpa._vocab_form.one_step_outputs` with the per-slot softmax cache."""
        settings = self.settings
        assert settings is not None
        with torch.autocast("cpu", enabled=False):
            q32, base32 = queries.float(), base.float()
            adapted = one_step_outputs(
                head,
                q32,
                base32,
                neighbours.keys.float(),
                neighbours.values,
                weights.float(),
                neighbours.indices,
                settings.lr,
                self._slot_softmax,
                memory.keys,
            )
            self._slot_softmax.offer(q32, base32)  # the test history reuses these logits
        adapted = adapted.to(base.dtype)
        active = adaptation._without_overflow(adapted, base, (weights > 0).any(dim=1))
        if bool(active.all()):
            return adapted
        return torch.where(active[:, None], adapted, base)

    @staticmethod
    def _mix(
        settings: AdaptSettings,
        base: Tensor,
        adapted: Tensor | None,
        found: tuple[Neighbours, Tensor] | None,
    ) -> Tensor:
        """The output mixture of one head call's queries: ``adapted`` None means
        ``p_adapted = p_base``; ``found`` (neighbours, valid mask) None means no neighbours."""
        memory_weights = labels = None
        if found is not None and settings.memory_weight > 0:
            neighbours, mask = found
            memory_weights = neighbour_weights(
                neighbours.distances,
                mask,
                kernel_eps=settings.kernel_eps,
                temperature=settings.memory_temperature,
            )
            labels = neighbours.values
        return mix_log_probs(
            base,
            base_weight=settings.base_weight,
            memory_weight=settings.memory_weight,
            adapted_logits=adapted,
            memory_weights=memory_weights,
            memory_labels=labels,
        )

    def _check_query_geometry(self, memory: EpisodicMemory, width: int, classes: int) -> None:
        """The head's inputs must match the keys, and the stored labels its outputs."""
        dim = memory.dim
        if width != dim:
            raise MisconfigurationException(
                f"MbPA: the head {self.head.name!r} was called with inputs of width {width}, "
                f"but the memory holds keys of width {dim}. MbPA needs a head with a fixed input "
                "width that matches the memory: name such a module with `head=...`, or use a "
                "fresh MbPA callback if the memory was written by another model."
            )
        self.head.classes_seen = classes  # later writes are checked against it
        if self._labels_checked != classes:
            problem = labels_outside(memory.values, classes)
            if problem is not None:
                raise MisconfigurationException(
                    f"MbPA: the memory holds labels {problem[1]}, but the head "
                    f"{self.head.name!r} needs {problem[0]}. The memory was written with labels "
                    "this head does not predict (another model's checkpoint, or labels that are "
                    "not class indices): use a fresh MbPA callback, or name the module that "
                    "outputs one logit per class with `head=...`."
                )
            self._labels_checked = classes

    # ---- the trained head's outputs on the memory's keys, cached per slot
    def neighbour_outputs(
        self, memory: EpisodicMemory, indices: Tensor, keys: Tensor | None = None
    ) -> Tensor | None:
        """For a head adapted in dual form (an ``nn.Linear``), the trained head's outputs on the
        neighbours ``indices`` ``[B, K]`` (``-1`` for none), cached per memory slot for the rest
        of the run (any change of the memory clears the cache). ``keys``: the neighbours' keys
        ``[B, K, D]`` as the search returned them, if at hand. ``None`` (computed per batch by
        the adaptation) when a table of every slot's outputs, ``len(memory) · C · 4`` bytes,
        would exceed ``settings.output_cache_bytes``.

        On the CPU a slot's output is computed the first time a query retrieves it and appended
        to a dense table, so a run never caches more than ``min(len(memory), queries · k)``
        of them: computing all of a large memory up front costs more than a test set of fewer
        than ``len / k`` queries needs, and a sparse ``[len, C]`` table would page-fault once
        per retrieved slot. The outputs a batch misses are computed in one product over the
        search's own float32 ``keys`` (rows already in cache; a slot retrieved twice in the batch
        is computed twice, which costs less than finding the duplicates first), or over rows
        read again from the memory otherwise. On a GPU all of them are computed at once: no
        per-batch synchronisation.
        """
        head = adaptation._linear_head(self.head.module)
        if head is None:  # the generic path would ignore them
            return None
        stored = memory.keys
        budget = SLOT_CACHE_BYTES if self.settings is None else self.settings.output_cache_bytes
        if stored.shape[0] * head.out_features * 4 > budget:
            self._slot_outputs = self._slot_row = None  # (a table made for a smaller memory)
            return None  # a table for every slot would not fit the budget: computed per batch
        lazy = stored.device.type == "cpu"
        if self._slot_outputs is None or self._slot_version != memory.version:
            self._slot_version = memory.version
            with torch.inference_mode(False):
                if lazy:
                    rows = min(stored.shape[0], 4096)
                    self._slot_outputs = stored.new_empty((rows, head.out_features))
                    self._slot_row = torch.full((stored.shape[0],), -1, dtype=torch.int32)
                    self._slot_rows_used = 0
                else:
                    self._slot_outputs = _head_outputs(head, stored)
        outputs = self._slot_outputs
        assert outputs is not None
        if not lazy:
            return outputs[indices.clamp_min(0).to(outputs.device)].to(indices.device)
        assert self._slot_row is not None
        flat = indices.reshape(-1).cpu()
        all_valid = bool((flat >= 0).all())
        safe = flat if all_valid else flat.clamp_min(0)
        slot_rows = self._slot_row[safe]
        missing = slot_rows < 0
        count = int(missing.sum())
        if count == 0:
            table = outputs[slot_rows.long()]
            return table.view(*indices.shape, table.shape[-1]).to(indices.device)
        # the search's keys where they are the stored float32 rows (masked columns are zeros)
        gathered = (
            keys.reshape(-1, keys.shape[-1])
            if keys is not None
            and keys.dtype == torch.float32
            and keys.device.type == "cpu"
            and all_valid
            else None
        )
        if count == flat.numel():  # nothing cached yet for this batch (the usual case)
            where = None
            table = _head_outputs(head, stored[safe] if gathered is None else gathered)
        else:
            where = missing.nonzero().squeeze(1)
            table = outputs[slot_rows.clamp_min(0).long()]
            source = stored[safe[where]] if gathered is None else gathered[where]
            table[where] = _head_outputs(head, source)
        self._cache_rows(safe if where is None else safe[where], table, where)
        return table.view(*indices.shape, table.shape[-1]).to(indices.device)

    def _cache_rows(self, slots: Tensor, table: Tensor, where: Tensor | None) -> None:
        """Append the outputs of the new ``slots`` (each row ``where[i]`` of ``table``, or row
        ``i`` when ``where`` is None; repeated slots are kept once) to the CPU cache."""
        assert self._slot_row is not None and self._slot_outputs is not None
        new, inverse = torch.unique(slots, return_inverse=True)
        rows = torch.arange(slots.numel()) if where is None else where
        one = torch.empty(new.numel(), dtype=torch.int64).scatter_(0, inverse, rows)
        outputs = self._slot_outputs
        start = self._slot_rows_used
        stop = start + new.numel()
        if stop > outputs.shape[0]:  # grow the table by doubling
            with torch.inference_mode(False):
                grown = outputs.new_empty(
                    (min(len(self._slot_row), max(stop, 2 * outputs.shape[0])), outputs.shape[1])
                )
            grown[:start] = outputs[:start]
            outputs = self._slot_outputs = grown
        torch.index_select(table, 0, one, out=outputs[start:stop])
        self._slot_row[new] = torch.arange(start, stop, dtype=torch.int32)
        self._slot_rows_used = stop

    def logit_offsets(self, memory: EpisodicMemory, classes: int) -> Tensor | None:
        """``adaptation_loss="logit_adjusted"``: the memory's log class prior, added to the
        neighbours' logits in the adaptation loss (cached until the memory changes)."""
        assert self.settings is not None
        if self.settings.adaptation_loss != "logit_adjusted":
            return None
        cached = self._log_prior
        if cached is None or cached[0] != memory.version or cached[1].shape[0] != classes:
            with torch.inference_mode(False):
                prior = adaptation.class_log_prior(memory.values, classes)
            cached = self._log_prior = (memory.version, prior)
        return cached[1]

    @property
    def cached_slots(self) -> Tensor:
        """``[len(memory)]`` bool: the slots whose head outputs the CPU cache holds."""
        if self._slot_row is None or self._slot_outputs is None:
            return torch.zeros(0, dtype=torch.bool)
        return self._slot_row >= 0

    # ---- metrics
    def update_metrics(self, labels: Tensor | None) -> None:
        """Update base vs adapted accuracy with the batch's labels (``None``: unlabelled)."""
        if labels is None:
            return
        with phase("mbpa.metrics"):
            self._update_metrics(labels)

    def _update_metrics(self, labels: Tensor) -> None:
        for inputs, base, adapted in self.calls:
            if tuple(inputs.shape[:-1]) != tuple(labels.shape):
                continue
            flat = labels.reshape(-1).to(base.device)
            keep = flat != IGNORE_INDEX
            if not bool(keep.all()):
                flat, base, adapted = flat[keep], base[keep], adapted[keep]
            if flat.numel() == 0:
                continue
            if self.base_acc is None or self.adapted_acc is None:
                self.base_acc, self.adapted_acc = _make_metrics(base.shape[-1], base.device)
            self.base_acc.update(_predictions(base), flat)
            self.adapted_acc.update(_predictions(adapted), flat)

    def log_epoch(self, pl_module: pl.LightningModule, memory_len: int, strategy: Any) -> None:
        """Log the stage's metrics once, at epoch end.

        The accuracies are logged as torchmetrics objects: Lightning computes them (one sync of
        their states across processes) and resets them.
        """
        pl_module.log("mbpa/memory_size", float(memory_len), sync_dist=True, reduce_fx="max")
        # Every rank makes the same calls, whatever its own batches held: each synced log and
        # each metric's compute is a collective, and a call one rank skips would hang the others.
        classes = 0 if self.base_acc is None else int(getattr(self.base_acc, "num_classes", 1))
        adapted = int(self.seconds > 0)
        if strategy is not None:
            flags = torch.tensor([classes, adapted], device=pl_module.device)
            classes, adapted = (int(v) for v in strategy.reduce(flags, reduce_op="max"))
        if adapted:
            rate = self.queries / self.seconds if self.seconds > 0 else 0.0
            pl_module.log("mbpa/queries_per_s", rate, sync_dist=True, reduce_fx="sum")
        if classes > 0:
            if self.base_acc is None or self.adapted_acc is None:
                # this rank saw no labelled batch: it adds nothing
                self.base_acc, self.adapted_acc = _make_metrics(classes, pl_module.device)
            pl_module.log("mbpa/base_acc", self.base_acc, metric_attribute="mbpa_base_acc")
            pl_module.log("mbpa/adapted_acc", self.adapted_acc, metric_attribute="mbpa_adapted_acc")


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


def _predictions(logits: Tensor) -> Tensor:
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).long()
    return logits.argmax(-1)
