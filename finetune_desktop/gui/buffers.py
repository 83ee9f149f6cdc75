"""Growable preallocated arrays for the live charts (no list appends, no copies per point)."""
from __future__ import annotations

import numpy as np


class Series:
    """Parallel float64 columns that grow by doubling; `view(name)` is a slice of the filled part."""

    def __init__(self, names: tuple[str, ...], capacity: int = 1024):
        self.names = names
        self.n = 0
        self._cols = {k: np.full(capacity, np.nan) for k in names}

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        self.n = 0

    def _reserve(self, extra: int) -> None:
        cap = len(next(iter(self._cols.values())))
        if self.n + extra <= cap:
            return
        new = max(cap * 2, self.n + extra)
        for k, v in self._cols.items():
            grown = np.full(new, np.nan)
            grown[: self.n] = v[: self.n]
            self._cols[k] = grown

    def append_rows(self, rows: dict[str, np.ndarray | list]) -> None:
        m = len(next(iter(rows.values())))
        if m == 0:
            return
        self._reserve(m)
        for k in self.names:
            col = rows.get(k)
            self._cols[k][self.n: self.n + m] = np.nan if col is None else np.asarray(col, dtype=np.float64)
        self.n += m

    def view(self, name: str) -> np.ndarray:
        return self._cols[name][: self.n]

    def set_view(self, name: str, values) -> None:
        """Overwrite the filled part of one column (e.g. a recomputed smoothing)."""
        self._cols[name][: self.n] = values

    def last(self, name: str) -> float:
        return float(self._cols[name][self.n - 1]) if self.n else float("nan")


def ema(values: np.ndarray, weight: float, start_value: float | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing), weight in [0, 1)."""
    out = np.empty_like(values, dtype=np.float64)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):  # small loop: only used on load; live updates go through EmaState
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm if norm > 0 else v
    return out


class EmaState:
    """Incremental EMA so live smoothing costs O(new points)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.acc = 0.0
        self.norm = 0.0

    def push(self, values) -> np.ndarray:
        out = np.empty(len(values))
        w = self.weight
        acc, norm = self.acc, self.norm
        for i, v in enumerate(values):
            if v != v:  # NaN: carry the previous value
                out[i] = acc / norm if norm > 0 else np.nan
                continue
            acc = w * acc + (1 - w) * v
            norm = w * norm + (1 - w)
            out[i] = acc / norm
        self.acc, self.norm = acc, norm
        return out
