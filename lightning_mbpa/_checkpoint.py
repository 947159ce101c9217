"""Writing and reading :class:`~lightning_mbpa.MbPA` checkpoints, and building its memory.

A checkpoint's MbPA entry is checked against the model and the callback's memory before
anything changes (:func:`read_checkpoint`), so a refused checkpoint leaves everything as it was.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa._checks import labels_outside
from lightning_mbpa._drift import Drift
from lightning_mbpa._head import HeadBinding
from lightning_mbpa.memory import EpisodicMemory

if TYPE_CHECKING:
    from lightning_mbpa.callback import MbPA

#: The arguments that build a memory when ``MbPA(memory=None)``, with their defaults.
CONVENIENCE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("memory_size", 100_000),
    ("eviction", "fifo"),
    ("index", "Flat"),
)


@dataclass
class SavedState:
    """A checkpoint's MbPA entry, checked: what ``MbPA.load_state_dict`` applies."""

    memory_state: dict[str, Any]
    head_module: nn.Module | None
    head_name: str | None
    write_generator: torch.Generator | None
    replay_generator: torch.Generator | None
    inputs_structure: Any


def checkpoint_entry(cb: MbPA) -> dict[str, Any]:
    """The callback's checkpoint entry: plain tensors and primitives (``weights_only=True``);
    empty with ``save_memory=False``."""
    if not cb.save_memory:
        return {}
    return {
        "memory": cb.memory.state_dict(),
        "memory_config": cb._memory.config,
        "head": cb._head.name,
        "write_generator": cb._writer.generator.get_state(),
        "replay_generator": cb._drift.replay_generator.get_state(),
        "inputs_structure": cb._drift.inputs_structure,
    }


def restore_checkpoint(cb: MbPA, state_dict: dict[str, Any]) -> None:
    """Restore a checkpoint entry; everything is checked before anything changes. Nothing is
    restored with ``save_memory=False`` or from an empty entry."""
    if not cb.save_memory or not state_dict:
        return
    module = cb._module_ref() if cb._module_ref is not None else None
    saved = read_checkpoint(
        state_dict,
        cb._head,
        configured_head=cb.head,
        model=module,
        capacity=cb._memory.capacity,
        store_inputs=cb.store_inputs,
    )
    try:
        cb.memory.load_state_dict(saved.memory_state)  # validates everything before mutating
    except ValueError as err:
        raise MisconfigurationException(
            f"MbPA: cannot restore the memory from the checkpoint: {err}"
        ) from err
    cb._head.module, cb._head.name = saved.head_module, saved.head_name
    if saved.write_generator is not None:
        cb._writer.generator = saved.write_generator
    if saved.replay_generator is not None:
        cb._drift.replay_generator = saved.replay_generator
    cb._adapter.invalidate()
    cb._drift.inputs_structure = saved.inputs_structure if cb.store_inputs else None


def state_key(cb: MbPA) -> str:
    """``MbPA.state_key``: Lightning reads it for every hook call of every callback, so the
    string is built once per head."""
    cached = cb.__dict__.get("_state_key_for")
    if cached is None or cached[0] != cb.head:
        cached = cb.__dict__["_state_key_for"] = (cb.head, cb._generate_state_key(head=cb.head))
    return str(cached[1])


def pickled_state(cb: MbPA) -> dict[str, Any]:
    """The callback's pickled state: everything but the run it is attached to, with the memory
    as bytes, not tensors: torch's multiprocessing pickler (ddp_spawn) would share tensors
    through file descriptors, which fails for empty ones."""
    state = {k: v for k, v in cb.__dict__.items() if k not in ("_module_ref", "_strategy")}
    buffer = io.BytesIO()
    torch.save({"config": cb._memory.config, "state": cb._memory.state_dict()}, buffer)
    state["_memory"] = buffer.getvalue()
    return state


def replace_memory(cb: MbPA, memory: EpisodicMemory) -> None:
    """The ``MbPA.memory`` setter: the callback's parts follow the new memory."""
    if not isinstance(memory, EpisodicMemory):
        raise MisconfigurationException(
            f"MbPA.memory must be an EpisodicMemory; got {type(memory).__name__}."
        )
    cb._writer.rebind(memory, cb._head)
    cb._memory = memory
    cb._adapter.invalidate()


def unpickle(cb: MbPA, state: dict[str, Any]) -> None:
    """Restore the callback from :func:`pickled_state`."""
    state = dict(state)
    saved = torch.load(io.BytesIO(state.pop("_memory")), weights_only=True)
    cb.__dict__.update(state)
    cb._init_transient()
    cb._memory = EpisodicMemory(**saved["config"])
    cb._memory.load_state_dict(saved["state"])
    cb._writer.rebind(cb._memory, cb._head)


def read_checkpoint(
    state_dict: dict[str, Any],
    binding: HeadBinding,
    *,
    configured_head: str | None,
    model: nn.Module | None,
    capacity: int,
    store_inputs: bool,
) -> SavedState:
    """Check a checkpoint's MbPA entry against the head, the model and the memory's capacity;
    raises ``MisconfigurationException`` for anything that does not fit."""
    saved_head = state_dict.get("head")
    if saved_head is not None and not (isinstance(saved_head, str) and saved_head):
        raise MisconfigurationException(
            f"MbPA: the checkpoint's MbPA 'head' entry is {saved_head!r}, not a module name; "
            "the checkpoint is corrupted or was written by another callback."
        )
    if configured_head is not None and saved_head is not None and saved_head != configured_head:
        raise MisconfigurationException(
            f"MbPA(head={configured_head!r}): the checkpoint's memory was written from head "
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
    head, head_name = binding.module, binding.name
    if saved_head is not None and (head is None or saved_head != head_name):
        head_name = saved_head  # the memory's keys are this module's inputs
        head = None
        if model is not None:
            try:
                head = HeadBinding.resolve(model, saved_head)
            except MisconfigurationException as err:
                raise MisconfigurationException(
                    f"MbPA: the checkpoint's memory was written from head {saved_head!r}, "
                    f"which this model lacks. {err}"
                ) from err
    keys, values = memory_state.get("keys"), memory_state.get("values")
    if isinstance(keys, Tensor) and keys.dim() == 2 and keys.shape[0] > 0:
        binding.check_width(keys.shape[1], head, head_name)
    problem = (
        labels_outside(values, binding.out_features(head))
        if isinstance(values, Tensor) and not values.is_floating_point()
        else None
    )
    if problem is not None:
        raise MisconfigurationException(
            f"MbPA: the checkpoint's memory holds labels {problem[1]}, but the head "
            f"{head_name!r} needs {problem[0]}; it was written by another model or is "
            "corrupted. Use a fresh MbPA callback with `save_memory=False` to ignore it."
        )
    saved_capacity = memory_state.get("capacity")
    if (
        isinstance(saved_capacity, Tensor)
        and saved_capacity.numel() == 1
        and int(saved_capacity) != capacity
    ):
        raise MisconfigurationException(
            f"MbPA(memory_size={capacity}): the checkpoint's memory has capacity "
            f"{int(saved_capacity.item())}; use memory_size={int(saved_capacity.item())} to restore it "
            "(or a memory of that capacity), or save_memory=False to ignore it."
        )
    structure = state_dict.get("inputs_structure")
    memory_state = Drift.checked_memory_state(memory_state, structure, store_inputs)
    return SavedState(memory_state, head, head_name, write_generator, replay_generator, structure)


def build_memory(
    memory: EpisodicMemory | None, memory_size: int, eviction: str, index: str, seed: int
) -> EpisodicMemory:
    """The callback's memory: ``memory`` itself, or one built from the convenience arguments."""
    if memory is not None:
        if not isinstance(memory, EpisodicMemory):
            raise MisconfigurationException(
                f"MbPA(`memory`={memory!r}) is invalid: expected an EpisodicMemory or None."
            )
        given = {"memory_size": memory_size, "eviction": eviction, "index": index}
        clashes = [name for name, default in CONVENIENCE_DEFAULTS if given[name] != default]
        if clashes:
            named = ", ".join(f"`{name}`={given[name]!r}" for name in clashes)
            raise MisconfigurationException(
                f"MbPA(`memory`=EpisodicMemory(...), {named}): give the memory's settings in one "
                f"place; {named} only build a memory when `memory` is None. Set them on the "
                "EpisodicMemory (capacity, eviction, index) or leave `memory` out."
            )
        return memory
    try:
        return EpisodicMemory(capacity=memory_size, eviction=eviction, index=index, seed=seed)  # type: ignore[arg-type]
    except ValueError as err:
        raise MisconfigurationException(f"MbPA: {err}") from err


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
