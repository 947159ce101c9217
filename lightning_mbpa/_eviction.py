"""Which slot each newly written row of a fixed-capacity memory takes: a FIFO ring or a reservoir.

One idea: slot assignment with sequential semantics. A FIFO ring overwrites the oldest entry
(the choice of Sprechmann et al., 2018, arXiv:1802.10542); a reservoir (Vitter's Algorithm R)
keeps a uniform sample of every row ever offered. :class:`SlotAssigner` owns the only state this
needs: how many rows were offered so far and the reservoir's random generator.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from lightning_mbpa._memory_checks import Eviction

Int64Array = npt.NDArray[np.int64]
#: ``(first row, first slot, length)`` of a contiguous run of rows written to contiguous slots.
Run = tuple[int, int, int]


class SlotAssigner:
    """Slots for new rows under ``"fifo"`` or ``"reservoir"`` eviction.

    * ``"fifo"``: row ``t`` (0-based over all writes) takes slot ``t % capacity``; within a batch
      larger than the capacity only the last ``capacity`` rows are kept.
    * ``"reservoir"``: row ``t`` takes slot ``t`` while ``t < capacity``, else draws ``j`` uniform
      in ``[0, t]`` and replaces slot ``j`` if ``j < capacity``. Within one batch the later of two
      rows drawing the same slot wins, exactly as one-at-a-time insertion would.
    """

    def __init__(self, eviction: Eviction, capacity: int, seed: int) -> None:
        self.eviction: Eviction = eviction
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_seen = 0

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

    def restore(self, num_seen: int, generator: torch.Generator) -> None:
        self.num_seen = num_seen
        self.generator = generator

    def assign(self, n: int) -> tuple[Int64Array, list[Run] | None]:
        """Slot of each of ``n`` new rows (``-1``: not kept), and, when the kept rows land in at
        most two contiguous runs of slots (FIFO, a filling reservoir), those runs; None otherwise.

        Draws the reservoir's random numbers; :meth:`advance` then counts the rows as seen.
        """
        cap, seen = self.capacity, self.num_seen
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
        # Two rows drawing the same slot: the later one wins (keep-last dedupe).
        kept = np.flatnonzero(slot >= 0)
        _, last_rev = np.unique(slot[kept][::-1], return_index=True)
        winners = kept[::-1][last_rev]
        deduped = np.full(n, -1, dtype=np.int64)
        deduped[winners] = slot[winners]
        return deduped, None

    def advance(self, n: int) -> None:
        """Counts ``n`` more rows as offered."""
        self.num_seen += n
