"""Which tensors moved most: a layers × tensor-kinds grid coloured by ||W - W0|| / ||W0|| (the
change of each matrix since the start, measured exactly on the training thread, live_model.py),
beside the size of the latest update per layer and the gradient norm per step.

Data arrives at most a few times a second; the view draws at most DRAW_HZ times a second and
only while it is on screen (a hidden view only remembers the latest numbers). The training
thread measures the grid only while this view is shown (`wantedChanged`)."""
from __future__ import annotations

import re
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QSplitter, QVBoxLayout, QWidget

from . import style
from .buffers import Series
from .ranges import StableRange, ViewFit, finite_min_max
from .tensor_grid import LayerTensorGrid, kind_label

DRAW_HZ = 2.0


def _layer_key(label: str) -> tuple:
    m = re.search(r"(\d+)", label)
    return (0, int(m.group(1))) if m else (1, label)


class OverviewView(QWidget):
    """objectName `overviewView`."""

    matrixChosen = Signal(str, str)     # "layer N", projection: look at it in the weights view
    wantedChanged = Signal(bool)        # the grid is on screen (the training thread measures only then)
    drawn = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("overviewView")
        self.changes = None               # latest live_model.TensorChanges
        self.relative_update: dict[str, float] = {}
        self.grad = Series(("step", "grad_norm"))
        self._dirty = {"grid": False, "bars": False, "grad": False}
        self._drawn_at = -1e9
        self._total_steps = 0
        self._wanted = False
        self._build()
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self._tick)

    def _build(self) -> None:
        self.info = QLabel("Colour = how far each matrix moved since the start, ||W − W₀|| / ||W₀|| "
                           "(log scale). Hover a cell for its value; click it to look inside.")
        self.info.setWordWrap(True)
        self.info.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.status = QLabel("Shown while a run trains (and for a saved run when you open it).")
        self.status.setObjectName("overviewStatus")
        self.status.setStyleSheet("color: #55626f;")
        self.grid = LayerTensorGrid("relative change since the start")
        self.grid.setObjectName("changeGrid")
        self.grid.cellClicked.connect(lambda l, k: self.matrixChosen.emit(f"layer {l}", k))
        side = pg.GraphicsLayoutWidget()
        side.setBackground("w")
        self.side = side
        self.bar_plot = side.addPlot(row=0, col=0)
        self.bar_plot.setTitle("latest update size / layer", size="8pt")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=(31, 95, 168, 180))
        self.bar_plot.addItem(self.bars)
        self.grad_plot = side.addPlot(row=1, col=0)
        self.grad_plot.setTitle("gradient norm", size="8pt")
        self.grad_plot.setClipToView(True)
        self.grad_plot.setDownsampling(auto=True, mode="peak")
        self.grad_curve = self.grad_plot.plot(pen=pg.mkPen(style.GRADNORM, width=1.2))
        for p in (self.bar_plot, self.grad_plot):
            p.setMenuEnabled(False)
            p.hideButtons()
            p.showGrid(y=True, alpha=0.2)
            p.getAxis("left").setWidth(38)
            for ax in ("left", "bottom"):
                p.getAxis(ax).setStyle(tickFont=style.app_font(7))
                p.getAxis(ax).enableAutoSIPrefix(False)
        self.bar_fit = ViewFit(self.bar_plot.vb, StableRange(headroom=0.0),
                               StableRange(headroom=0.2, floor=0.0, shrink=0.3))
        self.grad_fit = ViewFit(self.grad_plot.vb, StableRange(headroom=0.0, floor=0.0),
                                StableRange(headroom=0.2, floor=0.0, shrink=0.2))
        style.cache_axes(self.bar_plot, self.grad_plot)
        split = QSplitter()
        split.addWidget(self.grid)
        split.addWidget(side)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setChildrenCollapsible(False)
        self.splitter = split
        top = QHBoxLayout()
        top.addWidget(self.status, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.info)
        lay.addLayout(top)
        lay.addWidget(split, 1)

    # ------------------------------------------------------------------ data in
    def reset(self) -> None:
        self.changes = None
        self.relative_update = {}
        self.grad.clear()
        self.grid.set_values({})
        self.bars.setOpts(x=[], height=[])
        self.grad_curve.setData([], [])
        for f in (self.bar_fit, self.grad_fit):
            f.reset()
        self._total_steps = 0
        self.status.setText("Shown while a run trains (and for a saved run when you open it).")

    def set_total_steps(self, total: int) -> None:
        self._total_steps = max(1, int(total))
        self.grad_fit.fix_x(0.0, float(self._total_steps))

    def set_changes(self, changes) -> None:
        """live_model.TensorChanges."""
        self.changes = changes
        self._mark("grid")

    def add_snapshot(self, snap) -> None:
        if snap.relative_update:
            self.relative_update = dict(snap.relative_update)
            self._mark("bars")

    def add_steps(self, metrics: list) -> None:
        if metrics:
            self.grad.append_rows({"step": [m.step for m in metrics], "grad_norm": [m.grad_norm for m in metrics]})
            self._mark("grad")

    def load_rows(self, rows: list[dict]) -> None:
        self.grad.clear()
        pts = [r for r in rows if r.get("grad_norm") is not None and r.get("step") is not None]
        if pts:
            self.grad.append_rows({"step": [r["step"] for r in pts], "grad_norm": [r["grad_norm"] for r in pts]})
        self._mark("grad")

    # ------------------------------------------------------------------ drawing
    def on_screen(self) -> bool:
        return self.isVisible() and not self.visibleRegion().isEmpty() and not self.window().isMinimized()

    def _mark(self, what: str) -> None:
        self._dirty[what] = True
        if not self.timer.isActive():
            wait = max(0.0, 1.0 / DRAW_HZ - (time.monotonic() - self._drawn_at))
            self.timer.start(int(wait * 1000) + 10)

    def showEvent(self, e) -> None:
        super().showEvent(e)
        self._set_wanted(True)
        if any(self._dirty.values()):
            self.timer.start(10)

    def hideEvent(self, e) -> None:
        super().hideEvent(e)
        self._set_wanted(False)

    def _set_wanted(self, on: bool) -> None:
        if on != self._wanted:
            self._wanted = on
            self.wantedChanged.emit(on)

    def _tick(self) -> None:
        if not any(self._dirty.values()):
            return
        if not self.on_screen():
            return                      # drawn when shown again (showEvent)
        self.draw_now()

    def draw_now(self) -> None:
        self._drawn_at = time.monotonic()
        if self._dirty["grid"]:
            self._draw_grid()
        if self._dirty["bars"]:
            self._draw_bars()
        if self._dirty["grad"]:
            self._draw_grad()
        self._dirty = dict.fromkeys(self._dirty, False)
        self.drawn.emit()

    def _draw_grid(self) -> None:
        ch = self.changes
        if ch is None:
            return
        if ch.note:
            self.status.setText(ch.note)
            return
        self.grid.set_values(ch.changes)
        if ch.changes:
            name, top = max(ch.changes.items(), key=lambda kv: kv[1])
            from .tensor_grid import split_tensor
            lk = split_tensor(name)
            where = f"layer {lk[0]} {kind_label(lk[1])}" if lk else name
            self.status.setText(f"step {ch.step}: {len(ch.changes)} matrices · moved most: {where} "
                                f"({top:.2g} of its size)")

    def _draw_bars(self) -> None:
        rel = self.relative_update
        labels = sorted(rel, key=_layer_key)
        heights = [float(rel[k]) for k in labels]
        self.bars.setOpts(x=np.arange(len(labels)), height=heights, width=0.7)
        self.bar_fit.fix_x(-0.5, len(labels) - 0.5)
        top = finite_min_max(heights)[1]
        if top == top:
            self.bar_fit.fit(y_lo=0.0, y_hi=top)
        if labels != getattr(self, "_bar_labels", None):
            self._bar_labels = labels
            step = max(1, len(labels) // 8)
            self.bar_plot.getAxis("bottom").setTicks(
                [[(i, re.sub(r"\D", "", k) or k) for i, k in enumerate(labels) if i % step == 0]])

    def _draw_grad(self) -> None:
        x, y = self.grad.view("step"), self.grad.view("grad_norm")
        few = len(x) < 40             # a few steps (step mode): dots, or a single step would not show
        self.grad_curve.setData(x, y, connect="finite", symbol="o" if few else None, symbolSize=5,
                                symbolBrush=style.GRADNORM, symbolPen=None)
        if len(x):
            if x[-1] > (self.grad_fit.x.hi or 0.0):
                self.grad_fit.fix_x(0.0, float(max(self._total_steps, x[-1])))
            hi = finite_min_max(y)[1]
            if hi == hi:
                self.grad_fit.fit(y_lo=0.0, y_hi=hi)
