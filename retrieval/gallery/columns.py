"""Row-aligned columns of a FAISS gallery: they grow by doubling, and strings are kept as codes."""
from __future__ import annotations

import numpy as np


class Column:
    """A row-aligned array that grows by doubling, so adding n entries copies O(n), not O(n * size)."""

    def __init__(self, dtype, width: int | None = None):
        self._buf = np.empty((16,) if width is None else (16, width), dtype=dtype)
        self.n = 0

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf)),) + self._buf.shape[1:], dtype=self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = values
        self.n = need

    def keep(self, mask: np.ndarray) -> None:
        kept = self.view[mask]
        self._buf, self.n = kept.copy(), len(kept)


class Coded:
    """A row-aligned column of strings kept as int32 codes (-1: no value), so that a filter
    compares integers: comparing 100,000 camera ids as strings took about 2 ms of a 0.5 ms HNSW
    search, and matching a label entry by entry 60 ms."""

    def __init__(self, values=()):
        self.codes: dict[str, int] = {}
        self.column = Column(np.int32)
        self.extend(values)

    def extend(self, values) -> None:
        codes = self.codes
        self.column.extend(np.array([-1 if v is None else codes.setdefault(v, len(codes)) for v in values], dtype=np.int32))

    def equal(self, value: str) -> np.ndarray:
        """Which rows hold ``value``."""
        code = self.codes.get(value)
        return np.zeros(self.column.n, dtype=bool) if code is None else self.column.view == code
