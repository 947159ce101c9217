"""The writer of :class:`~lightning_mbpa.MbPA`: what reaches the episodic memory, and how.

A forward pre-hook on the head captures its input ``h = f(x)``; after each training step (and,
with ``online_writes``, each test step) the captured inputs are paired with the batch's labels,
checked once (key width, label range, finite values; under DDP on the rows gathered from every
rank, so all ranks refuse the same batches) and written to the
:class:`~lightning_mbpa.EpisodicMemory` at once: the memory checks each row once
(:meth:`~lightning_mbpa.EpisodicMemory.check_rows`) and writes the checked rows without a second
look (:meth:`~lightning_mbpa.EpisodicMemory.add_checked`). A bad batch fails or is refused when it
arrives, before anything of it is written, and nothing is held back: the memory holds every
finished batch whenever anyone reads, saves or pickles it.
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
    labels_outside,
    sentence,
)
from lightning_mbpa._head import HeadBinding
from lightning_mbpa.memory import CheckedRows, EpisodicMemory

#: ``payload_of(head_inputs, labels, calls) -> stored inputs or None`` (see ``Drift.payload``).
PayloadOf = Callable[[Tensor, Tensor, int], "dict[str, Tensor] | None"]


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

    # ---- pickling and checkpoints
    def __getstate__(self) -> dict[str, Any]:
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
        """Write to ``target`` from now on."""
        self.target, self.head = target, head
        self._index_checked_dim = None

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

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():  # traced by dynamo: leave the graph for the capture
            self._capture_outside_graph(module, args)
        elif self.capturing and args and isinstance(args[0], Tensor):
            self.captured.append((module, args[0].detach()))

    @torch.compiler.disable
    def _capture_outside_graph(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # the disabled function's wrapper costs microseconds per call: compiled models only
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

        The memory checks the rows once (:meth:`EpisodicMemory.check_rows`); this adds what only
        the callback knows (the head's classes, the ignore label, refusing non-finite batches)
        and writes the checked rows without a second look (:meth:`EpisodicMemory.add_checked`).
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
                gathered = [_gather(strategy, keys.float(), values) for keys, values in pairs]
                pairs = [(keys, values) for keys, values in gathered]
            else:  # stored inputs: exactly one pair, gathered with its inputs
                ((keys, values),) = pairs
                keys, values, *leaves = _gather(strategy, keys.float(), values, *payload.values())
                pairs, payload = [(keys, values)], dict(zip(payload, leaves, strict=True))
        checked = self._check(pairs, payload, where)
        for rows in checked:
            if not rows.finite:
                self._refuse(checked, where)
                return
        for rows in checked:
            self._add(rows, fraction)

    def write_common(self, labels: Tensor | None, fraction: float) -> bool:
        """Writes a batch in one pass when it is the common case (one captured head input
        ``[N, D]`` with ``N`` labels, every row written, no payload or gather, and nothing that
        any check would refuse or raise for; see :meth:`EpisodicMemory.append_if_valid`).
        Returns False, having changed nothing, for anything else: then :meth:`write_captured`
        checks and writes it."""
        captured = self.captured
        if labels is None or fraction != 1.0 or len(captured) != 1:
            return False
        below = _labels_below(self.head.classes())
        return self.target.append_if_valid(captured[0][1], labels, below)

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

    def _pairs(self, inputs: list[Tensor], labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The ``(keys [N, D], labels [N])`` of every head input that matches the labels.

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
            kept.append((keys, values))
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

    def _check(
        self, pairs: list[tuple[Tensor, Tensor]], payload: dict[str, Tensor] | None, where: str
    ) -> list[CheckedRows]:
        """The memory's checked rows of every pair, without the rows labelled ``IGNORE_INDEX``;
        refuses keys whose width differs from the memory's and labels the head cannot predict."""
        memory = self.target
        dim = memory.dim
        if dim is None and self._index_checked_dim != pairs[0][0].shape[1]:
            # the first key fixes the width: an index that cannot take it fails with the
            # head's name in the message
            width = pairs[0][0].shape[1]
            try:
                memory.check_dim(width)
            except ValueError as err:
                raise MisconfigurationException(
                    f"MbPA(index={memory.index_string!r}) cannot index the keys of the head "
                    f"{self.head.name!r}, which are {width} wide: {sentence(err)} Choose an "
                    "index for that width (for 'PQm' and 'IVFn,PQm', m must divide it) or 'Flat'."
                ) from err
            self._index_checked_dim = width
        classes = self.head.classes()
        high = _labels_below(classes)
        checked = []
        for keys, values in pairs:
            dim = keys.shape[1] if dim is None else dim
            if keys.shape[1] != dim:
                raise MisconfigurationException(
                    f"MbPA: the head {self.head.name!r} was called with inputs of width "
                    f"{keys.shape[1]} in the {where}, but the memory holds keys of width {dim}. "
                    "MbPA needs a head with a fixed input width: name such a module with "
                    "`head=...`."
                )
            rows = memory.check_rows(keys, values, payload)
            if rows.low < 0:  # the rows to skip, or labels no head can predict
                keep = rows.values != IGNORE_INDEX
                if not bool(keep.all()):
                    rows = rows.select(keep)
            if rows.low < 0 or (high is not None and rows.high >= high):
                problem = labels_outside(rows.values, classes)
                assert problem is not None
                raise ValueError(
                    f"MbPA: the labels of the {where} must be {problem[0]} for the head "
                    f"{self.head.name!r}, or {IGNORE_INDEX} to skip a row; got {problem[1]}. "
                    "Fix the labels, or name the module that outputs one logit per class with "
                    "`head=...`."
                )
            checked.append(rows)
        return checked

    def _refuse(self, checked: list[CheckedRows], where: str) -> None:
        count = sum(int((~finite_rows(rows.keys)).sum()) for rows in checked)
        total = sum(len(rows) for rows in checked)
        self.refused_batches += 1
        self.refused_rows += count
        self._warnings.warn(
            f"MbPA: refused a {where}: {count} of its {total} head inputs hold NaN or "
            f"infinite values, so nothing of it was written to memory ({self.refused_batches} "
            f"batches, {self.refused_rows} rows refused so far). Non-finite embeddings "
            "usually mean training diverged: lower the learning rate or clip gradients.",
            category=UserWarning,
        )

    def _add(self, rows: CheckedRows, fraction: float) -> None:
        """Write rows that passed every check (under DDP gathered from every rank already),
        the ``fraction`` of them chosen by the writer's generator."""
        if fraction < 1.0 and len(rows) > 0:
            # after the gather, so every rank makes the same choice from the same generator
            rows = rows.select(torch.rand(len(rows), generator=self.generator) < fraction)
        if len(rows):
            self.target.append_checked(rows)


def _labels_below(classes: int | None) -> int | None:
    """A head with ``classes`` outputs predicts the labels ``[0, this)`` (None: unknown). A
    single output is a binary head: labels 0 and 1."""
    return None if classes is None else (2 if classes == 1 else classes)


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
