"""MainWindow: data and settings (left), the training monitor (centre: loss chart, phase strip,
and tabs of views inside the model: weights, which matrices moved, one step phase by phase,
per-token loss, "Did it learn?"), chat (right), in splitters; menus, shortcuts, run history,
export and import.

The window lays out the panels and wires them to three controllers: DataController (the
training and validation files, checked on workers), TrainingController (the run on its thread)
and RunsController (previous runs, read on workers). Widgets never run numpy training code or
read files on the GUI thread; each panel saves and restores its own settings. The run-history
actions (window_runs.py), the teaching views (window_teaching.py) and export / import / models
from the Hugging Face cache (window_interop.py) are mixins of this class."""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt, QTimer, Signal
from PySide6.QtWidgets import (QFileDialog, QMainWindow, QMessageBox, QScrollArea, QSplitter, QTabWidget,
                               QVBoxLayout, QWidget)

from . import bridge, style
from .banners import Banners
from .chat_panel import ChatPanel
from .data_controller import DataController
from .data_panel import DATA_FILTER, DataPanel, first_local_file
from .history import HistoryPanel
from .menus import build_menus
from .model_cache import make_model_cache
from .monitor import MonitorPanel
from .paths import make_settings
from .runs_controller import ModelEntry, RunsController
from .training_controller import TrainingController
from .window_interop import InteropActions
from .window_runs import RunsActions
from .window_teaching import TeachingActions
from .workers import ThreadPool, plain_error

CHOOSE_FOLDER = "__choose__"


class SettingsScroll(QScrollArea):
    """Scrolls the settings up and down, never sideways: so it is never narrower than they need
    (with room for its scroll bar), or they would be clipped."""

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        inner = self.widget().minimumSizeHint().width() if self.widget() is not None else 0
        extra = 2 * self.frameWidth() + self.verticalScrollBar().sizeHint().width()
        return QSize(max(hint.width(), inner + extra), hint.height())


class MainWindow(QMainWindow, RunsActions, TeachingActions, InteropActions):
    trainingFinished = Signal(str)   # the run folder (sent once the chat talks to the tuned model)
    replyFinished = Signal(str)      # the reply text

    def __init__(self, base_model=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Finetune Desktop")
        self.setAcceptDrops(True)
        # Closing during training asks first; tests and scripts switch this off
        # (attribute, or FINETUNE_DESKTOP_NO_CONFIRM=1).
        self.confirm_close = os.environ.get("FINETUNE_DESKTOP_NO_CONFIRM", "") not in ("1", "true", "yes")
        self.pool = ThreadPool(self)
        self.cache = make_model_cache()
        self.qsettings = make_settings()
        self.embedded_base = bridge.embedded_base_model()
        self._embedded_ok = bridge.is_model_folder(self.embedded_base)
        self.base_model_path: str | None = None
        self._base_ok = False
        self._pending_run = False
        self._opened_run: str | None = None
        self._select_after_listing: str | None = None   # a finished run to select in the history
        self.training = TrainingController(self.pool, self)
        self.runs = RunsController(self.pool, self.cache, self)
        self.data = DataController(self.pool, self)
        self._build()
        build_menus(self)
        self._wire()
        self._wire_teaching()
        self._restore_settings()
        self._set_base_model(str(base_model) if base_model else None, initial=True)
        self.refresh_runs()
        self.list_cached_models()
        self._update_run_enabled()

    # ------------------------------------------------------------------ state other code reads
    @property
    def report(self):
        return self.data.report

    @property
    def data_path(self) -> str | None:
        return self.data.path

    @property
    def run_dir(self) -> str | None:
        return self.training.run_dir

    @property
    def control(self):
        return self.training.control

    # ================================================================== layout
    def _build(self) -> None:
        self.setStyleSheet(style.STYLE_SHEET)
        self.data_panel = dp = DataPanel()
        # handy aliases for scripts and tests
        self.drop_zone = dp.drop_zone
        self.run_button, self.pause_button, self.stop_button = dp.run_button, dp.pause_button, dp.stop_button
        self.progress_bar, self.epochs_spin = dp.progress, dp.epochs
        scroll = SettingsScroll()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(dp)
        self.history = HistoryPanel()
        self.left_tabs = QTabWidget()
        self.left_tabs.setObjectName("leftTabs")
        self.left_tabs.addTab(scroll, "Data && settings")
        self.left_tabs.addTab(self.history, "Runs")

        self.monitor = MonitorPanel()
        self.loss_panel, self.phase_strip = self.monitor.loss_panel, self.monitor.phase_strip
        self.weights_view = self.monitor.weights_view
        self.loss_chart = self.loss_panel.chart
        self.loss_panel.set_pool(self.pool)     # chart exports are written on a worker
        self.chat = ChatPanel(self.pool, self.cache)
        self.chat.setMinimumWidth(280)
        self._build_teaching()

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("mainSplitter")
        for i, (w, stretch) in enumerate(((self.left_tabs, 1), (self.monitor, 4), (self.chat, 2))):
            self.splitter.addWidget(w)
            self.splitter.setStretchFactor(i, stretch)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([340, 620, 320])

        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(6, 4, 6, 4)
        cl.setSpacing(4)
        self.banners = Banners()
        self.banner, self.error_banner = self.banners.banner, self.banners.error_banner
        self.error_label, self.overfit_banner = self.banners.error_label, self.banners.alarm_banner
        cl.addWidget(self.banners)
        cl.addWidget(self.splitter, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Drop a training file to begin.")
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(150)
        self._estimate_timer.timeout.connect(self.update_estimate)

    def _wire(self) -> None:
        dp = self.data_panel
        dp.fileChosen.connect(self.load_data_file)
        dp.browseRequested.connect(self.browse_data_file)
        dp.validationFileRequested.connect(self.browse_validation_file)
        dp.baseModelChanged.connect(self._base_box_changed)
        dp.settingsChanged.connect(self._schedule_estimate)
        dp.issueActivated.connect(self.show_issue_line)
        dp.run_button.clicked.connect(self.start_training)
        dp.pause_button.clicked.connect(self.toggle_pause)
        dp.stop_button.clicked.connect(self.stop_training)
        h = self.history
        h.openRequested.connect(self.open_run)
        h.renameRequested.connect(self.rename_run)
        h.deleteRequested.connect(self.delete_run)
        h.overlayChanged.connect(self._overlay_changed)
        h.exportModelRequested.connect(self.export_dialog)
        h.exportAdapterRequested.connect(lambda p: self.export_model(p, adapter=True))
        h.continueRequested.connect(self.continue_run)
        self.chat.replyFinished.connect(self.replyFinished)
        self.chat.errorOccurred.connect(self.show_error)
        self.monitor.focusChanged.connect(self.training.set_focus_matrix)
        d = self.data
        d.reportReady.connect(self._on_report)
        d.unreadable.connect(self._on_unreadable)
        d.validationChecked.connect(self._on_validation_file_checked)
        d.validationFailed.connect(lambda p, m: self.show_error(f"Validation file: {m}"))
        d.baseInfoReady.connect(self._on_base_info)
        d.lineRead.connect(self._show_issue_dialog)
        r = self.runs
        r.listed.connect(self._on_runs_listed)
        r.failed.connect(self._on_runs_failed)
        r.opened.connect(self._on_run_opened)
        r.overlayReady.connect(self._on_overlay_ready)
        r.exported.connect(lambda path: self.statusBar().showMessage(f"Exported to {path}", 10000))
        t, m = self.training, self.monitor
        t.launched.connect(self._on_launched)
        t.historyReady.connect(m.set_history)
        t.runStarted.connect(self._on_run_started)
        t.stepsReady.connect(self._on_steps)
        t.evalReady.connect(m.add_eval)
        t.snapshotReady.connect(m.add_snapshot)
        t.phaseReady.connect(m.set_phase)
        t.checkpointSaved.connect(self._on_checkpoint)
        t.paused.connect(self._on_paused)
        t.pauseRequested.connect(self._on_pause_requested)
        t.error.connect(lambda msg: self.show_error(f"Training stopped: {msg}"))
        t.ended.connect(self._on_training_ended)

    # ================================================================== messages
    def show_error(self, message: str) -> None:
        """Every error ends here: shown in the window in plain words, never a crash."""
        self.error_label.setText(message)
        self.error_banner.setVisible(True)
        self.statusBar().showMessage(message.splitlines()[0][:200], 15000)

    def clear_error(self) -> None:
        self.error_banner.setVisible(False)

    # ================================================================== base model
    def _set_base_model(self, path: str | None, initial: bool = False) -> None:
        """Choose the base model folder (None = the embedded one) and refresh what depends on it."""
        if path is None:
            path = str(self.embedded_base)
            if initial:
                remembered = self.qsettings.value("base_model", "", type=str)
                if remembered and remembered != path and bridge.is_model_folder(remembered):
                    path = remembered
        self.base_model_path = path
        self._base_ok = ok = bridge.is_model_folder(path)   # a few stat calls; the config is read on a worker
        if ok:
            self.banner.setVisible(False)
            self.phase_strip.set_base("not random", f"Loaded from {Path(path).name}")
            self.data.load_base(path)
        else:
            embedded = Path(path) == Path(self.embedded_base)
            self.banner.setText(
                ("The built-in base model is not installed in this copy of the app "
                 f"({self.embedded_base} has no model files). " if embedded else
                 f"{path} is not a model folder (it needs config.json and .safetensors weights). ")
                + "Choose a Hugging Face model folder (Llama, Qwen2 or Mistral family) with "
                  "File > Choose base model folder…, or pick a previous run as the base model.")
            self.banner.setVisible(True)
            self.phase_strip.set_base("no base model", "", pretrained=False)
        self.chat.base_spec = path if ok else None
        self._fill_base_box()
        self.refresh_models()
        if self.data.path and not initial:
            self.load_data_file(self.data.path)
        self._update_run_enabled()
        self._schedule_estimate()

    def _on_base_info(self, info) -> None:
        self.phase_strip.set_base("not random", f"Loaded from {Path(info.path).name}: {info.description}")
        self.statusBar().showMessage(f"Base model: {info.path} ({info.description})", 8000)
        self._schedule_estimate()

    def _fill_base_box(self) -> None:
        runs = [(f"Run: {e.title}", str(Path(e.path) / "model")) for e in self.runs.runs_with_model()]
        self.data_panel.set_base_choices(str(self.embedded_base), self._embedded_ok, self.base_model_path, runs,
                                         CHOOSE_FOLDER, self.cached_choices())

    def _base_box_changed(self) -> None:
        data = self.data_panel.base_box.currentData()
        if data == CHOOSE_FOLDER:
            self.choose_base_folder()
        elif data and data != self.base_model_path:
            self._set_base_model(data)

    def choose_base_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder")
        if path and not bridge.is_model_folder(path):
            self.show_error(f"{path} is not a model folder: it needs config.json and .safetensors weights "
                            "(pytorch_model.bin alone is not loaded, for safety).")
        if path and bridge.is_model_folder(path):
            self._set_base_model(path)
        else:
            self._fill_base_box()

    def base_ok(self) -> bool:
        return self._base_ok

    # ================================================================== data
    def browse_data_file(self) -> None:
        start = self.qsettings.value("last_dir", "", type=str)
        path, _ = QFileDialog.getOpenFileName(self, "Open training file", start, DATA_FILTER)
        if path:
            self.load_data_file(path)

    def browse_validation_file(self) -> None:
        start = self.qsettings.value("last_dir", "", type=str)
        path, _ = QFileDialog.getOpenFileName(self, "Open validation file", start, DATA_FILTER)
        if path:
            self.set_validation_file(path)

    def set_validation_file(self, path: str | None) -> None:
        """Use a separate validation file; it is checked on a worker (errors appear in the window)."""
        self.data_panel.set_validation_file(path)
        if path and self.base_ok():
            self.data.check_validation_file(path, self.base_model_path, self.data_panel.max_len.value())

    def _on_validation_file_checked(self, path: str, rep) -> None:
        if not rep.ok:
            first = "; ".join(str(i) for i in rep.errors[:3])
            self.show_error(f"The validation file {Path(path).name} has errors: {first}")

    # drag and drop anywhere on the window (the drop zone uses the same path)
    def dragEnterEvent(self, e) -> None:
        if first_local_file(e.mimeData()):
            e.acceptProposedAction()

    def dragMoveEvent(self, e) -> None:
        if first_local_file(e.mimeData()):
            e.acceptProposedAction()

    def dropEvent(self, e) -> None:
        path = first_local_file(e.mimeData())
        if path:
            e.acceptProposedAction()
            self.load_data_file(path)

    def load_data_file(self, path: str) -> None:
        """What a drop, Browse and File > Open all do: check the file on a worker, then show the
        report (Run may be pressed meanwhile: the run starts once the file is checked)."""
        if self.is_training():
            self.show_error("A run is in progress: stop it before loading another file.")
            return
        path = str(path)
        name = Path(path).name
        self.data_panel.clear_report()
        self.qsettings.setValue("last_dir", str(Path(path).parent))
        self.qsettings.setValue("last_data", path)
        if not self.base_ok():
            self.data.clear(path)
            self.drop_zone.set_state("bad", name, "Choose a base model first: its tokenizer counts "
                                                  "the tokens of your examples.")
        else:
            self.drop_zone.set_state("empty", name, "checking…")
            self.data.check(path, self.base_model_path, self.data_panel.max_len.value(), self._tokens_per_second())
        self._update_run_enabled()

    def _on_unreadable(self, path: str, why: str) -> None:
        self._pending_run = False
        self.data_panel.show_unusable(path, why)
        self.show_error(f"{Path(path).name}: {why}")
        self._update_run_enabled()

    def _on_report(self, path: str, rep) -> None:
        self.data_panel.show_file_report(path, rep, bridge.report_sizes(rep))
        if rep.ok:
            self.clear_error()
            self.statusBar().showMessage(f"Loaded {path}: {rep.summary_line()}", 8000)
            self._refresh_examples()
        self._update_run_enabled()
        self._schedule_estimate()
        if self._pending_run:
            one_step, self._pending_run = self._pending_run == "step", False
            self.start_training(one_step=one_step)

    def show_issue_line(self, issue) -> None:
        """Show the file line an issue points at (read on a worker)."""
        if not self.data.path or not issue.line:
            QMessageBox.information(self, "Validation", str(issue))
            return
        self.data.read_issue_line(issue)

    def _show_issue_dialog(self, issue, text: str) -> None:
        self._last_issue_dialog = self.data_panel.show_issue_line(issue, text, Path(self.data.path or "").name)

    # ================================================================== estimate
    def _schedule_estimate(self) -> None:
        self._estimate_timer.start()

    def _tokens_per_second(self) -> float | None:
        v = self.qsettings.value(f"speed/{self.base_model_path}", 0.0, type=float)
        return v if v and v > 0 else None

    def update_estimate(self) -> None:
        rep, base = self.data.report, self.data.base
        if rep is None or not rep.ok or not self.base_ok():
            self.data_panel.show_estimate(None, "Load a valid training file to see how long a run takes.")
        elif base is None or base.config is None:
            self.data_panel.show_estimate(None, "Reading the base model…" if base is None
                                          else f"No estimate: {base.description}")
        else:
            try:
                est = bridge.estimate_run(base.config, self.data_panel.train_config_kwargs(),
                                          bridge.report_sizes(rep), self._tokens_per_second())
            except ValueError as e:
                self.data_panel.show_estimate(None, str(e))
                return
            except Exception as e:  # noqa: BLE001
                self.data_panel.show_estimate(None, f"No estimate: {plain_error(e)}")
                return
            self.data_panel.show_estimate(est)
            self.last_estimate = est

    # ================================================================== training
    def is_training(self) -> bool:
        return self.training.is_training()

    def _update_run_enabled(self) -> None:
        report = self.data.report
        can = not self.is_training() and self.base_ok() and (self.data.checking or (report is not None and report.ok))
        self.run_button.setEnabled(bool(can))
        self.run_action.setEnabled(bool(can))
        self.pause_action.setEnabled(self.is_training())
        self.stop_action.setEnabled(self.is_training())
        self._update_step_enabled()

    def start_training(self, one_step: bool = False) -> None:
        """Run (or, one_step, Step from idle: the run pauses after its first step)."""
        if self.is_training():
            return
        if self.data.checking:
            self._pending_run = "step" if one_step else True    # starts as soon as the file is checked
            self.statusBar().showMessage("Checking the file; the run starts right after.")
            return
        if not self.base_ok():
            self.show_error("Choose a base model first (File > Choose base model folder…).")
            return
        if self.data.report is None or not self.data.report.ok:
            self.show_error("Load a training file without errors first.")
            return
        try:
            kw = self.data_panel.train_config_kwargs()
            kw["quiz_file"] = self.quiz_view.quiz_file()     # scored at every evaluation, drawn on the chart
            self.training.start(self.data.path, self.base_model_path, kw, self.data_panel.validation_path(),
                                one_step=one_step)
        except ValueError as e:
            self.show_error(f"Cannot start: {e}")
            return
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot start: {plain_error(e)}")
            return
        self.clear_error()
        self._save_settings(sync=False)

    def toggle_pause(self) -> None:
        self.training.toggle_pause()

    def stop_training(self) -> None:
        if self.training.stop():
            self.stop_button.setEnabled(False)
            self.pause_button.setEnabled(False)
            self.statusBar().showMessage("Stopping after the current step…")

    def _on_launched(self, run_dir: str, continuing: bool) -> None:
        self._opened_run = None
        self.banners.hide_alarm()
        self.monitor.begin(continuing, self.data_panel.method.currentData())
        self.training.set_focus_matrix(self.weights_view.chosen_name())
        self.data_panel.set_running(True)
        self.data_panel.show_preparing()
        self._update_run_enabled()

    def _on_run_started(self, e) -> None:
        self.monitor.run_started(e)
        self.data_panel.show_run_started(e)

    def _on_steps(self, metrics: list) -> None:
        self.monitor.add_steps(metrics)
        if metrics:
            self.data_panel.show_step(metrics[-1], paused=self.training.is_paused())

    def _on_pause_requested(self, paused: bool) -> None:
        self.data_panel.set_running(True, paused=paused)
        self._update_step_enabled()
        if paused:
            self.phase_strip.set_active(None)
            self.statusBar().showMessage("Pausing after the current step. You can chat with the base model, "
                                         "finished runs and the latest checkpoint meanwhile.", 8000)
        else:
            self.data_panel.show_paused(False)
            self.statusBar().showMessage("Resumed.", 4000)

    def _on_paused(self, e) -> None:
        self.monitor.paused()
        self.data_panel.set_running(True, paused=True)
        self.data_panel.show_paused(True)
        self._update_step_enabled()
        self._refresh_token_models()
        self.statusBar().showMessage(f"Paused at step {e.step}: Step runs one more, Resume goes on.", 8000)

    def _on_checkpoint(self, e) -> None:
        self.statusBar().showMessage(f"Checkpoint saved at step {e.step}.", 5000)
        self.refresh_runs()

    def _on_training_ended(self, e) -> None:
        from ..training import events as ev
        self.data_panel.set_running(False)
        self.banners.run_ended()
        self.monitor.finished()
        if self.training.last_speed and self.base_model_path:
            self.qsettings.setValue(f"speed/{self.base_model_path}", float(self.training.last_speed))
        self.data_panel.show_ended(e)
        if isinstance(e, ev.RunFinished):
            self.cache.drop(e.run_dir)
            self._switch_chat_to(e)
        elif isinstance(e, ev.RunFailed):
            self.show_error(f"Training failed: {e.reason}")
        elif not isinstance(e, ev.RunStopped) and not self.error_banner.isVisible():
            self.show_error("Training ended without finishing.")
        self.refresh_runs()
        self._update_run_enabled()
        self._refresh_token_models()
        if isinstance(e, ev.RunFinished):
            self.trainingFinished.emit(e.run_dir)
            self._ask_quiz(e.run_dir, e.model_dir or str(Path(e.run_dir) / "model"))

    def _switch_chat_to(self, e) -> None:
        """The chat talks to the tuned model at once (the run list that follows adds the rest)."""
        details = self.training.details
        model_dir = e.model_dir or str(Path(e.run_dir) / "model")
        self.chat.add_model(ModelEntry(f"{bridge.run_title(e.run_dir, details)} (tuned)", model_dir, e.run_dir,
                                       str(details.get("system_prompt") or "")))
        self.chat.select_model(model_dir)
        self._select_after_listing = e.run_dir

    # ================================================================== settings and closing
    def _restore_settings(self) -> None:
        s = self.qsettings
        geo = s.value("geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        split = s.value("splitter")
        if isinstance(split, QByteArray) and not split.isEmpty():
            self.splitter.restoreState(split)
        for panel in (self.data_panel, self.monitor, self.chat):
            panel.restore_settings(s)

    def _save_settings(self, sync: bool = True) -> None:
        s = self.qsettings
        s.setValue("geometry", self.saveGeometry())
        s.setValue("splitter", self.splitter.saveState())
        for panel in (self.data_panel, self.monitor, self.chat):
            panel.save_settings(s)
        if self.base_model_path:
            s.setValue("base_model", self.base_model_path)
        if sync:
            s.sync()

    def shutdown(self, timeout_s: float = 60.0) -> bool:
        """Stop training and generation and join every worker thread. True when all ended."""
        self.monitor.stop_timers()
        return self.pool.join(timeout_s)

    def running_threads(self) -> list:
        return self.pool.running()

    def closeEvent(self, e) -> None:
        if self.is_training() and self.confirm_close:
            ans = QMessageBox.question(
                self, "Stop training?",
                "A run is in progress. Stop it and close? The run is kept up to its last checkpoint.",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
            if ans != QMessageBox.StandardButton.Yes:
                e.ignore()
                return
        try:
            self._save_settings()
        except Exception:  # noqa: BLE001 - never block closing
            pass
        self.statusBar().showMessage("Stopping…")
        self.shutdown()
        e.accept()
