"""Eager validation of :class:`~lightning_mbpa.MbPA`'s arguments (configuration errors)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mbpa._checks import check
from lightning_mbpa._drift import REPLAY_SAMPLING
from lightning_mbpa._numbers import is_int, is_real
from lightning_mbpa.adaptation import ADAPTATION_LOSSES, MIN_KERNEL_EPS
from lightning_mbpa.mixture import mixture_weights

STAGES: tuple[str, ...] = ("validate", "test", "predict")
REFRESH: tuple[str, ...] = ("never", "on_test", "epoch_end")


def check_arguments(
    *,
    head: Any,
    memory_size: Any,
    k: Any,
    adaptation_steps: Any,
    adaptation_lr: Any,
    beta: Any,
    kernel_eps: Any,
    adaptation_loss: Any,
    label_key: Any,
    eviction: Any,
    index: Any,
    write_fraction: Any,
    adapt_on: Any,
    online_writes: Any,
    save_memory: Any,
    seed: Any,
    store_inputs: Any,
    refresh_keys: Any,
    refresh_batch_size: Any,
    replay_every_n_steps: Any,
    replay_batch_size: Any,
    replay_sampling: Any,
    base_weight: Any,
    memory_weight: Any,
    memory_temperature: Any,
    write_on_fit: Any,
) -> tuple[str, ...]:
    """Raise a MisconfigurationException naming the first bad argument; returns ``adapt_on`` as
    a tuple of distinct stages."""
    check(
        head is None or (isinstance(head, str) and head != ""),
        "head",
        head,
        "a non-empty dotted module name or None",
    )
    check(is_int(memory_size) and memory_size >= 1, "memory_size", memory_size, "an int >= 1")
    check(is_int(k) and k >= 1, "k", k, "an int >= 1")
    check(
        is_int(adaptation_steps) and adaptation_steps >= 0,
        "adaptation_steps",
        adaptation_steps,
        "an int >= 0",
    )
    check(
        is_real(adaptation_lr) and adaptation_lr >= 0,
        "adaptation_lr",
        adaptation_lr,
        "a finite float >= 0",
    )
    check(is_real(beta) and 0 <= beta <= 1, "beta", beta, "a float in [0, 1]")
    check(
        is_real(kernel_eps) and kernel_eps >= MIN_KERNEL_EPS,
        "kernel_eps",
        kernel_eps,
        f"a finite float >= {MIN_KERNEL_EPS!r} (the smallest normal float32, so that the "
        "weight 1/kernel_eps of an exact match is finite)",
    )
    check(
        isinstance(adaptation_loss, str) and adaptation_loss in ADAPTATION_LOSSES,
        "adaptation_loss",
        adaptation_loss,
        f"one of {list(ADAPTATION_LOSSES)}",
    )
    check(
        label_key is None
        or (isinstance(label_key, (str, int)) and not isinstance(label_key, bool)),
        "label_key",
        label_key,
        "a str, an int or None",
    )
    check(
        eviction in ("fifo", "reservoir", "class_balanced"),
        "eviction",
        eviction,
        "'fifo', 'reservoir' or 'class_balanced'",
    )
    check(
        isinstance(index, str) and index.strip() != "",
        "index",
        index,
        "a faiss index_factory string such as 'Flat' or 'HNSW32'",
    )
    check(
        is_real(write_fraction) and 0 < write_fraction <= 1,
        "write_fraction",
        write_fraction,
        "a float in (0, 1]",
    )
    if isinstance(adapt_on, str):
        adapt_on = (adapt_on,)
    check(
        isinstance(adapt_on, Iterable) and all(stage in STAGES for stage in adapt_on),
        "adapt_on",
        adapt_on,
        f"a list of stages from {list(STAGES)}",
    )
    adapt_on = list(adapt_on)
    check(isinstance(online_writes, bool), "online_writes", online_writes, "a bool")
    check(isinstance(save_memory, bool), "save_memory", save_memory, "a bool")
    check(is_int(seed), "seed", seed, "an int")
    check(isinstance(store_inputs, bool), "store_inputs", store_inputs, "a bool")
    check(refresh_keys in REFRESH, "refresh_keys", refresh_keys, f"one of {list(REFRESH)}")
    check(
        is_int(refresh_batch_size) and refresh_batch_size >= 1,
        "refresh_batch_size",
        refresh_batch_size,
        "an int >= 1",
    )
    check(
        replay_every_n_steps is None
        or (is_int(replay_every_n_steps) and replay_every_n_steps >= 1),
        "replay_every_n_steps",
        replay_every_n_steps,
        "an int >= 1 or None (no replay)",
    )
    check(
        is_int(replay_batch_size) and replay_batch_size >= 1,
        "replay_batch_size",
        replay_batch_size,
        "an int >= 1",
    )
    check(
        isinstance(replay_sampling, str) and replay_sampling in REPLAY_SAMPLING,
        "replay_sampling",
        replay_sampling,
        f"one of {list(REPLAY_SAMPLING)}",
    )
    check(
        len(adapt_on) > 0 or replay_every_n_steps is not None,
        "adapt_on",
        adapt_on,
        f"a non-empty list of stages from {list(STAGES)}, unless replay_every_n_steps is "
        "set (without adaptation or replay nothing reads the memory)",
    )
    # output mixtures and the test-history memory (lightning_mbpa.mixture)
    try:
        mixture_weights(base_weight, memory_weight)
    except ValueError as err:
        raise MisconfigurationException(f"MbPA: {err}") from err
    check(
        memory_temperature is None or (is_real(memory_temperature) and memory_temperature > 0),
        "memory_temperature",
        memory_temperature,
        "a float > 0 (kNN-LM's softmax(-d/τ)) or None (MbPA's kernel weights)",
    )
    check(isinstance(write_on_fit, bool), "write_on_fit", write_on_fit, "a bool")
    for name, value, off in (
        ("refresh_keys", refresh_keys, "'never'"),
        ("replay_every_n_steps", replay_every_n_steps, "None"),
    ):
        if value not in ("never", None) and not store_inputs:
            raise MisconfigurationException(
                f"MbPA(`{name}`={value!r}) needs `store_inputs`=True: it recomputes keys "
                f"from the stored model inputs. Set store_inputs=True or {name}={off}."
            )

    return tuple(dict.fromkeys(adapt_on))
