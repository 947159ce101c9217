"""Test-time adaptation: the head's output replaced by MbPA's, per query (paper steps 2-4).

During ``validate``/``test``/``predict`` a forward hook on the head searches each query's K
nearest memories and returns the outputs of the head adapted on them
(:func:`~lightning_mbpa.local_adapt`), so the module's own ``test_step`` and metrics see the
adapted predictions; base vs adapted accuracy is logged at epoch end.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_mbpa._writes import _IGNORE_INDEX, _finite_rows, _labels_outside
from lightning_mbpa.adaptation import _linear_head, kernel_weights, local_adapt
from lightning_mbpa.mixture import mix_log_probs, neighbour_weights


class _AdaptsPredictions:
    """The test-time half of :class:`~lightning_mbpa.MbPA` (a mixin: the state it uses is set
    up in ``MbPA._init_runtime_state``)."""

    def _move_memory(self, pl_module: nn.Module) -> None:
        device = pl_module.device if isinstance(pl_module, pl.LightningModule) else None
        if device is not None and device.type == "cuda":
            self.memory.to(device)

    def _start_adapting(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        self._move_memory(pl_module)
        # ---- write_on_fit=False with online_writes: the memory is this test run's history only
        test_history = not self.write_on_fit and self.online_writes
        if test_history and stage == "test":
            self.memory.clear()
        # ----
        populated = len(self.memory) == 0 and not test_history  # then filled with current weights
        if populated:
            self._auto_populate(trainer, pl_module)
        if self._head_module is None and self._head_name is not None:
            self._set_head(pl_module, self._head_name)
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
        """For a head adapted in dual form (an ``nn.Linear``), the trained head's outputs on the
        neighbours, cached per memory slot for the rest of the run (any change of the memory
        clears the cache).

        On the CPU a slot's output is computed the first time a query retrieves it and appended
        to a dense table (``_slot_row`` maps slots to its rows), so a run never computes more
        than ``min(len(memory), queries · k)`` of them: computing all of a large memory up front
        costs more than a test set of fewer than ``len / k`` queries needs, and a sparse
        ``[len, C]`` table would page-fault once per retrieved slot. On a GPU all of them are
        computed at once: no per-batch synchronisation.
        """
        head = _linear_head(self._head_module)
        if head is None:  # the generic path would ignore them
            return None
        memory = self.memory
        keys = memory.keys
        if keys.shape[0] * head.out_features * 4 > 512 * 2**20:  # too large to cache
            return None
        lazy = keys.device.type == "cpu"
        if self._slot_outputs is None or self._slot_version != memory.version:
            self._slot_version = memory.version
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
        adapted_weight = 1.0 - self.base_weight - self.memory_weight  # λa
        mixing = adapted_weight < 1.0  # base_weight or memory_weight set
        if mixing and base.shape[1] < 2:
            raise MisconfigurationException(
                f"MbPA(base_weight={self.base_weight}, memory_weight={self.memory_weight}): output "
                f"mixtures need a head with one output per class (>= 2); {self._head_name!r} "
                "has 1. Set both weights to 0."
            )
        if queries.shape[0] == 0 or len(self.memory) == 0:
            mixed = self._mix(base, None, None) if mixing else base
            self._adapted_calls.append((inputs.detach(), base, mixed))
            self._head_called_in_stage = True
            return mixed.reshape(output.shape).to(output.dtype) if mixing else output
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
        if adapted_weight > 1e-9 and self.adaptation_steps > 0:  # λa > 0: the adapted heads
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
        else:  # nothing to adapt, or λa = 0 (cache, kNN-LM): the adapted heads are not computed
            adapted = base
        if mixing:
            adapted = self._mix(base, None if adapted is base else adapted, (neighbours, mask))
        self._adapt_seconds += time.perf_counter() - start
        self._queries += queries.shape[0]
        self._adapted_calls.append((inputs.detach(), base, adapted))
        self._head_called_in_stage = True
        return adapted.reshape(output.shape).to(output.dtype)

    def _mix(
        self, base: Tensor, adapted: Tensor | None, found: tuple[Any, Tensor] | None
    ) -> Tensor:
        """The output mixture (``base_weight``/``memory_weight``) of one head call's queries."""
        memory_weights = labels = None
        if found is not None and self.memory_weight > 0:
            neighbours, mask = found
            memory_weights = neighbour_weights(
                neighbours.distances,
                mask,
                kernel_eps=self.kernel_eps,
                temperature=self.memory_temperature,
            )
            labels = neighbours.values
        return mix_log_probs(
            base,
            base_weight=self.base_weight,
            memory_weight=self.memory_weight,
            adapted_logits=adapted,
            memory_weights=memory_weights,
            memory_labels=labels,
        )

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
                self._base_acc, self._adapted_acc = self._make_metrics(base.shape[-1], base.device)
            self._base_acc.update(self._predictions(base), flat)
            self._adapted_acc.update(self._predictions(adapted), flat)
        return labels

    def _log_epoch(self, pl_module: pl.LightningModule) -> None:
        """Log the stage's metrics once, at epoch end (``compute()`` syncs across processes)."""
        pl_module.log("mbpa/memory_size", float(len(self.memory)), sync_dist=True, reduce_fx="max")
        # Every rank makes the same calls, whatever its own batches held: each synced log and
        # each `compute()` is a collective, and a call one rank skips would hang the others.
        classes = 0 if self._base_acc is None else getattr(self._base_acc, "num_classes", 1)
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
