"""The writer of :class:`~lightning_mbpa.MbPA`: what reaches the episodic memory, and how.

A forward pre-hook on the head captures its input ``h = f(x)``; after each training step (and,
with ``online_writes``, each test step) the captured inputs are paired with the batch's labels,
checked once (key width, label range, finite values; under DDP on the rows gathered from every
rank, so all ranks refuse the same batches) and staged in a small buffer that reaches the
:class:`~lightning_mbpa.EpisodicMemory` in bulk. A bad batch is refused when it arrives, before
anything of it is staged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mbpa._checks import (
    IGNORE_INDEX,
    finite_rows,
    keys_finite,
    labels_outside,
    sentence,
)
from lightning_mbpa._head import HeadBinding
from lightning_mbpa.memory import EXACT_INDEX, EpisodicMemory

# Training writes are staged in a buffer of about this size and written to the memory in bulk.
_WRITE_BUFFER_BYTES = 1 << 20

#: ``payload_of(head_inputs, labels, calls) -> stored inputs or None`` (see ``Drift.payload``).
PayloadOf = Callable[[Tensor, Tensor, int], "dict[str, Tensor] | None"]
#: ``(keys [N, D], labels [N], (min, max) of the labels if known to be >= 0)``.
_Pair = tuple[Tensor, Tensor, "tuple[int, int] | None"]


def generator_state_bytes(generator: torch.Generator) -> bytes:
    """A generator's state as bytes (picklable without torch's tensor sharing)."""
    return generator.get_state().numpy().tobytes()


def generator_from_bytes(state: bytes) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


class Writer:
    """Captures the head's inputs and writes them with their labels to the memory.

    Attributes:
        target: The memory writes go to (the callback's ``memory``).
        generator: Chooses the written rows under ``write_fraction`` (checkpointed).
        refused_batches, refused_rows: Batches (and their rows) refused for non-finite keys.
        capturing: Whether the capture hooks record the head's inputs now.
        captured: ``(module, head input)`` of every capture since the batch started.
        discovering: The hooks sit on every ``nn.Linear`` until the head is found.
        head_has_run: The head ran in a training step written so far: a later step that does
            not call it is skipped (:meth:`skipped_training_step`), not refused.

    Everything but ``target``, ``generator`` and the refusal counts is transient.
    """

    def __init__(self, target: EpisodicMemory, head: HeadBinding, seed: int) -> None:
        self.head = head
        self.target = target
        self.generator = torch.Generator().manual_seed(seed)
        self.refused_batches = 0
        self.refused_rows = 0
        self._init_transient()

    def _init_transient(self) -> None:
        self.capturing = False
        self.captured: list[tuple[nn.Module, Tensor]] = []
        self.discovering = False
        self.head_has_run = False
        self._handles: list[RemovableHandle] = []
        self._warnings = WarningCache()
        self._warned_unmatched_calls = False  # head calls skipped for not matching the labels
        self._index_checked_dim: int | None = None  # key width the index was checked to take
        # The staging buffer: rows of `len(_sizes)` batches, written in bulk by `flush`.
        self._keys: Tensor | None = None
        self._values: Tensor | None = None
        self._rows = 0
        self._sizes: list[int] = []

    # ---- pickling and checkpoints
    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        return {
            "head": self.head,
            "generator": generator_state_bytes(self.generator),
            "refused_batches": self.refused_batches,
            "refused_rows": self.refused_rows,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.head = state["head"]
        self.generator = generator_from_bytes(state["generator"])
        self.refused_batches = state["refused_batches"]
        self.refused_rows = state["refused_rows"]
        self._init_transient()
        # `target` is given back by the owner (`rebind`)

    def rebind(self, target: EpisodicMemory, head: HeadBinding) -> None:
        """Write to ``target`` from now on (what was staged goes to the previous target)."""
        if getattr(self, "target", None) is not None and self._sizes:
            self.flush()
        self.target, self.head = target, head
        self._index_checked_dim = None

    @property
    def staged_rows(self) -> int:
        """Rows staged and not yet written to the memory."""
        return self._rows

    # ---- the capture hooks (registered and removed here only)
    def install(self, model: nn.Module) -> None:
        """Capture the head's inputs (every ``nn.Linear``'s while the head is unknown)."""
        if self._handles:
            return
        self.head.bind_named(model, self.target.dim)
        if self.head.module is not None:
            candidates = [self.head.module]
            self.discovering = False
        else:
            candidates = [
                sub for name, sub in model.named_modules() if isinstance(sub, nn.Linear) and name
            ]
            self.discovering = True
        for candidate in candidates:
            self._handles.append(candidate.register_forward_pre_hook(self._capture))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.capturing = False

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def start_batch(self, capturing: bool = True) -> None:
        self.captured.clear()
        self.capturing = capturing

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing captured while the callback itself runs the model."""
        capturing, self.capturing = self.capturing, False
        try:
            yield
        finally:
            self.capturing = capturing

    def end_batch(self) -> None:
        self.capturing = False
        self.captured.clear()

    @torch.compiler.disable
    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.capturing and args and isinstance(args[0], Tensor):
            self.captured.append((module, args[0].detach()))

    def finish_discovery(self, model: nn.Module) -> None:
        """After the first captured batch, the last Linear that ran is the head."""
        if not self.discovering or not self.captured:
            return
        head = self.captured[-1][0]
        name = self.head.found(model, head)
        self.captured = [(m, x) for m, x in self.captured if m is head]
        self.remove()
        self.install(model)
        self.head.check_width(self.target.dim)
        rank_zero_info(
            f"MbPA: using `{name}` (the last nn.Linear in the forward pass) as the head."
        )

    def discover_with_forward(self, model: nn.Module, inputs: Any) -> None:
        """A memory exists (e.g. loaded by hand) but the head was never seen: one dry forward."""
        self.install(model)
        self.capturing = True
        try:
            with torch.no_grad():
                model(inputs)
            self.finish_discovery(model)
        finally:
            self.end_batch()
            self.remove()
        if self.head.module is None:
            raise MisconfigurationException(
                "MbPA(head=None): no nn.Linear ran in the forward pass, so the head cannot be "
                "found. Name it with `head=...`."
            )
        self.head.check_width(self.target.dim)

    # ---- writing
    def write_captured(
        self,
        labels: Tensor,
        where: str,
        *,
        fraction: float,
        strategy: Any,
        describe_batch: Callable[[], str],
        payload_of: PayloadOf | None,
        inputs: list[Tensor] | None = None,
        required: bool = True,
    ) -> None:
        """Write a batch's head inputs (the captured ones unless ``inputs`` is given) with its
        labels, or nothing of it: every check runs first, on the batch that carries the data.
        Head inputs that do not match the labels are an error if ``required``, else skipped.

        Under DDP (``strategy`` given) the checks run on the rows gathered from every rank, so
        every rank refuses the same batches and the collectives stay matched.
        """
        if inputs is None:
            inputs = [x for _, x in self.captured]
        pairs = self._pairs(inputs, labels)
        if not pairs:
            if not required:
                return
            shapes = [tuple(x.shape) for x in inputs]
            raise MisconfigurationException(
                f"MbPA: the labels of the {where} (shape {tuple(labels.shape)}) do not match the "
                f"inputs of the head {self.head.name!r} (shapes {shapes}): need one label per "
                f"head input row ([B, D] with [B] labels, or [B, T, D] with [B, T]). The batch "
                f"contains {describe_batch()}."
            )
        payload = None if payload_of is None else payload_of(inputs[0], labels, len(inputs))
        if strategy is not None:
            if payload is None:
                gathered = [_gather(strategy, keys.float(), values) for keys, values, _ in pairs]
                pairs = [(keys, values, None) for keys, values in gathered]
            else:  # stored inputs: exactly one pair, gathered with its inputs
                ((keys, values, _),) = pairs
                keys, values, *rows = _gather(strategy, keys.float(), values, *payload.values())
                pairs, payload = [(keys, values, None)], dict(zip(payload, rows, strict=True))
        self._check_pairs(pairs, where)
        if not all(keys_finite(keys) for keys, _, _ in pairs):
            self._refuse(pairs, where)
            return
        for keys, values, _ in pairs:
            self._add(keys, values, fraction, payload)

    def skipped_training_step(self) -> bool:
        """A training step that did not call the head after the head ran in earlier steps.

        A ``training_step`` returning ``None`` (Lightning then skips the optimizer step) or one
        that trains another part of the model for a batch has nothing to write; only a head that
        never ran is a misconfiguration (:meth:`require_captured`).
        """
        return not self.captured and self.head_has_run

    def require_captured(self, where: str) -> None:
        """Raise unless the head's inputs were captured while processing the batch."""
        if not self.captured:
            if self.head.name is None:
                raise MisconfigurationException(
                    f"MbPA(head=None): no nn.Linear ran while processing the {where}, so the head "
                    "cannot be found. Name the module your forward pass ends with via `head=...`."
                )
            raise MisconfigurationException(
                f"MbPA: the head {self.head.name!r} was not called while processing the {where}, "
                "so there is nothing to write to memory. Name the module your forward pass ends "
                "with via `head=...`."
            )

    def _pairs(self, inputs: list[Tensor], labels: Tensor) -> list[_Pair]:
        """The ``(keys, labels, label range)`` of every head input that matches the labels,
        without the rows labelled ``IGNORE_INDEX``.

        A head called several times per step writes every call whose input matches the labels;
        calls that do not match (a head reused on other data) are skipped with a warning, once.
        """
        kept = []
        lead = labels.shape
        for batch_inputs in inputs:
            if batch_inputs.dim() < 2 or batch_inputs.shape[:-1] != lead:
                continue
            keys = batch_inputs if batch_inputs.dim() == 2 else batch_inputs.flatten(0, -2)
            values = labels if labels.dim() == 1 else labels.reshape(-1)
            if not (values.is_cpu and keys.is_cpu) and values.device != keys.device:
                values = values.to(keys.device)
            bounds = None
            if values.is_cpu and 0 < values.numel() <= 1024 and not values.is_floating_point():
                # every batch: one `tolist()` gives the ignore_index and the range checks
                listed = values.tolist()
                low = min(listed)
                if low >= 0:
                    bounds = (low, max(listed))
            if bounds is None:
                keep = values != IGNORE_INDEX
                if not bool(keep.all()):
                    keys, values = keys[keep], values[keep]
            kept.append((keys, values, bounds))
        if kept and len(kept) < len(inputs) and not self._warned_unmatched_calls:
            self._warned_unmatched_calls = True
            shapes = [tuple(x.shape) for x in inputs]
            self._warnings.warn(
                f"MbPA: the head {self.head.name!r} ran {len(inputs)} times in one step with "
                f"inputs of shapes {shapes}; only the {len(kept)} call(s) whose rows match the "
                f"labels (shape {tuple(labels.shape)}) are written to memory. If that is not "
                "what you want, name the module whose inputs match the labels with `head=...`.",
                category=UserWarning,
            )
        return kept

    def _check_pairs(self, pairs: list[_Pair], where: str) -> None:
        """Refuse keys whose width differs from the memory's and labels the head cannot predict."""
        # The width is fixed by the memory (also once cleared), else by the staged rows.
        dim = self.target.dim
        if dim is None and self._rows:
            assert self._keys is not None
            dim = self._keys.shape[1]
        if dim is None and pairs and self._index_checked_dim != pairs[0][0].shape[1]:
            # the first key fixes the width: an index that cannot take it fails now, not at the
            # first bulk write of the staged rows (an epoch later)
            width = pairs[0][0].shape[1]
            try:
                self.target.check_dim(width)
            except ValueError as err:
                raise MisconfigurationException(
                    f"MbPA(index={self.target.index_string!r}) cannot index the keys of the head "
                    f"{self.head.name!r}, which are {width} wide: {sentence(err)} Choose an "
                    "index for that width (for 'PQm' and 'IVFn,PQm', m must divide it) or 'Flat'."
                ) from err
            self._index_checked_dim = width
        classes = self.head.classes()
        high = None if classes is None else (2 if classes == 1 else classes)
        for keys, values, bounds in pairs:
            dim = keys.shape[1] if dim is None else dim
            if keys.shape[1] != dim:
                raise MisconfigurationException(
                    f"MbPA: the head {self.head.name!r} was called with inputs of width "
                    f"{keys.shape[1]} in the {where}, but the memory holds keys of width {dim}. "
                    "MbPA needs a head with a fixed input width: name such a module with "
                    "`head=...`."
                )
            if bounds is not None and (high is None or bounds[1] < high):
                continue  # non-negative and in range (from `_pairs`' one `tolist()`)
            problem = labels_outside(values, classes)
            if problem is not None:
                raise ValueError(
                    f"MbPA: the labels of the {where} must be {problem[0]} for the head "
                    f"{self.head.name!r}, or {IGNORE_INDEX} to skip a row; got {problem[1]}. "
                    "Fix the labels, or name the module that outputs one logit per class with "
                    "`head=...`."
                )

    def _refuse(self, pairs: list[_Pair], where: str) -> None:
        count = sum(int((~finite_rows(keys)).sum()) for keys, _, _ in pairs)
        total = sum(keys.shape[0] for keys, _, _ in pairs)
        self.refused_batches += 1
        self.refused_rows += count
        self._warnings.warn(
            f"MbPA: refused a {where}: {count} of its {total} head inputs hold NaN or "
            f"infinite values, so nothing of it was written to memory ({self.refused_batches} "
            f"batches, {self.refused_rows} rows refused so far). Non-finite embeddings "
            "usually mean training diverged: lower the learning rate or clip gradients.",
            category=UserWarning,
        )

    def _add(
        self,
        keys: Tensor,
        values: Tensor,
        fraction: float,
        payload: dict[str, Tensor] | None,
    ) -> None:
        """Stage (or, with stored inputs, write) rows that passed every check; under DDP they
        were gathered from every rank already."""
        if fraction < 1.0 and keys.shape[0] > 0:
            # after the gather, so every rank makes the same choice from the same generator
            chosen = torch.rand(keys.shape[0], generator=self.generator) < fraction
            chosen = chosen.to(keys.device)
            keys, values = keys[chosen], values[chosen]
            if payload is not None:
                payload = {name: t[chosen.to(t.device)] for name, t in payload.items()}
        if keys.shape[0] == 0:
            return
        if payload is not None:  # stored inputs (store_inputs=True) are written unstaged
            self.flush()
            self.target.add(keys.float(), values, payload)
            return
        self.stage(keys, values)

    def stage(self, keys: Tensor, values: Tensor) -> None:
        """Copy checked rows into the write buffer (about 1 MiB of float32 keys), which is
        written to the memory in bulk when full. The copy is made now, so nothing of the batch
        is held on to; a batch as large as the buffer is written directly."""
        n, dim = keys.shape
        buffer, start = self._keys, self._rows
        if (  # the common case: CPU float32 rows that fit in the allocated buffer
            buffer is not None
            and buffer.is_cpu
            and keys.is_cpu
            and values.is_cpu
            and keys.dtype == torch.float32
            and buffer.shape[1] == dim
            and start + n <= buffer.shape[0]
            and n * dim * 4 < _WRITE_BUFFER_BYTES
        ):
            assert self._values is not None
            # numpy slice assignment: a few µs less per batch than two torch copies
            buffer.numpy()[start : start + n] = keys.numpy()
            self._values.numpy()[start : start + n] = values.numpy()
            self._rows += n
            self._sizes.append(n)
            return
        if n * dim * 4 >= _WRITE_BUFFER_BYTES:
            self.flush()
            self._write(keys, values, [n])
            return
        buffer = self._keys
        if (
            buffer is None
            or buffer.shape[1] != dim
            or buffer.device != keys.device
            or self._rows + n > buffer.shape[0]
        ):
            self.flush()
            if buffer is None or buffer.shape[1] != dim or buffer.device != keys.device:
                rows = _WRITE_BUFFER_BYTES // (4 * dim)
                with torch.inference_mode(False):  # online writes happen under inference mode
                    self._keys = keys.new_empty((rows, dim), dtype=torch.float32)
                    self._values = values.new_empty((rows,), dtype=torch.int64)
        assert self._keys is not None and self._values is not None
        start = self._rows
        self._keys[start : start + n].copy_(keys)
        self._values[start : start + n].copy_(values)
        self._rows += n
        self._sizes.append(n)

    def flush(self) -> None:
        """Write the staged rows to the memory."""
        rows, sizes = self._rows, self._sizes
        if not sizes:
            return
        self._rows, self._sizes = 0, []
        assert self._keys is not None and self._values is not None
        self._write(self._keys[:rows], self._values[:rows], sizes)

    def release(self) -> None:
        """Write what is staged and free the buffer (end of a run)."""
        self.flush()
        self._keys = self._values = None

    def _write(self, keys: Tensor, values: Tensor, sizes: list[int]) -> None:
        """Writes rows staged by ``len(sizes)`` batches (``sizes`` rows each).

        One ``add`` for all of them, which leaves the memory exactly as one ``add`` per batch
        would (FIFO and reservoir slots follow the row order). An approximate index gets one
        ``add`` per batch, since when it trains and compacts depends on those boundaries. If a
        write is refused, the batches before the refused one are written and its error is
        raised, as without the buffer.
        """
        memory = self.target
        if len(sizes) > 1 and memory.index_string == EXACT_INDEX:
            try:
                memory.add(keys, values)
                return
            except ValueError:
                pass  # nothing was written: find the refused batch below
        start = 0
        for n in sizes:
            memory.add(keys[start : start + n], values[start : start + n])
            start += n


def _gather(strategy: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Rows of every rank (keys, labels, stored inputs), in rank order, so all ranks hold the
    same memory. Collectives run on every rank; batches of different sizes are padded."""
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
