"""Named ranges around MbPA's test-time phases for ``torch.profiler``, free when none records.

One idea: the search, the gathering of the neighbours, the neighbours' base outputs and each
part of the adaptation run inside a ``record_function`` range named ``mbpa.*`` while a
``torch.profiler.profile`` is recording, so a profile of ``trainer.test`` shows where MbPA's
time goes on the machine at hand (``benchmarks/end_to_end.py`` prints it as a table). When no
profiler records, :func:`phase` is a no-op: entering a ``record_function`` costs a few
microseconds even then, and some ranges are entered once per adaptation step.

The ranges (nested as listed):

* ``mbpa.hook``: everything MbPA does in the head's forward hook, of which
  ``mbpa.search`` (the memory's search, of which ``mbpa.gather``: the neighbours' keys, labels
  and exact distances), ``mbpa.weights`` (kernel weights), ``mbpa.neighbour_outputs`` (the
  trained head's outputs on the neighbours, cached per slot) and ``mbpa.adapt``
  (:func:`~lightning_mbpa.local_adapt`, of which, for an ``nn.Linear`` head, ``mbpa.dual.gram``,
  ``mbpa.dual.neighbour_logits``, ``mbpa.dual.softmax``, ``mbpa.dual.update`` and
  ``mbpa.dual.query_output``);
* ``mbpa.metrics``: base vs adapted accuracy after each batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch.autograd import profiler
from torch.profiler import record_function


def phase(name: str) -> contextlib.AbstractContextManager[Any]:
    """``record_function(name)`` while a torch profiler records, else a context that does
    nothing."""
    # torch keeps this flag in a private module global (set by every profiler since torch 1.x);
    # were it ever gone, the ranges are always entered: correct, a few microseconds slower
    if getattr(profiler, "_is_profiler_enabled", True):
        return record_function(name)
    return contextlib.nullcontext()
