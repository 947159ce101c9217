"""Writing the episodic memory during ``fit`` (and ``online_writes``): capture, checks, staging.

A forward pre-hook on the head captures its input ``h = f(x)``; after each training step the
captured inputs are paired with the batch's labels, checked (key width, label range, finite
values; under DDP on the rows gathered from every rank, so all ranks refuse the same batches)
and staged in a small buffer that reaches the :class:`~lightning_mbpa.EpisodicMemory` in bulk.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa.batches import (
    describe,
)
from lightning_mbpa.memory import EXACT_INDEX

_IGNORE_INDEX = -100  # labels to skip (torch cross_entropy's ignore_index)
# Training writes are staged in a buffer of about this size and written to the memory in bulk.
_WRITE_BUFFER_BYTES = 1 << 20


class _MemoryWrites:
    """The write half of :class:`~lightning_mbpa.MbPA` (a mixin: the state it uses is set up
    in ``MbPA._init_runtime_state``)."""

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
        if (
            len(self._captured) == 1
            and (not gather or self._strategy is None)
            and self._stage_checked(self._captured[0][1], labels)
        ):
            return
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

    def _stage_checked(self, keys: Tensor, labels: Tensor) -> bool:
        """The common training write in one pass: stage a batch the general path would stage
        unchanged, checking it on the way; ``False`` (nothing staged) for anything else.

        The common case: one head call of ``[B, D]`` float32 CPU keys, ``[B]`` int64 CPU labels,
        no label to skip, every example written, no stored inputs, and room in the write buffer
        (the general path allocates and flushes it). The label range and ignore_index checks
        are ``_labels_outside``'s one ``tolist()`` (a negative label, the ignore_index included,
        goes to the general path), the finiteness check is one torch sum (an OpenBLAS ``vdot`` of
        the staged rows, as cheap in a tight loop, made the epochs measurably slower), then two
        numpy slice copies. A batch that fails a check is left to the general path, which
        refuses it with its error or warning.
        """
        buffer, staged_labels = self._pending_keys, self._pending_values
        if (
            buffer is None
            or staged_labels is None
            or not buffer.is_cpu
            or keys.dtype != torch.float32
            or labels.dtype != torch.int64
            or keys.dim() != 2
            or labels.dim() != 1
            or not keys.is_cpu
            or not labels.is_cpu
            or self.write_fraction < 1.0
            or self.store_inputs
        ):
            return False
        n, dim = keys.shape
        start = self._pending_rows
        if n == 0 or labels.shape[0] != n or buffer.shape[1] != dim or start + n > buffer.shape[0]:
            return False
        # the width check of `_check_pairs`: the memory's width, else the one the index took
        memory_dim = self._memory.dim
        if memory_dim != dim and (memory_dim is not None or self._index_checked_dim != dim):
            return False
        if _labels_outside(labels, self._head_out_features() or self._classes_seen) is not None:
            return False
        if not _keys_finite(keys):
            return False
        buffer.numpy()[start : start + n] = keys.numpy()
        staged_labels.numpy()[start : start + n] = labels.numpy()
        self._pending_rows = start + n
        self._pending_sizes.append(n)
        return True

    def _pairs(self, inputs: list[Tensor], labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The ``(keys, labels)`` of every head input that matches the labels.

        A head called several times per step writes every call whose input matches the labels;
        calls that do not match (a head reused on other data) are skipped with a warning, once.
        """
        pairs = [self._pair(batch_inputs, labels) for batch_inputs in inputs]
        kept = [(keys, values) for keys, values in pairs if keys is not None]
        if kept and len(kept) < len(pairs) and not self._warned_unmatched_calls:
            self._warned_unmatched_calls = True
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
            self._add(keys, values, payload)

    def _check_pairs(self, pairs: list[tuple[Tensor, Tensor]], where: str) -> None:
        """Refuse keys whose width differs from the memory's and labels the head cannot predict."""
        # `_memory`, not `memory`: reading the latter would write the staged rows every batch.
        # The width is fixed by the memory (also once cleared), else by the staged rows.
        dim = self._memory.dim
        if dim is None and self._pending_rows:
            assert self._pending_keys is not None
            dim = self._pending_keys.shape[1]
        if dim is None and pairs and self._index_checked_dim != pairs[0][0].shape[1]:
            # the first key fixes the width: an index that cannot take it fails now, not at the
            # first bulk write of the staged rows (an epoch later)
            width = pairs[0][0].shape[1]
            try:
                self._memory.check_dim(width)
            except ValueError as err:
                raise MisconfigurationException(
                    f"MbPA(index={self.index!r}) cannot index the keys of the head "
                    f"{self._head_name!r}, which are {width} wide: {_sentence(err)} Choose an "
                    "index for that width (for 'PQm' and 'IVFn,PQm', m must divide it) or 'Flat'."
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

    def _add(self, keys: Tensor, values: Tensor, payload: dict[str, Tensor] | None = None) -> None:
        """Stage (or, with stored inputs, write) rows that passed every check; under DDP they
        were gathered from every rank already."""
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


def _sentence(err: BaseException) -> str:
    """An error's message ending with a full stop, to be followed by another sentence."""
    text = str(err).rstrip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


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
