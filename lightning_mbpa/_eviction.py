"""Which slot each newly written row of a fixed-capacity memory takes: a FIFO ring, a reservoir
or class-balanced quotas.

One idea: slot assignment with sequential semantics. A FIFO ring overwrites the oldest entry
(the choice of Sprechmann et al., 2018, arXiv:1802.10542); a reservoir (Vitter's Algorithm R)
keeps a uniform sample of every row ever offered; class-balanced eviction overwrites the oldest
entry of the largest class. :class:`SlotAssigner` owns the only state this needs: how many rows
were offered so far, the reservoir's random generator and, for class-balanced eviction, when each
slot was written and the per-class queues derived from it.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np
import numpy.typing as npt
import torch

from lightning_mbpa._memory_checks import Eviction

Int64Array = npt.NDArray[np.int64]
#: ``(first row, first slot, length)`` of a contiguous run of rows written to contiguous slots.
Run = tuple[int, int, int]


class SlotAssigner:
    """Slots for new rows under ``"fifo"``, ``"reservoir"`` or ``"class_balanced"`` eviction.

    * ``"fifo"``: row ``t`` (0-based over all writes) takes slot ``t % capacity``; within a batch
      larger than the capacity only the last ``capacity`` rows are kept.
    * ``"reservoir"``: row ``t`` takes slot ``t`` while ``t < capacity``, else draws ``j`` uniform
      in ``[0, t]`` and replaces slot ``j`` if ``j < capacity``. Within one batch the later of two
      rows drawing the same slot wins, exactly as one-at-a-time insertion would.
    * ``"class_balanced"``: row ``t`` takes slot ``t`` while ``t < capacity``, else overwrites the
      oldest entry (smallest ``t``) of the currently largest class; among equally large
      classes the row's own class if it is one of them, else the smallest label. Rows are
      processed in order, exactly as one-at-a-time insertion would. ``inserted[slot]`` is the
      ``t`` of the row in each slot; per class a queue of its slots, oldest first, and a heap of
      ``(-count, label)`` (stale entries skipped): a row of a largest class costs a rotation of
      its queue, any other row a few heap operations.
    """

    def __init__(self, eviction: Eviction, capacity: int, seed: int) -> None:
        self.eviction: Eviction = eviction
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_seen = 0
        self._init_classes()

    def _init_classes(self) -> None:
        self.inserted: Int64Array | None = None
        self._queues: dict[int, deque[int]] = {}
        self._heap: list[tuple[int, int]] = []
        if self.eviction == "class_balanced":
            self.inserted = np.zeros(self.capacity, dtype=np.int64)

    @property
    def size(self) -> int:
        """How many slots are filled: ``min(num_seen, capacity)``."""
        return min(self.num_seen, self.capacity)

    @property
    def cursor(self) -> int:
        """The next FIFO slot."""
        return self.num_seen % self.capacity

    def reset(self) -> None:
        """Back to an empty memory: nothing seen, the generator re-seeded."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self.num_seen = 0
        self._init_classes()

    def restore(
        self,
        num_seen: int,
        generator: torch.Generator,
        labels: Int64Array | None = None,
        inserted: Int64Array | None = None,
    ) -> None:
        """Continue from a saved state; class-balanced eviction needs the stored ``labels`` and
        ``inserted`` (``[min(num_seen, capacity)]``) to rebuild its queues."""
        self.num_seen = num_seen
        self.generator = generator
        self._init_classes()
        if self.inserted is None:
            return
        size = self.size
        if not size:
            return
        assert labels is not None and inserted is not None
        self.inserted[:size] = inserted
        for slot in np.argsort(inserted, kind="stable").tolist():
            self._queues.setdefault(int(labels[slot]), deque()).append(slot)
        self._heap = [(-len(queue), label) for label, queue in self._queues.items()]
        heapq.heapify(self._heap)

    def contiguous_start(self, n: int) -> int | None:
        """The first of the ``n`` consecutive slots that ``n`` new rows take, when they do (a
        FIFO ring that does not wrap within them; a reservoir still filling); None otherwise.
        Then :meth:`assign` would give exactly these slots and draw nothing."""
        seen, cap = self.num_seen, self.capacity
        if self.eviction == "fifo":
            start = seen % cap
            return start if start + n <= cap else None
        if self.eviction == "reservoir" and seen + n <= cap:
            return seen
        return None

    def assign(
        self, n: int, labels: Int64Array | None = None
    ) -> tuple[Int64Array, list[Run] | None]:
        """Slot of each of ``n`` new rows (``-1``: not kept), and, when the kept rows land in at
        most two contiguous runs of slots (FIFO, a filling reservoir), those runs; None otherwise.

        Draws the reservoir's random numbers, and updates the class-balanced queues (which need
        the rows' ``labels``); :meth:`advance` then counts the rows as seen.
        """
        cap, seen = self.capacity, self.num_seen
        if self.eviction == "class_balanced":
            assert labels is not None and labels.shape == (n,)
            return self._assign_class_balanced(labels)
        if self.eviction == "fifo":
            first = max(0, n - cap)  # earlier rows of an oversized batch are overwritten within it
            start = (seen + first) % cap
            head = min(n - first, cap - start)
            runs = [(first, start, head)]
            if head < n - first:  # wraps around the end of the ring
                runs.append((first + head, 0, n - first - head))
            slot = np.empty(n, dtype=np.int64)
            slot[:first] = -1
            for row, begin, length in runs:
                slot[row : row + length] = np.arange(begin, begin + length, dtype=np.int64)
            return slot, runs
        slot = np.full(n, -1, dtype=np.int64)
        t = np.arange(seen, seen + n, dtype=np.int64)
        filling = t < cap
        slot[filling] = t[filling]
        late = ~filling
        m = int(late.sum())
        if not m:
            return slot, [(0, seen, n)]
        u = torch.rand(m, dtype=torch.float64, generator=self.generator).numpy()
        j = np.floor(u * (t[late] + 1).astype(np.float64)).astype(np.int64)
        slot[late] = np.where(j < cap, j, -1)
        return _keep_last(slot), None

    def _assign_class_balanced(self, labels: Int64Array) -> tuple[Int64Array, list[Run] | None]:
        """One row at a time, but only a row whose class is not a largest one touches the heap.

        A row of a largest class evicts that class's own oldest entry: the counts stay as they
        are, so the largest count ``top`` stays valid and the row costs a queue rotation. Only
        the other rows change two counts; they pop the largest class (smallest label on ties)
        off the heap and push the two new counts.
        """
        assert self.inserted is not None
        cap, seen, n = self.capacity, self.num_seen, labels.shape[0]
        queues, heap = self._queues, self._heap
        rows = labels.tolist()
        filling = min(n, max(0, cap - seen))  # rows that take an empty slot
        for s, label in enumerate(rows[:filling], start=seen):
            queue = queues.get(label)
            if queue is None:
                queue = queues[label] = deque()
            queue.append(s)
        if filling:
            heap[:] = [(-len(queue), label) for label, queue in queues.items()]
            heapq.heapify(heap)
        evicted: list[int] = []
        if filling < n:
            top = self._largest_count()
            for label in rows[filling:]:
                own = queues.get(label)
                if own is not None and len(own) == top:  # the row's class is a largest one
                    s = own.popleft()
                    own.append(s)
                else:
                    largest = heap[0][1]  # the smallest label among the largest classes
                    s = queues[largest].popleft()
                    heapq.heapreplace(heap, (1 - top, largest))
                    if own is None:
                        own = queues[label] = deque()
                    own.append(s)
                    heapq.heappush(heap, (-len(own), label))
                    top = self._largest_count()
                evicted.append(s)
        slot = np.empty(n, dtype=np.int64)
        slot[:filling] = np.arange(seen, seen + filling, dtype=np.int64)
        slot[filling:] = evicted
        if len(heap) > 4 * len(queues) + 64:  # drop the stale entries
            heap[:] = [(-len(q), label) for label, q in queues.items() if q]
            heapq.heapify(heap)
        if seen + n <= cap:
            self.inserted[seen : seen + n] = np.arange(seen, seen + n, dtype=np.int64)
            return slot, [(0, seen, n)]
        if len(set(slot.tolist())) == n:  # every slot taken once
            self.inserted[slot] = np.arange(seen, seen + n, dtype=np.int64)
            return slot, None
        slot = _keep_last(slot)  # the last row written to a slot is the one it holds
        kept = np.flatnonzero(slot >= 0)
        self.inserted[slot[kept]] = seen + kept
        return slot, None

    def _largest_count(self) -> int:
        """The largest class size, after dropping stale heap entries off the top of the heap
        (an entry is stale once its class's size changed)."""
        heap, queues = self._heap, self._queues
        while len(queues[heap[0][1]]) != -heap[0][0]:
            heapq.heappop(heap)
        return -heap[0][0]

    def advance(self, n: int) -> None:
        """Counts ``n`` more rows as offered."""
        self.num_seen += n


def _keep_last(slot: Int64Array) -> Int64Array:
    """Of two rows taking the same slot, the later one wins (the earlier becomes ``-1``)."""
    kept = np.flatnonzero(slot >= 0)
    _, last_rev = np.unique(slot[kept][::-1], return_index=True)
    winners = kept[::-1][last_rev]
    deduped = np.full(slot.shape[0], -1, dtype=np.int64)
    deduped[winners] = slot[winners]
    return deduped
