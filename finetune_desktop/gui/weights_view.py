"""The weights-and-biases view: what fine-tuning does to the numbers inside the model.

- a heatmap of one matrix (layer + projection picker): its change since the start (W - W0; with
  LoRA the effective change (alpha/r)·B·A, which is what the adapter adds to W) on a diverging
  colormap with a SYMMETRIC scale set from the 99th percentile of |values| (so at most ~1% of the
  cells saturate); the scale only grows when the change outgrows it (so growth shows as colour
  getting stronger) and "Rescale" fits it to now; or the current values;
- beside it, the RMS of each row (output) and column (input) of the shown matrix: where the
  change concentrates;
- the chosen layer's bias vector now against its pre-trained values;
- a histogram of the shown matrix.
(Which matrices moved most, the update size per layer and the gradient norm are in the
overview tab, overview_view.py.)

Snapshots arrive as copies (WeightSnapshot events, up to ~4 a second); the latest one is drawn
at most 2.5 times a second, spread over two timer ticks (heatmap and its row/column RMS;
histogram and bias), and only while the view is on screen. The plots' ranges only move when the
data leaves them (ranges.py), so their axes are not recomputed and repainted on every update."""
from __future__ import annotations

import re
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (QButtonGroup, QComboBox, QHBoxLayout, QLabel, QPushButton, QRadioButton,
                               QSizePolicy, QVBoxLayout, QWidget)

from . import style
from .ranges import StableRange, ViewFit, finite_min_max

DRAW_INTERVAL_S = 0.4   # a new snapshot is drawn at most this often
TICK_MS = 120           # one stage of a drawing per tick
LEVEL_PERCENTILE = 99.0  # the colour scale is ± this percentile of |values| ...
LEVEL_HEADROOM = 1.25    # ... times this when it grows (so growth stays visible as stronger colour)
LEVEL_SHRINK = 0.1       # ... and it is fitted again only when the values fall below this share of it

DIVERGING = pg.ColorMap(pos=np.array([0.0, 0.25, 0.5, 0.75, 1.0]),
                        color=np.array([(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130),
                                        (178, 24, 43)], dtype=np.ubyte))

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def split_name(name: str) -> tuple[str, str]:
    """'model.layers.3.self_attn.q_proj.weight' -> ('layer 3', 'q_proj'); other names -> ('other', name)."""
    m = _LAYER_RE.search(name)
    layer = f"layer {m.group(1)}" if m else "other"
    parts = [p for p in name.split(".") if p not in ("weight", "bias", "lora_A", "lora_B", "model", "base_model")]
    return layer, (parts[-1] if parts else name)


def _layer_key(label: str) -> tuple:
    m = re.search(r"(\d+)", label)
    return (0, int(m.group(1))) if m else (1, label)


class WeightsView(QWidget):
    """objectName `weightsView`."""

    snapshotDrawn = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("weightsView")
        self.setAccessibleName("Weights and biases view")
        self.snapshot_count = 0          # snapshots received (tests read this)
        self.latest = None               # the latest WeightSnapshot
        self.focus_name: str | None = None   # the matrix whose full-resolution histogram the loop sends
        self.method = "lora"             # the run's method (how the change is made)
        self._pending = False
        self._levels: dict[tuple[str, str], float] = {}   # (mode, matrix) -> symmetric colour level
        self._names: list[str] = []
        self._stages: list = []
        self._last_cycle = -1e9
        self._build()
        self.timer = QTimer(self)            # runs only while there is something to draw
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        self.layer_box = QComboBox()
        self.layer_box.setToolTip("Which transformer layer to look inside.")
        self.layer_box.setMinimumContentsLength(8)
        self.layer_box.setMaxVisibleItems(16)
        self.proj_box = QComboBox()
        self.proj_box.setToolTip("Which weight matrix of that layer: q/k/v/o are attention, gate/up/down the MLP.")
        self.proj_box.setMinimumContentsLength(9)
        self.mode_delta = QRadioButton("Change since start")
        self.mode_delta.setToolTip("Colour = how much each weight moved away from its pre-trained value. "
                                   "Blue went down, red went up, white did not change.")
        self.mode_now = QRadioButton("Current values")
        self.mode_now.setToolTip("Colour = the weight values themselves right now.")
        self.mode_delta.setChecked(True)
        grp = QButtonGroup(self)
        grp.addButton(self.mode_delta)
        grp.addButton(self.mode_now)
        self.rescale_button = QPushButton("Rescale")
        self.rescale_button.setToolTip("The colour scale grows with the change so you can watch it grow. "
                                       "Press to fit it to the values shown now (99% of them inside).")
        self.info = QLabel("Weights appear here when training starts.")
        self.info.setObjectName("weightsInfo")
        self.info.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        for w in (self.layer_box, self.proj_box):
            w.currentIndexChanged.connect(self._selection_changed)
        self.mode_delta.toggled.connect(self._selection_changed)
        self.rescale_button.clicked.connect(self.rescale)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        for w in (self.layer_box, self.proj_box, self.mode_delta, self.mode_now,
                  self.rescale_button):
            row.addWidget(w)
        row.addStretch(1)
        self.glw = pg.GraphicsLayoutWidget()
        self.glw.setBackground("w")
        self.glw.setObjectName("weightsGraphics")
        self.glw.ci.setSpacing(2)
        self.glw.ci.layout.setHorizontalSpacing(6)
        self._build_heat()
        self._build_side()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addLayout(row)
        lay.addWidget(self.info)
        lay.addWidget(self.glw, 1)

    def _build_heat(self) -> None:
        """The heatmap with the column RMS above it, the row RMS beside it and the colour bar."""
        g = self.glw
        self.col_plot = g.addPlot(row=0, col=0)
        self.heat_plot = g.addPlot(row=1, col=0)
        self.row_plot = g.addPlot(row=1, col=1)
        self.heat_plot.setTitle("change since start", size="8pt")
        self.heat_plot.invertY(True)
        self.heat_plot.setAspectLocked(False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setColorMap(DIVERGING)
        self.heat_plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(-1e-3, 1e-3), colorMap=DIVERGING, interactive=False, width=10)
        self.colorbar.setImageItem(self.image)
        g.addItem(self.colorbar, row=1, col=2)
        self.col_bars = pg.BarGraphItem(x=[], height=[], width=0.9, brush=(120, 120, 120, 170), pen=None)
        self.col_plot.addItem(self.col_bars)
        self.row_bars = pg.BarGraphItem(x0=[], y=[], width=[], height=0.9, brush=(120, 120, 120, 170), pen=None)
        self.row_plot.addItem(self.row_bars)
        self.row_plot.invertY(True)
        self.col_plot.setXLink(self.heat_plot)
        self.row_plot.setYLink(self.heat_plot)
        self.col_plot.setMaximumHeight(46)
        self.col_plot.setTitle("RMS per column (input)", size="7pt")
        self.row_plot.setMaximumWidth(64)
        self.row_plot.setTitle("per row", size="7pt")
        self.col_plot.setToolTip("How much each input column of the matrix changed (RMS over its rows): "
                                 "which input features the change uses.")
        self.row_plot.setToolTip("How much each output row changed (RMS over its columns): which outputs "
                                 "the change writes to.")
        for p in (self.heat_plot, self.col_plot, self.row_plot):
            p.hideAxis("bottom")
            p.hideAxis("left")
            p.setMenuEnabled(False)
            p.hideButtons()
            p.setMouseEnabled(x=False, y=False)
        self.heat_plot.setMinimumWidth(140)
        self.heat_fit = ViewFit(self.heat_plot.vb, StableRange(headroom=0.0), StableRange(headroom=0.0))
        self.col_fit = ViewFit(self.col_plot.vb, StableRange(headroom=0.0), StableRange(headroom=0.1, floor=0.0,
                                                                                        shrink=0.3))
        self.row_fit = ViewFit(self.row_plot.vb, StableRange(headroom=0.1, floor=0.0, shrink=0.3),
                               StableRange(headroom=0.0))
        g.ci.layout.setColumnStretchFactor(0, 5)

    def _build_side(self) -> None:
        side = self.glw.addLayout(row=0, col=3, rowspan=2)
        self.bias_plot = side.addPlot(row=0, col=0)
        self.bias_plot.setTitle("bias now vs start", size="8pt")
        self.bias_plot.showGrid(y=True, alpha=0.2)
        self.bias_start = self.bias_plot.plot(pen=pg.mkPen((150, 150, 150), width=1.5), name="pre-trained")
        self.bias_now = self.bias_plot.plot(pen=pg.mkPen((178, 24, 43), width=1.2), name="now")
        self.bias_note = pg.TextItem("", color=(110, 110, 110), anchor=(0.5, 0.5))
        self.bias_plot.addItem(self.bias_note, ignoreBounds=True)
        self.hist_plot = side.addPlot(row=1, col=0)
        self.hist_plot.setTitle("value histogram", size="8pt")
        self.hist_curve = self.hist_plot.plot(stepMode="center", fillLevel=0, brush=(31, 95, 168, 90),
                                              pen=pg.mkPen(style.TRAIN_SMOOTH, width=1))
        for p in (self.bias_plot, self.hist_plot):
            p.setMenuEnabled(False)
            p.hideButtons()
            p.getAxis("left").setWidth(38)
            p.setMinimumWidth(90)
            p.setPreferredWidth(170)
            for ax in ("left", "bottom"):
                p.getAxis(ax).setStyle(tickFont=style.app_font(7))
                p.getAxis(ax).enableAutoSIPrefix(False)
        self.bias_fit = ViewFit(self.bias_plot.vb, StableRange(headroom=0.0), StableRange(headroom=0.1, shrink=0.3))
        self.hist_fit = ViewFit(self.hist_plot.vb, StableRange(headroom=0.05, shrink=0.3),
                                StableRange(headroom=0.15, floor=0.0, shrink=0.3))
        style.cache_axes(self.heat_plot, self.bias_plot, self.hist_plot, self.col_plot, self.row_plot)
        if hasattr(self.colorbar, "axis"):
            self.colorbar.axis.setCacheMode(self.colorbar.axis.CacheMode.DeviceCoordinateCache)
        self.glw.ci.layout.setColumnStretchFactor(3, 3)

    # ------------------------------------------------------------------ data in
    def reset(self) -> None:
        self.snapshot_count = 0
        self.latest = None
        self._levels.clear()
        self._names = []
        with _Blocked(self.layer_box, self.proj_box):
            self.layer_box.clear()
            self.proj_box.clear()
        self.image.clear()
        for c in (self.bias_now, self.bias_start, self.hist_curve):
            c.setData([], [])
        self.col_bars.setOpts(x=[], height=[])
        self.row_bars.setOpts(x0=[], y=[], width=[])
        for f in (self.heat_fit, self.bias_fit, self.hist_fit, self.col_fit, self.row_fit):
            f.reset()
        self._stages = []
        self.info.setText("Weights appear here when training starts.")

    def set_method(self, method: str) -> None:
        """"lora" or "full": how the change since the start is made (the heatmap's title says it)."""
        self.method = method or "lora"

    def save_settings(self, s) -> None:
        s.setValue("weights/mode", "delta" if self.mode_delta.isChecked() else "now")

    def restore_settings(self, s) -> None:
        (self.mode_now if s.value("weights/mode", "delta") == "now" else self.mode_delta).setChecked(True)

    def add_snapshot(self, snap) -> None:
        self.snapshot_count += 1
        self.latest = snap
        self._pending = True
        self._kick()
        names = sorted(set(snap.matrices) | set(snap.current))
        if names != self._names:
            self._names = names
            self._fill_pickers()

    # ------------------------------------------------------------------ pickers
    def _fill_pickers(self) -> None:
        layers: dict[str, list[str]] = {}
        for n in self._names:
            layer, proj = split_name(n)
            layers.setdefault(layer, [])
            if proj not in layers[layer]:
                layers[layer].append(proj)
        self._by_layer = layers
        cur_layer, cur_proj = self.layer_box.currentText(), self.proj_box.currentText()
        with _Blocked(self.layer_box, self.proj_box):
            self.layer_box.clear()
            self.layer_box.addItems(sorted(layers, key=_layer_key))
            if cur_layer in layers:
                self.layer_box.setCurrentText(cur_layer)
            self._fill_proj(cur_proj)

    def _fill_proj(self, keep: str = "") -> None:
        projs = self._by_layer.get(self.layer_box.currentText(), []) if hasattr(self, "_by_layer") else []
        self.proj_box.clear()
        self.proj_box.addItems(projs)
        if keep in projs:
            self.proj_box.setCurrentText(keep)

    def _selection_changed(self) -> None:
        if self.sender() is self.layer_box:
            with _Blocked(self.proj_box):
                self._fill_proj(self.proj_box.currentText())
        self._pending = True
        self._kick()

    def select(self, layer: str, proj: str) -> None:
        self.layer_box.setCurrentText(layer)
        self.proj_box.setCurrentText(proj)

    def chosen_name(self) -> str | None:
        layer, proj = self.layer_box.currentText(), self.proj_box.currentText()
        for n in self._names:
            if split_name(n) == (layer, proj):
                return n
        return None

    # ------------------------------------------------------------------ drawing
    def rescale(self) -> None:
        mat, key = self._current_matrix()
        if mat is not None and mat.size:
            self._levels[key] = percentile_level(mat)
            self._pending = True
            self._draw()

    def level_for(self, key, mat: np.ndarray) -> float:
        """The symmetric colour level of this matrix: set from the LEVEL_PERCENTILE of |values|,
        grown (with headroom) only when the values outgrow it, fitted again when they shrink far."""
        p = percentile_level(mat)
        cur = self._levels.get(key)
        if cur is None or cur <= 0 or p > cur or p < LEVEL_SHRINK * cur:
            cur = p * LEVEL_HEADROOM if p > 0 else 0.0
            if cur > 0:
                self._levels[key] = cur
        return cur

    def _current_matrix(self):
        snap, name = self.latest, self.chosen_name()
        if snap is None or name is None:
            return None, None
        mode = "delta" if self.mode_delta.isChecked() else "now"
        src = snap.matrices if mode == "delta" else snap.current
        mat = src.get(name)
        if mat is None:  # this matrix is only available in the other mode
            other = snap.current if mode == "delta" else snap.matrices
            mat = other.get(name)
            mode = "now" if mode == "delta" else "delta"
        return (None if mat is None else np.asarray(mat, dtype=np.float32)), (mode, name)

    def on_screen(self) -> bool:
        return self.isVisible() and not self.visibleRegion().isEmpty() and not self.window().isMinimized()

    def _kick(self) -> None:
        if not self.timer.isActive():
            self.timer.start(TICK_MS)

    def _tick(self) -> None:
        """At most one piece of the view per tick (heatmap and its row/column RMS / histogram and
        bias), so a new snapshot is drawn over short event-loop turns instead of one long one; a
        new drawing starts at most every DRAW_INTERVAL_S, and only while the view is on screen."""
        if not (self._pending or self._stages):
            self.timer.stop()
            return
        if not self.on_screen():
            self.timer.start(500)            # hidden: look again later, draw nothing now
            return
        self.timer.setInterval(TICK_MS)
        now = time.monotonic()
        if self._pending and not self._stages and now - self._last_cycle >= DRAW_INTERVAL_S:
            self._pending = False
            self._last_cycle = now
            self._stages = [self._draw_heat, self._draw_hist_and_bias]
        if self._stages:
            self._stages.pop(0)()
            if not self._stages and self.latest is not None:
                self.snapshotDrawn.emit(self.latest.step)

    def _draw(self) -> None:
        """Everything at once (Rescale, a changed selection in tests)."""
        self._pending = False
        self._stages = []
        if self.latest is None:
            return
        self._draw_heat()
        self._draw_hist_and_bias()
        self.snapshotDrawn.emit(self.latest.step)

    def _draw_heat(self) -> None:
        snap = self.latest
        mat, key = self._current_matrix()
        if snap is None or mat is None or mat.ndim != 2 or not mat.size:
            return
        mode, name = key
        level = self.level_for(key, mat)
        shown = level if level > 0 else 1e-6
        self.image.setImage(mat, levels=(-shown, shown), autoLevels=False)
        rows, cols = mat.shape
        self.heat_fit.fix_x(0.0, float(cols))
        if (self.heat_fit.y.lo, self.heat_fit.y.hi) != (0.0, float(rows)):
            self.heat_fit.apply(None, self.heat_fit.y.fixed(0.0, float(rows)))
        if self.colorbar.levels() != (-shown, shown):
            self.colorbar.setLevels((-shown, shown))
            # three short labels (automatic ones like -0.0004 do not fit the bar's narrow axis)
            half = shown / 2
            self.colorbar.axis.setTicks([[(-half, short_number(-half)), (0.0, "0"), (half, short_number(half))], []])
        self._draw_norms(mat)
        how = "(α/r)·B·A" if self.method == "lora" else "W − W₀"
        title = (f"change since start = {how}" if mode == "delta" else "current values") + f" · {rows}×{cols}"
        if title != getattr(self, "_heat_title", None):
            self._heat_title = title
            self.heat_plot.setTitle(title, size="8pt")
        peak = float(np.max(np.abs(mat)))
        clipped = float(np.mean(np.abs(mat) > shown)) if shown > 0 else 0.0
        what = "largest change" if mode == "delta" else "largest value"
        short = name.removeprefix("model.").removesuffix(".weight")
        self.info.setText(f"step {snap.step}: {short} · {what} {peak:.3g} · scale ±{shown:.2g} "
                          f"({100 * (1 - clipped):.1f}% of cells inside)")
        self.info.setToolTip(f"{name}\nThe colour scale is symmetric and set from the {LEVEL_PERCENTILE:.0f}th "
                             "percentile of |values|, so a few extreme weights do not wash out the rest.")

    def _draw_norms(self, mat: np.ndarray) -> None:
        """RMS of each column and each row of the shown matrix: where the change concentrates."""
        col = np.sqrt(np.mean(np.square(mat, dtype=np.float64), axis=0))
        row = np.sqrt(np.mean(np.square(mat, dtype=np.float64), axis=1))
        self.col_bars.setOpts(x=np.arange(len(col)) + 0.5, height=col, width=0.9)
        self.row_bars.setOpts(x0=np.zeros(len(row)), y=np.arange(len(row)) + 0.5, width=row, height=0.9)
        self.col_fit.fit(y_lo=0.0, y_hi=float(col.max()) if len(col) else 1.0)
        self.row_fit.fit(x_lo=0.0, x_hi=float(row.max()) if len(row) else 1.0)

    def _draw_hist_and_bias(self) -> None:
        snap = self.latest
        mat, key = self._current_matrix()
        if snap is None:
            return
        if mat is not None and mat.size:
            name = key[1]
            counts, edges = snap.histogram if (snap.histogram is not None and name == self.focus_name) \
                else (np.zeros(0), np.zeros(0))
            if len(counts) == 0 or len(edges) != len(counts) + 1:
                vals = snap.current.get(name, mat) if snap.current else mat
                vals = np.asarray(vals, dtype=np.float32)
                lo, hi = float(vals.min()), float(vals.max())
                if hi <= lo:
                    lo, hi = lo - 1e-6, hi + 1e-6
                counts, edges = np.histogram(vals, bins=40, range=(lo, hi))
            edges, counts = np.asarray(edges, float), np.asarray(counts, float)
            self.hist_curve.setData(edges, counts)
            if len(counts):
                self.hist_fit.fit(float(edges[0]), float(edges[-1]), 0.0, float(counts.max()))
        self._draw_bias()

    def _draw_bias(self) -> None:
        snap = self.latest
        layer, proj = self.layer_box.currentText(), self.proj_box.currentText()
        match = None
        for n, pair in (snap.biases or {}).items():
            if split_name(n) == (layer, proj):
                match = (n, pair)
                break
        if match is None and snap.biases:
            # this projection has no bias: show the first bias of the same layer
            for n, pair in snap.biases.items():
                if split_name(n)[0] == layer:
                    match = (n, pair)
                    break
        if match is None:
            self.bias_now.setData([], [])
            self.bias_start.setData([], [])
            self.bias_note.setText("no bias in this layer")
            self.bias_note.setPos(0, 0)
            self.bias_fit.fix_x(-1.0, 1.0)
            if (self.bias_fit.y.lo, self.bias_fit.y.hi) != (-1.0, 1.0):
                self.bias_fit.apply(None, self.bias_fit.y.fixed(-1.0, 1.0))
            return
        name, (now, start) = match
        now = np.asarray(now, float)
        start = np.asarray(start, float)
        x = np.arange(len(now))
        self.bias_start.setData(x, start)
        self.bias_now.setData(x, now)
        self.bias_fit.fix_x(0.0, float(max(1, len(now) - 1)))
        lo, hi = finite_min_max(now, start)
        if hi == hi:
            self.bias_fit.fit(y_lo=lo, y_hi=hi)
        moved = float(np.max(np.abs(now - start))) if len(now) else 0.0
        self.bias_note.setText("")
        frozen = moved == 0 and snap.step
        title = f"bias {split_name(name)[1]}" + (" (frozen)" if frozen else ": now vs start")
        if title != getattr(self, "_bias_title", None):
            self._bias_title = title
            self.bias_plot.setTitle(title, size="8pt")
        self.bias_plot.setToolTip("Grey: the pre-trained bias values. Red: the values now. With LoRA the "
                                  "original weights and biases stay frozen; the change lives in the adapters.")


def short_number(v: float) -> str:
    """At most ~5 characters: 0.25, -0.03, 2e-4, -5e-6."""
    if v == 0 or abs(v) >= 0.01:
        return f"{v:.2g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def percentile_level(mat: np.ndarray) -> float:
    """The LEVEL_PERCENTILE of |values| (the largest |value| when that percentile is 0)."""
    a = np.abs(np.asarray(mat, dtype=np.float32)).ravel()
    if not a.size:
        return 0.0
    p = float(np.percentile(a, LEVEL_PERCENTILE))
    return p if p > 0 else float(a.max())


class _Blocked:
    """Block a few widgets' signals while they are updated programmatically."""

    def __init__(self, *widgets):
        self.widgets = widgets

    def __enter__(self):
        self.old = [w.blockSignals(True) for w in self.widgets]

    def __exit__(self, *exc):
        for w, o in zip(self.widgets, self.old):
            w.blockSignals(o)
