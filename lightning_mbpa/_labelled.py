"""Labelled batches for :class:`~lightning_mbpa.MbPA`: finding their labels, and writing
training batches, the batches of ``populate()`` and, with ``online_writes``, test batches after
they were predicted; at the end of each evaluation batch, the metrics on its labels.

The callback's extension points (``extract_labels``, ``extract_inputs``) find the labels and
inputs; its writer checks and stages the rows; with ``store_inputs`` its drift part slices the
inputs stored with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mbpa._checks import sentence
from lightning_mbpa.batches import as_label_tensor, describe, find_label_name, get_item

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_mbpa.callback import MbPA


def extract_labels(batch: Any, label_key: str | int | None) -> Tensor | None:
    """The integer class labels of a batch, or ``None`` if it has none (the default
    ``MbPA.extract_labels``).

    Raises:
        MisconfigurationException: ``label_key`` names an item the batch does not have.
        ValueError: the labels found are not one integer class index per example.
    """
    if label_key is None and type(batch) in (list, tuple) and len(batch) >= 2:
        # the common `(x, y)` batch, looked up as below without the generic look-up's cost
        labels = batch[1]
        if type(labels) is Tensor and labels.dtype == torch.int64 and labels.dim() == 1:
            return labels
    name = find_label_name(batch, label_key)
    if name is None:
        return None
    try:
        labels = get_item(batch, name)
    except KeyError:
        if label_key is not None:
            raise MisconfigurationException(
                f"MbPA(label_key={label_key!r}): the batch has no such item; it contains "
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


def write_batch(cb: MbPA, batch: Any, where: str, strategy: Any) -> None:
    """Write the head inputs captured for ``batch`` with its labels; a batch without labels is a
    configuration error."""
    cb._writer.require_captured(where)
    write_found(cb, batch, cb.extract_labels(batch), where, strategy)


def write_found(cb: MbPA, batch: Any, labels: Tensor | None, where: str, strategy: Any) -> None:
    """:func:`write_batch` with the labels ``extract_labels`` found (None: an error)."""
    if labels is None:
        raise MisconfigurationException(
            f"MbPA: cannot find labels in the {where}: it contains {describe(batch)}. "
            f"Labels are looked for as a tuple's second element or under the keys/attributes "
            f"y, label, labels, target, targets. Set `label_key=...` or override "
            f"`MbPA.extract_labels`."
        )
    write_labelled(cb, batch, labels, where, strategy)


def write_labelled(
    cb: MbPA,
    batch: Any,
    labels: Tensor,
    where: str,
    strategy: Any,
    inputs: list[Tensor] | None = None,
    required: bool = True,
) -> None:
    """Write ``labels`` with the captured head inputs (or ``inputs``), and the batch's model
    inputs with them under ``store_inputs``."""
    payload_of = None
    if cb.store_inputs:

        def payload_of(head_inputs: Tensor, labels: Tensor, calls: int) -> dict[str, Tensor]:
            return cb._drift.payload(
                cb.extract_inputs(batch),
                head_inputs,
                labels,
                calls,
                where,
                len(cb.memory),
                lambda: describe(cb.extract_inputs(batch)),
            )

    cb._writer.write_captured(
        labels,
        where,
        fraction=cb.write_fraction,
        strategy=strategy,
        describe_batch=lambda: describe(batch),
        payload_of=payload_of,
        inputs=inputs,
        required=required,
    )


def update_metrics(cb: MbPA, batch: Any) -> Tensor | None:
    """Update base vs adapted accuracy when the batch carries labels; return the labels."""
    if not cb._adapter.calls:
        return None
    try:
        labels = cb.extract_labels(batch)
    except (ValueError, MisconfigurationException):
        labels = None
    cb._adapter.update_metrics(labels)
    return labels


def online_write(cb: MbPA, pl_module: nn.Module, batch: Any, labels: Tensor | None) -> None:
    """Write a labelled test batch after it was predicted (fast learning during evaluation)."""
    if labels is None:
        labels = cb.extract_labels(batch)
    if labels is None:
        return
    if cb._writer.discovering:
        cb._writer.finish_discovery(pl_module)
        cb._adapter.attach()
    inputs = [q for q, _, _ in cb._adapter.calls] or [x for _, x in cb._writer.captured]
    write_labelled(
        cb, batch, labels, "test batch (online_writes)", cb._strategy, inputs, required=False
    )


def write_training_batch(cb: MbPA, pl_module: nn.Module, batch: Any) -> None:
    """After a training step: write what the head received with the batch's labels."""
    writer = cb._writer
    writer.capturing = False
    try:
        writer.finish_discovery(pl_module)
        if writer.skipped_training_step():
            return
        strategy = cb._strategy
        if writer.captured and strategy is None and not cb.store_inputs:  # maybe the common case
            labels = cb.extract_labels(batch)
            if labels is None or not writer.write_common(labels, cb.write_fraction):
                write_found(cb, batch, labels, "training batch", strategy)
        else:
            write_batch(cb, batch, "training batch", strategy)
        writer.head_has_run = True
    finally:
        writer.end_batch()


def end_eval_batch(cb: MbPA, trainer: pl.Trainer, pl_module: nn.Module, batch: Any) -> None:
    """After a validate/test/predict step: check that the head was called where MbPA adapts,
    update the metrics and, in a test with ``online_writes``, write the batch."""
    if trainer.testing:
        end_test_batch(cb, pl_module, batch)
    elif trainer.predicting:
        cb._adapter.check_head_was_called("predict")
        cb._adapter.calls.clear()
    elif cb._adapter.stage == "validate":
        cb._adapter.check_head_was_called("validate")
        update_metrics(cb, batch)


def end_test_batch(cb: MbPA, pl_module: nn.Module, batch: Any) -> None:
    """After a test step: update the metrics and, with ``online_writes``, write the batch."""
    cb._writer.capturing = False
    try:
        cb._adapter.check_head_was_called("test")
        labels = update_metrics(cb, batch) if cb._adapter.stage == "test" else None
        if cb.online_writes:
            online_write(cb, pl_module, batch, labels)
    finally:
        cb._adapter.calls.clear()
        cb._writer.captured.clear()
