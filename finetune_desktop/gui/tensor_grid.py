"""A layers × tensor-kinds grid: one coloured cell per tensor (rows: layers, top to bottom;
columns: q, k, v, o, gate, up, down, then biases and norms when they have values). Used for how
far each matrix moved since the start (the overview tab) and, in step mode, for the gradient
norm and the update/weight ratio of one step. Values span orders of magnitude, so the colour is
log-scaled; hovering a cell shows its exact value; clicking it asks to look at that matrix.

A 30-layer model keeps cells at least MIN_ROW_PX high and labels every n-th layer so the labels
never overlap; one setImage per update, whatever the number of tensors."""
from __future__ import annotations

import math
import re

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QToolTip

from . import style

MIN_ROW_PX = 7
LABEL_CELLS_UP_TO = 12 * 8    # cells that get their value written in them (a small model's grid)
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down", "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?([\w.]+)$")

SEQUENTIAL = pg.ColorMap(pos=np.array([0.0, 0.35, 0.7, 1.0]),
                         color=np.array([(247, 251, 255), (158, 202, 225), (49, 130, 189), (8, 48, 107)],
                                        dtype=np.ubyte))


def split_tensor(name: str) -> tuple[int, str] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> (3, 'q_proj'); a bias -> (3, 'q_proj.bias');
    'model.layers.3.input_layernorm.weight' -> (3, 'input_layernorm'); others -> None."""
    m = _LAYER_NAME.match(name)
    if not m:
        return None
    rest = m.group(2)
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return int(m.group(1)), rest


def kind_label(kind: str) -> str:
    if kind.endswith(".bias"):
        return SHORT.get(kind[:-5], kind[:-5]) + " bias"
    return SHORT.get(kind, kind)


def arrange(values: dict[str, float]) -> tuple[np.ndarray, list[str], int, dict[str, float]]:
    """-> (grid [layers, kinds] with NaN where a tensor has no value, kind names, layers, the
    values of tensors outside the layers (embeddings, final norm))."""
    cells: dict[tuple[int, str], float] = {}
    others = {}
    for name, v in values.items():
        lk = split_tensor(name)
        if lk is None:
            others[name] = float(v)
        else:
            cells[lk] = float(v)
    kinds = sorted({k for _, k in cells}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else
                                                          len(KIND_ORDER) + (1 if k.endswith(".bias") else 2), k))
    layers = 1 + max((l for l, _ in cells), default=-1)
    grid = np.full((layers, len(kinds)), np.nan)
    col = {k: i for i, k in enumerate(kinds)}
    for (l, k), v in cells.items():
        grid[l, col[k]] = v
    return grid, kinds, layers, others


class LayerTensorGrid(pg.GraphicsLayoutWidget):
    cellClicked = Signal(int, str)       # layer, kind (e.g. 3, "q_proj")

    def __init__(self, value_name: str, parent=None):
        super().__init__(parent)
        self.setBackground("w")
        self.value_name = value_name      # e.g. "relative change since the start"
        self.plot = self.addPlot(row=0, col=0)
        self.plot.invertY(True)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.showAxis("top")
        self.plot.hideAxis("bottom")
        for ax in ("left", "top"):
            self.plot.getAxis(ax).setStyle(tickFont=style.app_font(7.5), tickLength=0)
            self.plot.getAxis(ax).enableAutoSIPrefix(False)
        self.plot.getAxis("left").setLabel("layer")
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setColorMap(SEQUENTIAL)
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(-6, -1), colorMap=SEQUENTIAL, interactive=False, width=10)
        self.colorbar.setImageItem(self.image)
        self.addItem(self.colorbar, row=0, col=1)
        self.plot.vb.disableAutoRange()
        style.cache_axes(self.plot)
        self.grid = np.zeros((0, 0))
        self.kinds: list[str] = []
        self.layers = 0
        self.others: dict[str, float] = {}
        self._shape = None
        self._levels = None
        self._labels: list[pg.TextItem] = []
        self.scene().sigMouseMoved.connect(self._hover)
        self.scene().sigMouseClicked.connect(self._clicked)

    def set_values(self, values: dict[str, float]) -> None:
        grid, kinds, layers, others = arrange(values)
        self.grid, self.kinds, self.layers, self.others = grid, kinds, layers, others
        if not grid.size:
            self.image.clear()
            while self._labels:
                self.plot.removeItem(self._labels.pop())
            return
        finite = grid[np.isfinite(grid) & (grid > 0)]
        lo = math.floor(math.log10(float(finite.min()))) if finite.size else -6
        hi = math.ceil(math.log10(float(finite.max()))) if finite.size else -1
        if hi <= lo:
            hi = lo + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(grid > 0, np.log10(np.where(grid > 0, grid, 1.0)), np.nan if finite.size else lo)
        shown = np.where(np.isfinite(shown), shown, lo)
        self.image.setImage(shown, levels=(lo, hi), autoLevels=False)
        if self._levels != (lo, hi):
            self._levels = (lo, hi)
            self.colorbar.setLevels((lo, hi))
            self.colorbar.axis.setTicks([[(float(v), f"1e{v}") for v in range(lo, hi + 1)]])
        if self._shape != grid.shape or getattr(self, "_kinds_shown", None) != kinds:
            self._shape, self._kinds_shown = grid.shape, list(kinds)
            self._relabel()
        self._write_values(shown, lo, hi)

    def _write_values(self, shown: np.ndarray, lo: float, hi: float) -> None:
        """A small grid gets each value written in its cell (white on the dark cells)."""
        rows, cols = self.grid.shape
        want = rows * cols if rows * cols <= LABEL_CELLS_UP_TO else 0
        while len(self._labels) > want:
            self.plot.removeItem(self._labels.pop())
        while len(self._labels) < want:
            t = pg.TextItem("", anchor=(0.5, 0.5))
            t.setFont(style.app_font(7.5))
            self.plot.addItem(t, ignoreBounds=True)
            self._labels.append(t)
        for i, t in enumerate(self._labels):
            r, c = divmod(i, cols)
            v = self.grid[r, c]
            t.setText("" if not np.isfinite(v) else f"{v:.2g}")
            dark = (shown[r, c] - lo) / (hi - lo) > 0.55
            t.setColor((255, 255, 255) if dark else (30, 40, 50))
            t.setPos(c + 0.5, r + 0.5)

    def _relabel(self) -> None:
        rows, cols = self.grid.shape
        self.plot.vb.setRange(xRange=(0, cols), yRange=(0, rows), padding=0)
        self.plot.getAxis("top").setTicks([[(i + 0.5, kind_label(k)) for i, k in enumerate(self.kinds)]])
        every = max(1, math.ceil(rows / 12))
        self.plot.getAxis("left").setTicks([[(l + 0.5, str(l)) for l in range(0, rows, every)],
                                            [(l + 0.5, "") for l in range(rows)]])
        self.setMinimumHeight(min(60 + MIN_ROW_PX * rows, 400))

    def cell_at(self, scene_pos) -> tuple[int, int] | None:
        if not self.grid.size or not self.plot.vb.sceneBoundingRect().contains(scene_pos):
            return None
        p = self.plot.vb.mapSceneToView(scene_pos)
        r, c = int(math.floor(p.y())), int(math.floor(p.x()))
        if 0 <= r < self.grid.shape[0] and 0 <= c < self.grid.shape[1]:
            return r, c
        return None

    def describe(self, r: int, c: int) -> str:
        v = self.grid[r, c]
        val = "no value (not trained)" if not np.isfinite(v) else f"{v:.3g}"
        return f"layer {r} · {kind_label(self.kinds[c])}\n{self.value_name}: {val}"

    def _hover(self, pos) -> None:
        cell = self.cell_at(pos)
        if cell is None:
            return
        QToolTip.showText(self.mapToGlobal(self.mapFromScene(pos)), self.describe(*cell), self)

    def _clicked(self, ev) -> None:
        cell = self.cell_at(ev.scenePos())
        if cell is not None:
            self.cellClicked.emit(cell[0], self.kinds[cell[1]])
