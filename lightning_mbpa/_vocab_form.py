"""One adaptation step of a linear head at vocabulary scale (``C`` in the thousands and more).

With one step from the trained ``θ = (W0, b0)`` the dual form of :mod:`lightning_mbpa._dual_form`
collapses to a sum: the adapted output of query ``q`` is

    base(q) + Σ_k c_k · (p_k − e_{y_k}),     c_k = −lr · w_k · (h_k·q + 1),

where ``p_k = softmax(W0·h_k + b0)`` is neighbour ``k``'s base distribution, ``e_y`` the one-hot
of its label and the ``+ 1`` the bias' constant feature (absent without a bias). ``beta`` plays
no part in a first step. Per query that is a weighted sum of ``K`` rows of ``C`` numbers, so a
batch is one weighted gather-sum (an embedding bag) over the softmax rows of its ``U`` distinct
neighbour slots, plus a scatter of the ``−c_k`` at the labels: ``B·K·C`` multiply-adds,
memory-bound, and no ``[B, K, C]`` tensor is ever formed.

The expensive part is ``p`` itself: ``D·C`` multiply-adds per slot. :class:`SlotSoftmaxCache`
keeps the softmax of recently used slots (a byte budget, least recently used out first), checks
each hit against the slot's current key (so writes, evictions and key updates of the memory
never serve a stale row) and computes the distinct missing slots of a batch in one matrix
product. Slots written from a test batch's own queries (the test history of ``online_writes``)
are filled from the logits the model already computed for those queries
(:meth:`SlotSoftmaxCache.offer`), so the history costs no extra head evaluation.

Pure torch; the head is never mutated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Classes from which the callback takes this path for one adaptation step of a linear head
#: (below it the general dual form is as fast and keeps its own per-slot cache).
VOCAB_MIN_CLASSES = 1024

#: Rows of the head's logits computed at once when softmax rows are filled, through a scratch
#: buffer that is reused: a batch's ``[misses, C]`` temporaries (hundreds of MB at vocabulary
#: scale) would otherwise be fresh memory, paged in again for every batch.
SOFTMAX_CHUNK_ROWS = 512

#: Default byte budget of :class:`SlotSoftmaxCache` (the softmax rows plus a copy of each key),
#: and of ``MbPA(output_cache_bytes=...)``.
SLOT_CACHE_BYTES = 2 * 2**30


class SlotSoftmaxCache:
    """The trained linear head's softmax on memory slots, ``[rows, C]`` float32, least recently
    used rows replaced first, validated against the memory's keys on every lookup.

    State (transient, never saved):
        probs: ``[rows, C]`` softmax rows; keys: ``[rows, D]`` the key each row was computed
        from; slot_of_row / row_of_slot: the two maps (``-1``: none); last_used: the lookup
        counter at each row's last use; pending: ``(keys, logits)`` offered by :meth:`offer`.
    """

    def __init__(self, budget_bytes: int = SLOT_CACHE_BYTES) -> None:
        #: At most this many bytes of rows, ``4·(C + D)`` each (0: nothing is kept between calls).
        self.budget_bytes = budget_bytes
        self.reset()

    def reset(self) -> None:
        self.probs: Tensor | None = None
        self.keys: Tensor | None = None
        self.slot_of_row = torch.empty(0, dtype=torch.int64)
        self.row_of_slot = torch.empty(0, dtype=torch.int64)
        self.last_used = torch.empty(0, dtype=torch.int64)
        self.used = 0  # rows filled so far
        self.tick = 0
        self.weights_id: tuple[int, ...] | None = None
        self.pending: tuple[Tensor, Tensor] | None = None
        self.scratch: Tensor | None = None  # reused [SOFTMAX_CHUNK_ROWS, C] logits
        self.batch_table: Tensor | None = None  # reused table of a batch that does not fit
        self.computed = 0  # slots whose softmax was computed with the head (statistics)
        self.reused = 0  # slots served from the offered logits

    def offer(self, keys: Tensor, logits: Tensor) -> None:
        """The queries of the batch just predicted and the trained head's logits on them: if the
        memory stores these keys next (test history), their softmax is taken from here."""
        self.pending = (keys.detach().float(), logits.detach().float())

    def rows_for(
        self, head: nn.Linear, memory_keys: Tensor, slots: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(table, rows)``: the softmax of the trained head on ``memory_keys[slots]`` is
        ``table[rows]`` (``slots``: distinct, ``>= 0``). ``table`` is the cache itself when all
        of them fit, else a batch-local tensor."""
        self._check_head(head, memory_keys)
        num_slots, classes = memory_keys.shape[0], head.out_features
        capacity = max(0, self.budget_bytes // (4 * (classes + memory_keys.shape[1])))
        if self.row_of_slot.numel() < num_slots:
            grown = torch.full((num_slots,), -1, dtype=torch.int64)
            grown[: self.row_of_slot.numel()] = self.row_of_slot
            self.row_of_slot = grown
        self.tick += 1
        rows = self.row_of_slot[slots]
        hit = rows >= 0
        if bool(hit.any()):  # a hit must still hold the key it was computed from
            assert self.keys is not None
            same = (self.keys[rows[hit]] == memory_keys[slots[hit]]).all(dim=1)
            stale = hit.clone()
            stale[hit] = ~same
            if bool(stale.any()):
                self._drop(rows[stale])
                rows = torch.where(stale, -1, rows)
                hit &= ~stale
        missing = ~hit
        num_missing = int(missing.sum())
        if num_missing > capacity - int(hit.sum()):  # the batch does not fit: no caching
            self.batch_table = _at_least(self.batch_table, slots.numel(), classes, memory_keys)
            table = self.batch_table[: slots.numel()]
            if bool(hit.any()):
                assert self.probs is not None
                table[hit] = self.probs[rows[hit]]
            self._softmax(head, memory_keys, slots[missing], table, missing.nonzero()[:, 0])
            return table, torch.arange(slots.numel())
        if self.probs is None or self.probs.shape[1] != classes:
            self._allocate(capacity, classes, memory_keys)
        assert self.probs is not None and self.keys is not None
        self.last_used[rows[hit]] = self.tick  # this lookup's hits are not evicted for its misses
        if num_missing:
            new_rows = self._free_rows(num_missing)
            new_slots = slots[missing]
            self._softmax(head, memory_keys, new_slots, self.probs, new_rows)
            self.keys[new_rows] = memory_keys[new_slots]
            self.slot_of_row[new_rows] = new_slots
            self.row_of_slot[new_slots] = new_rows
            rows = rows.clone()
            rows[missing] = new_rows
        self.last_used[rows] = self.tick
        return self.probs, rows

    def _check_head(self, head: nn.Linear, memory_keys: Tensor) -> None:
        weight, bias = head.weight, head.bias
        ident: tuple[int, ...] = (weight.data_ptr(), weight._version, memory_keys.shape[1])
        if bias is not None:
            ident += (bias.data_ptr(), bias._version)
        if ident != self.weights_id:
            pending = self.pending
            self.reset()
            self.pending = pending
            self.weights_id = ident

    def _allocate(self, rows: int, classes: int, memory_keys: Tensor) -> None:
        # The whole budget at once, untouched: its pages are backed as rows are filled, so the
        # table never grows by copying (which would need the old and the new table at once).
        with torch.inference_mode(False):
            self.probs = memory_keys.new_empty((rows, classes))
            self.keys = memory_keys.new_empty((rows, memory_keys.shape[1]))
        self.slot_of_row = torch.full((rows,), -1, dtype=torch.int64)
        self.last_used = torch.zeros(rows, dtype=torch.int64)
        self.row_of_slot.fill_(-1)
        self.used = 0

    def _free_rows(self, n: int) -> Tensor:
        """``n`` rows to (re)fill: unused ones first, then the least recently used rows not used
        by this lookup."""
        assert self.probs is not None
        fresh = min(n, self.probs.shape[0] - self.used)
        rows = torch.arange(self.used, self.used + fresh)
        if fresh < n:  # the table is full: replace rows filled before, dropped ones first
            ages = self.last_used[: self.used].clone()
            ages[self.slot_of_row[: self.used] < 0] = -1
            old = torch.topk(ages, n - fresh, largest=False).indices
            self._drop(old)
            rows = torch.cat([rows, old])
        self.used += fresh
        return rows

    def _drop(self, rows: Tensor) -> None:
        slots = self.slot_of_row[rows]
        held = slots >= 0
        self.row_of_slot[slots[held]] = -1
        self.slot_of_row[rows] = -1

    def _softmax(
        self, head: nn.Linear, memory_keys: Tensor, slots: Tensor, out: Tensor, rows: Tensor
    ) -> None:
        """Writes ``softmax(W0·h + b0)`` of slot ``slots[i]`` to ``out[rows[i]]``, from offered
        logits where a slot's key is one of the offered keys (bit-identical), else with the
        head; :data:`SOFTMAX_CHUNK_ROWS` rows at a time through the reused scratch."""
        keys = memory_keys[slots]
        n = slots.numel()
        where = None
        if self.pending is not None:
            offered_keys, offered_logits = self.pending
            where = _match_rows(keys, offered_keys)
            found = int((where >= 0).sum())
            self.reused += found
            if not found:
                where = None
        self.computed += n if where is None else int((where < 0).sum())
        first = int(rows[0]) if n else 0
        contiguous = bool((rows == torch.arange(first, first + n, device=rows.device)).all())
        scratch = _at_least(self.scratch, SOFTMAX_CHUNK_ROWS, out.shape[1], memory_keys)
        self.scratch = scratch
        for start in range(0, n, SOFTMAX_CHUNK_ROWS):
            stop = min(n, start + SOFTMAX_CHUNK_ROWS)
            logits = scratch[: stop - start]
            chunk = None if where is None else where[start:stop]
            if chunk is None or bool((chunk < 0).any()):
                _linear(head, keys[start:stop], out=logits)
            if chunk is not None:
                found_rows = chunk >= 0
                logits[found_rows] = offered_logits[chunk[found_rows]]
            if contiguous:  # straight into the rows
                torch.softmax(logits, dim=1, out=out[first + start : first + stop])
            else:
                out[rows[start:stop]] = torch.softmax(logits, dim=1, out=logits)


def _at_least(buffer: Tensor | None, rows: int, classes: int, like: Tensor) -> Tensor:
    """``buffer`` if it holds at least ``[rows, classes]``, else a new one of that size (a reused
    buffer only grows, and its pages stay backed from one batch to the next)."""
    if buffer is None or buffer.shape[1] != classes or buffer.shape[0] < rows:
        with torch.inference_mode(False):
            buffer = like.new_empty((rows, classes))
    return buffer


def _match_rows(keys: Tensor, candidates: Tensor) -> Tensor:
    """For each row of ``keys`` the index of an equal row of ``candidates``, or ``-1``."""
    if candidates.shape[0] == 0 or keys.shape[0] == 0:
        return torch.full((keys.shape[0],), -1, dtype=torch.int64)
    # rows that are equal have the same sum and the same first element: hash on both, confirm
    index = {
        (float(s), float(f)): i
        for i, (s, f) in enumerate(
            zip(candidates.sum(1).tolist(), candidates[:, 0].tolist(), strict=True)
        )
    }
    where = torch.tensor(
        [
            index.get((float(s), float(f)), -1)
            for s, f in zip(keys.sum(1).tolist(), keys[:, 0].tolist(), strict=True)
        ],
        dtype=torch.int64,
    )
    found = where >= 0
    if bool(found.any()):
        equal = (candidates[where[found]] == keys[found]).all(dim=1)
        where[found] = torch.where(equal, where[found], -1)
    return where


def _linear(head: nn.Linear, keys: Tensor, out: Tensor | None = None) -> Tensor:
    """``head(keys)`` in float32 with the trained weights, autocast off (into ``out`` if
    given)."""
    with torch.autocast(keys.device.type, enabled=False):
        weight = head.weight.detach().float()
        bias = None if head.bias is None else head.bias.detach().float()
        if out is None:
            return torch.nn.functional.linear(keys.float(), weight, bias)
        if bias is None:
            return torch.mm(keys.float(), weight.t(), out=out)
        return torch.addmm(bias, keys.float(), weight.t(), out=out)


def one_step_outputs(
    head: nn.Linear,
    queries: Tensor,
    base: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    slots: Tensor,
    lr: float,
    probs_of: SlotSoftmaxCache | None = None,
    memory_keys: Tensor | None = None,
) -> Tensor:
    """The outputs of ``head`` on ``queries`` after one adaptation step on their neighbours.

    Equal (up to float rounding) to ``local_adapt(head, queries, keys, labels, weights,
    steps=1, lr=lr, beta=any, base_outputs=base)``.

    Args:
        head: The trained ``nn.Linear`` head (``C`` outputs, ``C >= 2``).
        queries: ``[B, D]`` float32.
        base: ``[B, C]`` the head's outputs on ``queries``.
        keys: ``[B, K, D]`` the neighbours' keys; labels ``[B, K]``; weights ``[B, K]``
            (``0``: no neighbour; such columns may hold anything).
        slots: ``[B, K]`` the neighbours' memory slots (``-1`` for none).
        lr: Step size.
        probs_of: The per-slot softmax cache (None: computed for this call only).
        memory_keys: ``[len, D]`` the memory's keys (needed with ``probs_of``).

    Returns:
        ``[B, C]`` float32.
    """
    valid = weights > 0
    coef = torch.bmm(keys, queries[:, :, None])[:, :, 0]  # h_k·q
    if head.bias is not None:
        coef += 1.0
    coef = torch.where(valid, coef * (-lr * weights), 0.0)
    flat = torch.where(valid, slots, -1).reshape(-1)
    used = flat >= 0
    if not bool(used.any()):
        return base.float().clone()
    unique, inverse = torch.unique(flat[used], return_inverse=True)
    if probs_of is None or memory_keys is None:
        if memory_keys is None:  # the neighbours' own keys
            first = torch.full((int(unique.numel()),), -1, dtype=torch.int64)
            positions = torch.arange(flat.numel())[used]
            first.scatter_reduce_(0, inverse, positions, reduce="amax", include_self=True)
            unique_keys = keys.reshape(-1, keys.shape[-1])[first]
        else:
            unique_keys = memory_keys[unique]
        table, rows = torch.softmax(_linear(head, unique_keys), dim=1), torch.arange(unique.numel())
    else:
        table, rows = probs_of.rows_for(head, memory_keys, unique)
    columns = torch.full_like(flat, 0)
    columns[used] = rows[inverse]
    # per query, the coefficient-weighted sum of its K softmax rows (a repeated row sums, as the
    # per-neighbour sum does): an embedding bag, memory-bound
    out = torch.nn.functional.embedding_bag(
        columns.view(coef.shape), table, per_sample_weights=coef, mode="sum"
    )
    out += base  # (the sums' own tensor: no copy of the base outputs to page in)
    out.scatter_add_(1, torch.where(valid, labels, 0), -coef)
    return out
