"""Many int32 lists, one per row, in one array: what the updater's seen index and a replica's
seen items both are.

Row r's list is `items[start[r] : start[r] + count[r]]`. A row's new list is written at the end
and its old copy left as garbage, compacted once garbage outweighs the lists in use, so
changing a commit's lists is a few numpy passes with no Python step per row (a dict of an
array or a bytes object per row cost one per touched row, and a Python object per row).
"""

from __future__ import annotations

import numpy as np

EMPTY = np.empty(0, np.int32)


class FlatLists:
    #: growth of the items array when full (a share of its size)
    GROW = 0.5
    #: room left after a compaction (a share of the lists in use)
    SLACK = 1.0

    def __init__(self) -> None:
        self.items = np.zeros(1024, np.int32)
        self.used = 0  # items[:used] written (lists in use and garbage)
        self.live = 0  # items in lists in use
        self.start = np.zeros(1024, np.int64)
        self.count = np.zeros(1024, np.int64)

    def of(self, row: int) -> np.ndarray:
        """One row's list, a copy (empty for a row never written)."""
        if row >= self.start.size:
            return EMPTY
        at = int(self.start[row])
        return self.items[at : at + int(self.count[row])].copy()

    def _reserve(self, n: int) -> None:
        """Room for rows below `n`."""
        if n > self.start.size:
            cap = max(n, self.start.size + int(self.start.size * self.GROW))
            for name in ("start", "count"):
                a = getattr(self, name)
                grown = np.zeros(cap, np.int64)
                grown[: a.size] = a
                setattr(self, name, grown)

    def _gather(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The lists at `starts` (`counts` long) end to end (int32)."""
        total = int(counts.sum())
        if total == 0:
            return EMPTY
        ends = np.cumsum(counts)
        at = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)
        return self.items[at]

    def _append(self, rows: np.ndarray, flat: np.ndarray, counts: np.ndarray) -> None:
        """Write `rows`' new lists (end to end in `flat`, `counts` long each) after the others;
        their old copies become garbage."""
        if rows.size:
            self._reserve(int(rows.max()) + 1)
        live = self.live + flat.size - int(self.count[rows].sum())
        if self.used + flat.size > self.items.size and self.used - live > live:
            self._compact()  # of the lists as they are (`live` counts these rows' old ones)
        self.live += flat.size - int(self.count[rows].sum())
        if self.used + flat.size > self.items.size:
            cap = max(self.used + flat.size, self.items.size + int(self.items.size * self.GROW))
            items = np.zeros(cap, np.int32)
            items[: self.used] = self.items[: self.used]
            self.items = items
        self.items[self.used : self.used + flat.size] = flat
        self.start[rows] = self.used + np.cumsum(counts) - counts
        self.count[rows] = counts
        self.used += flat.size

    def _compact(self) -> None:
        """Every list in use, end to end in row order, in an array of their size (and
        `SLACK`)."""
        rows = np.flatnonzero(self.count)
        counts = self.count[rows]
        flat = self._gather(self.start[rows], counts)
        self.items = np.zeros(max(flat.size + int(flat.size * self.SLACK), 1024), np.int32)
        self.items[: flat.size] = flat
        self.start[rows] = np.cumsum(counts) - counts
        self.used = self.live = flat.size
