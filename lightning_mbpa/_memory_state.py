"""An episodic memory as plain tensors, and back: the bodies of
:meth:`~lightning_mbpa.EpisodicMemory.state_dict` and
:meth:`~lightning_mbpa.EpisodicMemory.load_state_dict`.

One idea: the state is the buffers' filled part plus the slot assigner's counters and
generator (and, for class-balanced eviction, each entry's write count), so a restored memory
continues exactly as the saved one would. The checks live in
:func:`~lightning_mbpa._memory_checks.check_state`.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_mbpa._eviction import SlotAssigner
from lightning_mbpa._memory_checks import INSERTED_KEY, PAYLOAD_KEY, CheckedState
from lightning_mbpa._storage import KeyStore


def memory_state(store: KeyStore, slots: SlotAssigner, capacity: int) -> dict[str, Any]:
    """The filled part of ``store`` and the counters of ``slots`` as compact tensor copies."""
    size = store.size
    keys = torch.empty(0, 0) if store.keys is None else store.keys[:size].clone()
    values = (
        torch.empty(0, dtype=torch.int64, device=store.device)
        if store.values is None
        else store.values[:size].clone()
    )
    state: dict[str, Any] = {
        "keys": keys,
        "values": values,
        "capacity": torch.tensor(capacity, dtype=torch.int64),
        "dim": torch.tensor(-1 if store.dim is None else store.dim, dtype=torch.int64),
        "cursor": torch.tensor(slots.cursor, dtype=torch.int64),
        "num_seen": torch.tensor(slots.num_seen, dtype=torch.int64),
        "generator_state": slots.generator.get_state(),
    }
    if store.payload is not None:
        state[PAYLOAD_KEY] = {name: t[:size].clone() for name, t in store.payload.items()}
    if slots.inserted is not None:
        state[INSERTED_KEY] = torch.from_numpy(slots.inserted[:size].copy())
    return state


def check_class_balanced_state(checked: CheckedState, eviction: str) -> None:
    """A class-balanced memory needs the write count of each saved entry."""
    if eviction == "class_balanced" and checked.size and checked.inserted is None:
        raise ValueError(
            f"`state[{INSERTED_KEY!r}]` is missing: a memory with eviction='class_balanced' "
            "needs the write count of each entry (the state of a 'fifo' or 'reservoir' "
            "memory does not have it)."
        )


def restore_state(store: KeyStore, slots: SlotAssigner, checked: CheckedState) -> None:
    """Puts a checked state into ``slots`` and (allocated for its width) ``store``."""
    slots.restore(
        checked.num_seen,
        checked.generator,
        checked.values.cpu().numpy(),
        None if checked.inserted is None else checked.inserted.cpu().numpy(),
    )
    store.load(None, checked.size, checked.keys, checked.values, checked.payload)
