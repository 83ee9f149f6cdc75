"""The centre of the window: the training monitor. On top the loss chart (with the learning-rate
strip) and the phase strip; below, a tab widget of views inside the model (the weights of one
matrix; which matrices moved most; the window adds step mode, per-token loss and the quiz). It
turns the training controller's events into what each view shows."""
from __future__ import annotations

from PySide6.QtCore import QByteArray, Qt, Signal
from PySide6.QtWidgets import QSplitter, QTabWidget, QVBoxLayout, QWidget

from .loss_chart import LossPanel
from .overview_view import OverviewView
from .phase_strip import PhaseStrip
from .weights_view import WeightsView


class MonitorPanel(QWidget):
    focusChanged = Signal(str)   # the weight matrix the user looks at (its histogram comes at full resolution)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.loss_panel = LossPanel()
        self.phase_strip = PhaseStrip()
        self.weights_view = WeightsView()
        self.overview = OverviewView()
        self.weights_view.proj_box.currentIndexChanged.connect(self._focus_changed)
        self.weights_view.layer_box.currentIndexChanged.connect(self._focus_changed)
        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.setSpacing(4)
        tl.addWidget(self.loss_panel, 1)
        tl.addWidget(self.phase_strip)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("centreTabs")
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.weights_view, "Weights")
        self.tabs.addTab(self.overview, "Which moved")
        self.tabs.setTabToolTip(0, "Weights and biases of one matrix: its change since the start, row and column "
                                   "RMS, bias, histogram.")
        self.tabs.setTabToolTip(1, "Every layer and matrix at once, coloured by how far it moved since the start; "
                                   "the update size per layer and the gradient norm.")
        self.tabs.setUsesScrollButtons(True)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setObjectName("centreSplitter")
        self.splitter.addWidget(top)
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.splitter)
        self._history: list[dict] | None = None

    def add_view(self, widget: QWidget, title: str) -> int:
        """Another view of the model below the loss chart (a tab)."""
        return self.tabs.addTab(widget, title)

    # ------------------------------------------------------------------ a run
    def begin(self, continuing: bool, method: str | None = None) -> None:
        """A run is launched (the loop has not started yet)."""
        self.loss_panel.clear_overlays()
        if not continuing:
            self.loss_panel.reset()
        self._history = None
        self.weights_view.reset()
        if method:
            self.weights_view.set_method(method)
        self.overview.reset()
        self.phase_strip.reset()

    def set_history(self, rows: list[dict]) -> None:
        """A continued run's saved metrics: shown at once, trimmed to its checkpoint when it starts."""
        self._history = list(rows)
        self.loss_panel.load_rows(self._history)

    def run_started(self, e) -> None:
        if e.resumed_from_step and self._history is not None:
            # the loop truncates metrics.jsonl to the checkpoint: show the same on the chart
            self.loss_panel.load_rows([r for r in self._history if (r.get("step") or 0) <= e.resumed_from_step])
        self.loss_panel.begin_run(e.total_steps, e.learning_rate)
        self.overview.set_total_steps(e.total_steps)

    def add_steps(self, metrics: list) -> None:
        self.loss_panel.add_steps(metrics)
        self.overview.add_steps(metrics)
        if metrics:
            self.phase_strip.set_times(metrics[-1].phases)

    def add_eval(self, e) -> None:
        self.loss_panel.add_eval(e)

    def add_snapshot(self, snap) -> None:
        self.weights_view.add_snapshot(snap)
        self.overview.add_snapshot(snap)

    def set_phase(self, e) -> None:
        self.phase_strip.set_active(e.phase)

    def paused(self) -> None:
        """The loop waits: everything up to here is on the chart now, not at the next tick."""
        self.phase_strip.set_active(None)
        self.loss_panel.redraw()

    def finished(self) -> None:
        self.phase_strip.set_active(None)
        self.loss_panel.redraw()

    def show_saved_run(self, rows: list[dict]) -> None:
        self.loss_panel.load_rows(rows)
        self.weights_view.reset()
        self.overview.reset()
        self.overview.load_rows(rows)
        self.weights_view.info.setText("Weight snapshots are shown live during a run; the overview tab shows how "
                                       "far this run's matrices moved and its gradient norms.")

    def _focus_changed(self) -> None:
        name = self.weights_view.chosen_name()
        if name:
            self.weights_view.focus_name = name
            self.focusChanged.emit(name)

    # ------------------------------------------------------------------ settings
    def save_settings(self, s) -> None:
        s.setValue("centre_splitter", self.splitter.saveState())
        s.setValue("centre_tab", self.tabs.currentIndex())
        self.loss_panel.save_settings(s)
        self.weights_view.save_settings(s)

    def restore_settings(self, s) -> None:
        state = s.value("centre_splitter")
        if isinstance(state, QByteArray) and not state.isEmpty():
            self.splitter.restoreState(state)
        try:
            self._saved_tab = int(s.value("centre_tab", 0))
        except (TypeError, ValueError):
            self._saved_tab = 0
        self.tabs.setCurrentIndex(self._saved_tab)
        self.loss_panel.restore_settings(s)
        self.weights_view.restore_settings(s)

    def stop_timers(self) -> None:
        for t in (self.loss_panel.timer, self.weights_view.timer, self.phase_strip.timer, self.overview.timer):
            t.stop()
