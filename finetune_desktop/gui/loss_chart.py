"""The live loss chart: train loss raw + smoothed, validation points, epoch boundaries, token
accuracy (right axis) and the learning rate in a small linked chart below. When the run has
them: the general-ability loss (the forgetting meter: loss on the base model's ordinary dialogs,
beside the validation loss) and the quiz score (share of quiz questions answered right, right
axis). Neither is drawn when the run does not measure it.

Points go into preallocated buffers when they arrive; a QTimer redraws at most 10 times a
second, only when something changed and the chart is on screen. The view ranges are fixed
while a run draws (x: 0 .. the run's total steps, known from RunStarted; y: from well below the
lowest loss to 10% above the highest, moved only when a loss leaves it), so the axes are not
recomputed, relaid out and repainted for every point: a redraw repaints the curves. Clip-to-view and peak
downsampling keep 100,000 points smooth."""
from __future__ import annotations

import csv
import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QSizePolicy,
                               QSlider, QVBoxLayout, QWidget)

from . import style
from .buffers import EmaState, Series
from .ranges import StableRange, ViewFit, finite_min_max

LR_STRIP_INTERVAL_S = 1.0   # the learning-rate strip redraws at most this often during a run
EPOCH_LABEL_PX = 80         # epoch labels at least this far apart
STEP_COLS = ("step", "epoch", "loss", "smooth", "acc", "lr", "grad_norm", "tps")
EVAL_COLS = ("step", "epoch", "valid_loss", "valid_acc", "general_loss", "quiz")


class LossChart(pg.PlotWidget):
    """objectName `lossChart`: a pyqtgraph PlotWidget that owns its data buffers."""

    def __init__(self, parent=None):
        super().__init__(parent=parent, background="w")
        self.setObjectName("lossChart")
        self.setAccessibleName("Loss chart")
        self.setMinimumHeight(160)
        pi = self.getPlotItem()
        pi.showGrid(x=True, y=True, alpha=0.2)
        pi.setLabel("left", "loss")
        pi.setLabel("bottom", "step")
        pi.setClipToView(True)
        pi.setDownsampling(auto=True, mode="peak")
        for ax in ("left", "bottom", "right"):
            pi.getAxis(ax).enableAutoSIPrefix(False)
        # fixed ranges (see the module's docstring): x = 0 .. total steps, y = 0 .. top loss
        self.view_fit = ViewFit(pi.vb, StableRange(headroom=0.0, floor=0.0), StableRange(headroom=0.15, floor=0.0))
        self.view_fit.apply((0.0, 1.0), (0.0, 1.0))
        self.raw_curve = pi.plot(pen=pg.mkPen(style.TRAIN_RAW, width=1), name="train loss")
        self.smooth_curve = pi.plot(pen=pg.mkPen(style.TRAIN_SMOOTH, width=2), name="train (smoothed)")
        self.valid_curve = pi.plot(pen=pg.mkPen(style.VALID, width=1.5, style=Qt.PenStyle.DashLine),
                                   symbol="o", symbolSize=7, symbolBrush=style.VALID, symbolPen=None,
                                   name="validation loss")
        self.general_curve = pi.plot(pen=pg.mkPen(style.GENERAL, width=1.5, style=Qt.PenStyle.DashDotLine),
                                     symbol="s", symbolSize=6, symbolBrush=style.GENERAL, symbolPen=None,
                                     name="general ability")
        for c in (self.raw_curve, self.smooth_curve):
            c.setClipToView(True)
            c.setDownsampling(auto=True, method="peak")
        # token accuracy on its own right-hand axis (0..1)
        self.acc_view = pg.ViewBox()
        pi.showAxis("right")
        pi.scene().addItem(self.acc_view)
        pi.getAxis("right").linkToView(self.acc_view)
        pi.getAxis("right").setLabel("token accuracy", color=_hex(style.ACCURACY))
        self.acc_view.setXLink(pi)
        self.acc_view.disableAutoRange()
        self.acc_view.setYRange(0, 1, padding=0.02)
        self.acc_view.setMouseEnabled(x=False, y=False)
        self.acc_curve = pg.PlotDataItem(pen=pg.mkPen(style.ACCURACY, width=1.2))
        self.acc_curve.setClipToView(True)
        self.acc_curve.setDownsampling(auto=True, method="peak")
        self.acc_view.addItem(self.acc_curve)
        self.quiz_curve = pg.PlotDataItem(pen=pg.mkPen(style.QUIZ, width=1.5), symbol="t1", symbolSize=8,
                                          symbolBrush=style.QUIZ, symbolPen=None, stepMode=None)
        self.acc_view.addItem(self.quiz_curve)
        pi.vb.sigResized.connect(self._sync_views)
        self.cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((90, 90, 90, 120), width=1))
        self.cursor.setVisible(False)
        pi.addItem(self.cursor, ignoreBounds=True)
        self.epoch_lines: list[pg.InfiniteLine] = []
        self._epochs: list[tuple[float, int]] = []  # (step, epoch) of each line
        self._steps_shown = 0.0
        pi.vb.sigResized.connect(self.relabel_epochs)
        pi.vb.sigXRangeChanged.connect(self.relabel_epochs)
        self.overlays: dict[str, pg.PlotDataItem] = {}


    def _sync_views(self):
        self.acc_view.setGeometry(self.getPlotItem().vb.sceneBoundingRect())
        self.acc_view.linkedViewChanged(self.getPlotItem().vb, self.acc_view.XAxis)

    def add_epoch_line(self, step: float, epoch: int, steps_shown: float = 0.0) -> None:
        """A dotted line at an epoch's end, labelled "epoch 3" when labels stay apart (relabel)."""
        # the same anchor for every label (pyqtgraph's default flips it at the view's centre, where two
        # labels then face each other and overlap): always just right of its line
        line = pg.InfiniteLine(pos=step, angle=90, movable=False,
                               pen=pg.mkPen((150, 150, 150), width=1, style=Qt.PenStyle.DotLine),
                               label=f"epoch {epoch}", labelOpts={"position": 0.95, "color": (110, 110, 110),
                                                                  "anchors": [(0, 0.5), (0, 0.5)]})
        self.getPlotItem().addItem(line, ignoreBounds=True)
        self.epoch_lines.append(line)
        self._epochs.append((step, epoch))
        self._steps_shown = steps_shown
        self.relabel_epochs()

    def relabel_epochs(self) -> None:
        """Show the labels of every 1st, 2nd, 5th, 10th, ... epoch, so that they stay at least
        EPOCH_LABEL_PX apart at the chart's current width and range (again after every resize)."""
        if not self._epochs:
            return
        vb = self.getPlotItem().vb
        x0, x1 = vb.viewRange()[0]
        last_step, last_epoch = self._epochs[-1]
        span = max(x1 - x0, 1e-9) if x1 > x0 else max(1.0, self._steps_shown or last_step)
        px_per_epoch = float(vb.width()) * (last_step / max(1, last_epoch)) / span
        every = next((n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500) if n * px_per_epoch >= EPOCH_LABEL_PX), 1000)
        for line, (_, epoch) in zip(self.epoch_lines, self._epochs):
            line.label.setVisible(epoch % every == 0)

    def clear_epoch_lines(self) -> None:
        for line in self.epoch_lines:
            self.getPlotItem().removeItem(line)
        self.epoch_lines.clear()
        self._epochs.clear()

    def point_count(self) -> int:
        """Number of train-loss points currently drawn (tests and scripts read this)."""
        x, _ = self.raw_curve.getOriginalDataset()
        return 0 if x is None else len(x)


class LossPanel(QWidget):
    """The loss chart, the linked learning-rate chart, a hover readout and export buttons."""

    redrawn = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.chart = LossChart(self)
        self._has_general = self._has_quiz = False    # the run measures the general loss / a quiz
        self._peak_lr = float("nan")
        self._lr_drawn_at = -1e9
        self._lr_stale = False
        self._build_lr_chart()
        self._build_controls()
        self.steps = Series(STEP_COLS)
        self.evals = Series(EVAL_COLS, capacity=64)
        self._ema = EmaState(self._smooth_weight())
        self._last_epoch_int = 0
        self._dirty = False
        self._overlay_i = 0
        self._top = float("nan")          # highest loss so far (train, validation)
        self._bottom = float("nan")       # lowest loss so far
        self._total_steps = 0             # the run's planned steps (0 = not known)
        # started by new data, single shot: at most 10 redraws a second, no wake-ups while idle
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(100)
        self.timer.timeout.connect(self._on_timer)
        self._hover = pg.SignalProxy(self.chart.scene().sigMouseMoved, rateLimit=30, slot=self._on_hover)

    def _build_lr_chart(self) -> None:
        self.lr_chart = pg.PlotWidget(background="w")
        self.lr_chart.setObjectName("lrChart")
        self.lr_chart.setMaximumHeight(90)
        self.lr_chart.setMinimumHeight(60)
        lp = self.lr_chart.getPlotItem()
        lp.setLabel("left", "LR")
        for ax in ("left", "bottom"):
            lp.getAxis(ax).enableAutoSIPrefix(False)
        # both left axes get the width "2e-04" needs, so the strip's x axis lines up with the chart's
        from PySide6.QtGui import QFontMetrics
        left = QFontMetrics(self.font()).horizontalAdvance("2e-04") + 30
        for axis in (self.chart.getPlotItem().getAxis("left"), lp.getAxis("left")):
            axis.setWidth(left)
        lp.showAxis("right")
        lp.getAxis("right").setStyle(showValues=False)
        lp.getAxis("right").setWidth(self.chart.getPlotItem().getAxis("right").width() or 45)
        lp.showGrid(x=True, y=True, alpha=0.2)
        lp.setXLink(self.chart.getPlotItem())
        lp.setClipToView(True)
        lp.setDownsampling(auto=True, mode="peak")
        lp.hideButtons()
        lp.setMouseEnabled(x=True, y=False)
        # the strip is ~40 px high: two labelled ticks (0 and the peak rate), never four crammed ones
        self.lr_fit = ViewFit(lp.vb, StableRange(), StableRange(headroom=0.1, floor=0.0))
        self._set_lr_ticks(1e-3)
        self.lr_curve = lp.plot(pen=pg.mkPen(style.LR, width=1.5))
        style.cache_axes(self.chart.getPlotItem(), lp)

    def _build_controls(self) -> None:
        self.readout = QLabel("Hover over the chart to read values.")
        self.readout.setObjectName("chartReadout")
        self.readout.setTextFormat(Qt.TextFormat.PlainText)
        self.readout.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.readout.setStyleSheet("color: #44515f;")
        self.smooth_slider = QSlider(Qt.Orientation.Horizontal)
        self.smooth_slider.setRange(0, 99)
        self.smooth_slider.setValue(80)
        self.smooth_slider.setMaximumWidth(110)
        self.smooth_slider.setToolTip("How much to smooth the training loss line. 0 = raw values; "
                                      "higher = a calmer line that reacts later.")
        self.smooth_slider.valueChanged.connect(self._smoothing_changed)
        self.show_acc = QCheckBox("Accuracy")
        self.show_acc.setChecked(True)
        self.show_acc.setToolTip("Show the share of answer tokens the model predicts exactly (right axis).")
        self.show_acc.toggled.connect(self._toggle_acc)
        self.png_button = QPushButton("PNG…")
        self.png_button.setToolTip("Save the chart as a picture.")
        self.png_button.clicked.connect(self.export_png_dialog)
        self.csv_button = QPushButton("CSV…")
        self.csv_button.setToolTip("Save every point of the chart as a spreadsheet file.")
        self.csv_button.clicked.connect(self.export_csv_dialog)
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(QLabel("<b>Loss</b>"))
        top.addStretch(1)
        top.addWidget(QLabel("Smoothing"))
        top.addWidget(self.smooth_slider)
        top.addWidget(self.show_acc)
        top.addWidget(self.png_button)
        top.addWidget(self.csv_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addLayout(top)
        self.legend = QLabel()
        self.legend.setObjectName("lossLegend")
        self.legend.setWordWrap(True)
        lay.addWidget(self.legend)
        lay.addWidget(self.chart, 1)
        lay.addWidget(self.lr_chart)
        lay.addWidget(self.readout)
        self._update_legend()

    def _update_legend(self) -> None:
        """A one-line legend above the chart (it never covers the curves)."""
        parts = [(_hex(style.TRAIN_RAW), "━", "train loss"), (_hex(style.TRAIN_SMOOTH), "━", "smoothed"),
                 (_hex(style.VALID), "●", "validation loss"), (_hex(style.ACCURACY), "━", "token accuracy (right)"),
                 (_hex(style.LR), "━", "learning rate (below)")]
        if self._has_general:
            parts.insert(3, (_hex(style.GENERAL), "■", "general ability"))
        if self._has_quiz:
            parts.insert(4, (_hex(style.QUIZ), "▲", "quiz score (right)"))
            parts = [p if p[2] != "token accuracy (right)" else (p[0], p[1], "accuracy (right)") for p in parts]
        for name, item in self.chart.overlays.items():
            parts.append((_hex(getattr(item, "colour", (100, 100, 100))), "┅", name))
        import html
        self.legend_entries = [t for _, _, t in parts]      # what the legend says, as plain text
        # an entry never breaks inside itself, only between entries
        self.legend.setText(" &nbsp;".join(f"<span style='color:{c}'>{sym}</span>&nbsp;"
                                           + html.escape(t).replace(" ", "&nbsp;") for c, sym, t in parts))

    # ------------------------------------------------------------------ settings
    def save_settings(self, s) -> None:
        s.setValue("loss/smoothing", self.smooth_slider.value())
        s.setValue("loss/show_accuracy", self.show_acc.isChecked())

    def restore_settings(self, s) -> None:
        try:
            self.smooth_slider.setValue(int(s.value("loss/smoothing", self.smooth_slider.value())))
        except (TypeError, ValueError):
            pass
        self.show_acc.setChecked(str(s.value("loss/show_accuracy", "true")).lower() in ("true", "1"))

    # ------------------------------------------------------------------ data in
    def reset(self) -> None:
        self.steps.clear()
        self.evals.clear()
        self._ema = EmaState(self._smooth_weight())
        self._last_epoch_int = 0
        self._top = self._bottom = float("nan")
        self._total_steps = 0
        self._set_extras(False, False)
        self.chart.clear_epoch_lines()
        self.chart.view_fit.reset()
        self._dirty = True
        self.redraw()

    def begin_run(self, total_steps: int, peak_lr: float) -> None:
        """A run (new or continued) starts: fix x to 0 .. total_steps and the LR strip to its peak."""
        self._total_steps = max(1, int(total_steps))
        self.chart.view_fit.fix_x(0.0, float(self._total_steps))
        if peak_lr and peak_lr > 0:
            self._set_lr_ticks(float(peak_lr))
        self._changed()

    def add_steps(self, metrics: list) -> None:
        """StepMetrics events (a coalesced batch)."""
        if not metrics:
            return
        self._add_rows([m.step for m in metrics], [m.epoch for m in metrics], [m.train_loss for m in metrics],
                       [m.train_token_accuracy for m in metrics], [m.lr for m in metrics],
                       [m.grad_norm for m in metrics], [m.tokens_per_s for m in metrics])

    def add_eval(self, ev) -> None:
        """EvalMetrics: validation loss, general-ability loss and quiz score, whichever it has."""
        quiz = ev.quiz_score / ev.quiz_total if ev.quiz_score is not None and ev.quiz_total else None
        if ev.valid_loss is None and ev.general_loss is None and quiz is None:
            return
        self.evals.append_rows({"step": [ev.step], "epoch": [ev.epoch], "valid_loss": [_num(ev.valid_loss)],
                                "valid_acc": [_num(ev.valid_token_accuracy)], "general_loss": [_num(ev.general_loss)],
                                "quiz": [_num(quiz)]})
        self._top = _nanmax(self._top, ev.valid_loss, ev.general_loss)
        self._bottom = _nanmin(self._bottom, ev.valid_loss, ev.general_loss)
        self._set_extras(self._has_general or ev.general_loss is not None, self._has_quiz or quiz is not None)
        self._changed()

    def _set_extras(self, general: bool, quiz: bool) -> None:
        """Show the legend entries (and the right axis' name) of the measures this run has."""
        if (general, quiz) == (self._has_general, self._has_quiz):
            return
        self._has_general, self._has_quiz = general, quiz
        self.chart.getPlotItem().getAxis("right").setLabel("accuracy · quiz" if quiz else "token accuracy",
                                                          color=_hex(style.ACCURACY))
        self._update_legend()

    def load_rows(self, rows: list[dict]) -> None:
        """metrics.jsonl rows of a saved run (by step)."""
        self.reset()
        train = [r for r in rows if r.get("train_loss") is not None and r.get("step") is not None]
        evals = [r for r in rows if r.get("step") is not None and any(r.get(k) is not None for k in
                                                                       ("valid_loss", "general_loss", "quiz_score"))]
        if train:
            g = lambda k: [_num(r.get(k)) for r in train]  # noqa: E731
            self._add_rows(g("step"), g("epoch"), g("train_loss"), g("train_token_accuracy"), g("lr"),
                           g("grad_norm"), g("tokens_per_s"))
        if evals:
            quiz = [_num(r["quiz_score"]) / r["quiz_total"] if r.get("quiz_score") is not None and r.get("quiz_total")
                    else float("nan") for r in evals]
            self.evals.append_rows({"step": [_num(r["step"]) for r in evals],
                                    "epoch": [_num(r.get("epoch")) for r in evals],
                                    "valid_loss": [_num(r.get("valid_loss")) for r in evals],
                                    "valid_acc": [_num(r.get("valid_token_accuracy")) for r in evals],
                                    "general_loss": [_num(r.get("general_loss")) for r in evals], "quiz": quiz})
            lo, hi = finite_min_max(self.evals.view("valid_loss"), self.evals.view("general_loss"))
            self._top, self._bottom = _nanmax(self._top, hi), _nanmin(self._bottom, lo)
            self._set_extras(bool(np.isfinite(self.evals.view("general_loss")).any()),
                             bool(np.isfinite(self.evals.view("quiz")).any()))
        lr_top = finite_min_max(self.steps.view("lr"))[1]
        if lr_top == lr_top and lr_top > 0:
            self._set_lr_ticks(lr_top)
        self._dirty = True
        self.redraw()

    def _add_rows(self, step, epoch, loss, acc, lr, gn, tps) -> None:
        loss_arr = np.asarray(loss, dtype=np.float64)
        smooth = self._ema.push(loss_arr)
        self.steps.append_rows({"step": step, "epoch": epoch, "loss": loss_arr, "smooth": smooth, "acc": acc,
                                "lr": lr, "grad_norm": gn, "tps": tps})
        lo, hi = finite_min_max(loss_arr)
        self._top, self._bottom = _nanmax(self._top, hi), _nanmin(self._bottom, lo)
        for s, e in zip(step, epoch):
            if e is None or e != e:
                continue
            k = int(math.floor(float(e) + 1e-9))
            if k > self._last_epoch_int:
                self._last_epoch_int = k
                self.chart.add_epoch_line(float(s), k, float(self._total_steps or 0))
        self._changed()

    # ------------------------------------------------------------------ overlays (run comparison)
    def add_overlay(self, name: str, rows: list[dict]) -> None:
        pts = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None and r.get("step") is not None]
        if not pts:
            return
        x = np.array([p[0] for p in pts], float)
        y = np.array([p[1] for p in pts], float)
        ys = EmaState(self._smooth_weight()).push(y)
        colour = style.OVERLAY[self._overlay_i % len(style.OVERLAY)]
        self._overlay_i += 1
        self.remove_overlay(name)
        item = self.chart.getPlotItem().plot(x, ys, pen=pg.mkPen(colour, width=1.5, style=Qt.PenStyle.DashLine))
        item.colour = colour
        item.extent = (float(x.max()), *finite_min_max(ys))   # last step, lowest and highest loss
        item.setClipToView(True)
        item.setDownsampling(auto=True, method="peak")
        self.chart.overlays[name] = item
        self._update_legend()
        self._changed()

    def remove_overlay(self, name: str) -> None:
        item = self.chart.overlays.pop(name, None)
        if item is not None:
            self.chart.getPlotItem().removeItem(item)
        self._update_legend()

    def clear_overlays(self) -> None:
        for name in list(self.chart.overlays):
            self.remove_overlay(name)

    # ------------------------------------------------------------------ drawing
    def _changed(self) -> None:
        self._dirty = True
        if not self.timer.isActive():
            self.timer.start(100)

    def _on_timer(self) -> None:
        if not self._dirty:
            return
        if self.isVisible() and not self.window().isMinimized():
            self.redraw(live=True)
        else:
            self.timer.start(500)    # not on screen: look again later, draw nothing now

    def redraw(self, live: bool = False) -> None:
        """Draw what arrived since the last redraw (now, whether or not the timer is due). live:
        called by the timer during a run (the LR strip then follows at most once a second)."""
        s = self.steps
        x = s.view("step")
        now = time.monotonic()
        if self._dirty:
            self._dirty = False
            self.chart.raw_curve.setData(x, s.view("loss"), connect="finite")
            self.chart.smooth_curve.setData(x, s.view("smooth"), connect="finite")
            self.chart.acc_curve.setData(x, s.view("acc"), connect="finite")
            ex = self.evals.view("step")
            for curve, col in ((self.chart.valid_curve, "valid_loss"), (self.chart.general_curve, "general_loss"),
                               (self.chart.quiz_curve, "quiz")):
                y = self.evals.view(col)
                ok = np.isfinite(y)
                curve.setData(ex[ok], y[ok])
            self._lr_stale = True
            self._fit_view()
            self.redrawn.emit()
        if self._lr_stale and (not live or now - self._lr_drawn_at >= LR_STRIP_INTERVAL_S):
            # the schedule is known in advance: during a run the strip does not need every step
            self._lr_stale = False
            self._lr_drawn_at = now
            self.lr_curve.setData(x, s.view("lr"), connect="finite")

    def _fit_view(self) -> None:
        """Move the view only when the data left it (see the module's docstring)."""
        fit = self.chart.view_fit
        extents = [item.extent for item in self.chart.overlays.values()]
        last = max([e[0] for e in extents] + [self.steps.last("step") if len(self.steps) else 0.0])
        if last > (fit.x.hi or 0.0):
            # no planned total (a saved run, overlays) or more steps than planned
            fit.fix_x(0.0, float(max(self._total_steps, last)))
        top = _nanmax(self._top, *[e[2] for e in extents])
        bottom = _nanmin(self._bottom, *[e[1] for e in extents])
        if top == top:
            self._fit_y(bottom, top)

    def _fit_y(self, bottom: float, top: float) -> None:
        """y: up to 10% above the highest loss; down to well below the lowest, so a falling loss
        moves the view a few times a run, not at every new low (and never below 0)."""
        fit = self.chart.view_fit
        lo, hi = fit.y.lo, fit.y.hi
        if hi is not None and lo <= bottom and top <= hi:
            return
        if hi is None or top > hi:
            hi = top * 1.1
        if lo is None or bottom < lo:
            lo = max(0.0, min(bottom - 0.5 * (top - bottom), 0.6 * top))
        fit.apply(None, fit.y.fixed(lo, hi))

    def _set_lr_ticks(self, peak: float) -> None:
        if self._peak_lr == peak:
            return
        self._peak_lr = peak
        # room below 0 and above the peak so both labels fit inside the ~45 px strip
        self.lr_fit.apply(None, self.lr_fit.y.fixed(-0.25 * peak, 1.3 * peak))
        self.lr_chart.getPlotItem().getAxis("left").setTicks([[(0.0, "0"), (peak, f"{peak:.0e}")], []])

    def _smooth_weight(self) -> float:
        return self.smooth_slider.value() / 100.0 if hasattr(self, "smooth_slider") else 0.8

    def _smoothing_changed(self) -> None:
        self._ema = EmaState(self._smooth_weight())
        if len(self.steps):
            self.steps.set_view("smooth", self._ema.push(self.steps.view("loss")))
        self._changed()

    def _toggle_acc(self, on: bool) -> None:
        self.chart.acc_curve.setVisible(on)
        self.chart.getPlotItem().getAxis("right").setStyle(showValues=on)

    def _on_hover(self, evt) -> None:
        pos = evt[0]
        vb = self.chart.getPlotItem().vb
        if not self.chart.sceneBoundingRect().contains(pos) or not len(self.steps):
            self.chart.cursor.setVisible(False)
            return
        xv = vb.mapSceneToView(pos).x()
        x = self.steps.view("step")
        i = int(np.clip(np.searchsorted(x, xv), 0, len(x) - 1))
        if i > 0 and abs(x[i - 1] - xv) < abs(x[i] - xv):
            i -= 1
        self.chart.cursor.setPos(x[i])
        self.chart.cursor.setVisible(True)
        self.readout.setText(self.describe_step(i))

    def describe_step(self, i: int) -> str:
        c = {k: self.steps.view(k)[i] for k in STEP_COLS}
        text = (f"step {int(c['step'])} · epoch {c['epoch']:.2f} · loss {c['loss']:.4f} "
                f"(smoothed {c['smooth']:.4f}) · accuracy {c['acc']:.1%} · LR {c['lr']:.2e}")
        ev = self.evals.view("step")
        if len(ev):
            j = int(np.argmin(np.abs(ev - c["step"])))
            if abs(ev[j] - c["step"]) <= max(1, 0.02 * c["step"]):
                for col, name, fmt in (("valid_loss", "validation", "{:.4f}"), ("general_loss", "general", "{:.4f}"),
                                       ("quiz", "quiz", "{:.0%}")):
                    v = self.evals.view(col)[j]
                    if v == v:
                        text += f" · {name} " + fmt.format(v)
        return text

    # ------------------------------------------------------------------ export
    def export_png(self, path: str) -> None:
        """Render on this (GUI) thread, write the file now (export_png_dialog writes on a worker)."""
        _save_image(self._render_image(), path)

    def _render_image(self):
        self.redraw()
        return self.grab().toImage()     # a QImage may be saved on another thread, a QPixmap may not

    def export_csv(self, path: str) -> None:
        """Every point as CSV, written now (export_csv_dialog writes on a worker)."""
        _write_csv(path, self._columns())

    def _columns(self) -> tuple:
        """Copies of the chart's data, safe to hand to another thread."""
        return ({k: self.steps.view(k).copy() for k in STEP_COLS}, {k: self.evals.view(k).copy() for k in EVAL_COLS})

    def set_pool(self, pool) -> None:
        """Where the export dialogs write their files (a workers.ThreadPool); None = right away."""
        self._pool = pool

    def export_png_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save chart as picture", "loss.png", "PNG image (*.png)")
        if path:
            self._export(_save_image, self._render_image(), path)

    def export_csv_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save chart data", "loss.csv", "CSV file (*.csv)")
        if path:
            self._export(_write_csv, path, self._columns())

    def _export(self, fn, *args) -> None:
        path = next(a for a in args if isinstance(a, str))
        pool = getattr(self, "_pool", None)
        if pool is None:
            try:
                fn(*args)
            except OSError as e:
                self._export_failed(path, e.strerror or str(e))
            return
        from .workers import start_job
        start_job(pool, fn, *args, on_error=lambda m: self._export_failed(path, m), name="export-chart")

    def _export_failed(self, path: str, message: str) -> None:
        win = self.window()
        if hasattr(win, "show_error"):
            win.show_error(f"Could not save {path}: {message}")


def _save_image(image, path: str) -> str:
    """Atomically (temp file, then rename): a half-written picture never has the final name."""
    import os
    tmp = f"{path}.{os.getpid()}.tmp"
    if not image.save(tmp, "PNG"):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(f"could not write {path}")
    os.replace(tmp, path)
    return path


def _write_csv(path: str, columns: tuple) -> str:
    """Atomically (temp file, then rename)."""
    import os
    import tempfile
    from pathlib import Path
    steps, evals = columns
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["kind", "step", "epoch", "train_loss", "train_loss_smoothed", "train_token_accuracy",
                        "lr", "grad_norm", "tokens_per_s", "valid_loss", "valid_token_accuracy", "general_loss",
                        "quiz_fraction_right"])
            for i in range(len(steps["step"])):
                v = [steps[k][i] for k in STEP_COLS]
                w.writerow(["train", int(v[0]), _fmt(v[1]), _fmt(v[2]), _fmt(v[3]), _fmt(v[4]), _fmt(v[5]),
                            _fmt(v[6]), _fmt(v[7]), "", "", "", ""])
            for i in range(len(evals["step"])):
                v = [evals[k][i] for k in EVAL_COLS]
                w.writerow(["eval", int(v[0]), _fmt(v[1]), "", "", "", "", "", "", _fmt(v[2]), _fmt(v[3]), _fmt(v[4]),
                            _fmt(v[5])])
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return str(p)


def _nanmin(*values) -> float:
    """The smallest value that is not NaN (NaN when there is none)."""
    good = [float(v) for v in values if v is not None and v == v]
    return min(good) if good else float("nan")


def _nanmax(*values) -> float:
    """The largest value that is not NaN (NaN when there is none)."""
    good = [float(v) for v in values if v is not None and v == v]
    return max(good) if good else float("nan")


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(v) -> str:
    return "" if v != v else f"{v:.6g}"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb[:3])
