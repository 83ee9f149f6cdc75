"""Stable view ranges for live charts. pyqtgraph's auto-range recomputes the bounds of every item
and moves the axes on every new point, and each axis move regenerates and repaints its tick
labels: most of the GUI thread's time while a run draws. Here a range only changes when the
data leaves it (then it grows with headroom) or, where allowed, when the data has shrunk to a
small part of it, so most updates repaint the curves and nothing else."""
from __future__ import annotations

import math


class StableRange:
    """One axis. `fit(lo, hi)` returns the new (lo, hi) when the view must change, else None.

    headroom: extra space added beyond the data when the range is (re)made, as a share of the
        data's span; floor: a value the range never goes below when the data does not (e.g. 0
        for a loss); shrink: re-fit when the data uses less than this share of the range
        (0 = never shrink)."""

    def __init__(self, headroom: float = 0.1, floor: float | None = None, shrink: float = 0.0):
        self.headroom, self.floor, self.shrink = headroom, floor, shrink
        self.lo: float | None = None
        self.hi: float | None = None

    def reset(self) -> None:
        self.lo = self.hi = None

    def fixed(self, lo: float, hi: float) -> tuple[float, float]:
        """Set a known range (e.g. 0 .. total steps)."""
        self.lo, self.hi = float(lo), float(hi)
        return self.lo, self.hi

    def fit(self, lo: float, hi: float):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        if self.lo is not None:
            inside = self.lo <= lo and hi <= self.hi
            used = (hi - lo) / max(1e-300, self.hi - self.lo)
            if inside and not (self.shrink and used < self.shrink):
                return None
        span = hi - lo
        if span <= 0:
            span = max(abs(hi), 1e-12) * 0.1
        new_lo, new_hi = lo - self.headroom * span, hi + self.headroom * span
        if self.floor is not None and lo >= self.floor:
            new_lo = max(self.floor, new_lo)
        self.lo, self.hi = new_lo, new_hi
        return new_lo, new_hi


class ViewFit:
    """Both axes of one pyqtgraph ViewBox, with auto-range switched off."""

    def __init__(self, viewbox, x: StableRange, y: StableRange):
        self.vb, self.x, self.y = viewbox, x, y
        viewbox.disableAutoRange()
        self.changes = 0           # how often the view moved (tests and the bench read this)

    def reset(self) -> None:
        self.x.reset()
        self.y.reset()

    def apply(self, xr=None, yr=None) -> bool:
        """xr / yr: new (lo, hi) or None (unchanged). True if the view moved."""
        if xr is None and yr is None:
            return False
        kw = {}
        if xr is not None:
            kw["xRange"] = xr
        if yr is not None:
            kw["yRange"] = yr
        self.vb.setRange(padding=0, **kw)
        self.changes += 1
        return True

    def fit(self, x_lo=None, x_hi=None, y_lo=None, y_hi=None) -> bool:
        xr = self.x.fit(x_lo, x_hi) if x_lo is not None else None
        yr = self.y.fit(y_lo, y_hi) if y_lo is not None else None
        return self.apply(xr, yr)

    def fix_x(self, lo: float, hi: float) -> bool:
        if (self.x.lo, self.x.hi) == (float(lo), float(hi)):
            return False
        return self.apply(self.x.fixed(lo, hi), None)


def finite_min_max(*arrays) -> tuple[float, float]:
    """(min, max) over the finite values of the arrays; (nan, nan) when there are none."""
    import numpy as np
    lo, hi = math.inf, -math.inf
    for a in arrays:
        if a is None or len(a) == 0:
            continue
        a = np.asarray(a, dtype=np.float64)
        a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else (math.nan, math.nan)
