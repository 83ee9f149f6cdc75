"""MainWindow: data and settings (left), the training monitor (centre: loss chart, phase strip,
weights and biases), chat (right), in splitters; menus, shortcuts, run history and export.

Widgets never run numpy training code: training and generation run in worker objects on
QThreads (workers.py), and everything from data/ and training/ goes through bridge.py."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from PySide6.QtCore import QByteArray, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QInputDialog, QLabel, QMainWindow, QMessageBox,
                               QPushButton, QScrollArea, QSplitter, QTabWidget, QVBoxLayout, QWidget)

from . import bridge, style
from .chat_panel import ChatPanel
from .data_panel import DATA_FILTER, DataPanel, first_local_file, human_duration
from .history import HistoryPanel
from .loss_chart import LossPanel
from .paths import make_settings
from .phase_strip import PhaseStrip
from .weights_view import WeightsView
from .workers import FunctionWorker, ModelCache, ThreadPool, TrainWorker, plain_error

SYNC_VALIDATE_BYTES = 2 * 2**20   # smaller files are validated at once (so Run is ready right after a drop)
CHOOSE_FOLDER = "__choose__"


class CheckpointCache(ModelCache):
    """ModelCache that also understands "checkpoint::<run_dir>::<checkpoint dir>" specs."""

    def get(self, spec: str):
        if spec.startswith("checkpoint::"):
            with self._lock:
                hit = self._items.get(spec)
            if hit is not None:
                return hit
            _, run_dir, ckpt = spec.split("::", 2)
            pair = bridge.load_checkpoint_model(run_dir, ckpt)
            with self._lock:
                self._items[spec] = pair
                while len(self._items) > self.max_items:
                    self._items.pop(next(iter(self._items)))
            return pair
        return super().get(spec)


class MainWindow(QMainWindow):
    trainingFinished = Signal(str)   # the run folder
    replyFinished = Signal(str)      # the reply text

    def __init__(self, base_model=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Finetune Desktop")
        self.setAcceptDrops(True)
        # Closing during training asks first; tests and scripts switch this off
        # (attribute, or FINETUNE_DESKTOP_NO_CONFIRM=1).
        self.confirm_close = os.environ.get("FINETUNE_DESKTOP_NO_CONFIRM", "") not in ("1", "true", "yes")
        self.pool = ThreadPool()
        self.cache = CheckpointCache()
        self.qsettings = make_settings()
        self.embedded_base = bridge.embedded_base_model()
        self.base_model_path: str | None = None
        self.data_path: str | None = None
        self.report = None
        self._validating = False
        self._pending_run = False
        self._tokenizers: dict[str, object] = {}
        self.train_worker: TrainWorker | None = None
        self.control = None
        self.run_dir: str | None = None
        self._ended = None
        self._run_total = 0
        self._opened_run: str | None = None
        self._build()
        self._restore_settings()
        self._set_base_model(str(base_model) if base_model else None, initial=True)
        self.refresh_runs()
        self._update_run_enabled()

    # ================================================================== layout
    def _build(self) -> None:
        self.setStyleSheet(style.STYLE_SHEET)
        self.data_panel = DataPanel()
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
        # handy aliases for scripts and tests
        self.drop_zone = dp.drop_zone
        self.run_button, self.pause_button, self.stop_button = dp.run_button, dp.pause_button, dp.stop_button
        self.progress_bar, self.epochs_spin = dp.progress, dp.epochs

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(dp)
        self.history = HistoryPanel()
        self.history.openRequested.connect(self.open_run)
        self.history.renameRequested.connect(self.rename_run)
        self.history.deleteRequested.connect(self.delete_run)
        self.history.overlayChanged.connect(self._overlay_changed)
        self.history.exportModelRequested.connect(lambda p: self.export_model(p, adapter=False))
        self.history.exportAdapterRequested.connect(lambda p: self.export_model(p, adapter=True))
        self.history.continueRequested.connect(self.continue_run)
        self.left_tabs = QTabWidget()
        self.left_tabs.setObjectName("leftTabs")
        self.left_tabs.addTab(scroll, "Data && settings")
        self.left_tabs.addTab(self.history, "Runs")
        self.left_tabs.setMinimumWidth(300)

        self.loss_panel = LossPanel()
        self.loss_chart = self.loss_panel.chart
        self.phase_strip = PhaseStrip()
        self.weights_view = WeightsView()
        self.weights_view.proj_box.currentIndexChanged.connect(self._focus_matrix_changed)
        self.weights_view.layer_box.currentIndexChanged.connect(self._focus_matrix_changed)
        centre_top = QWidget()
        ct = QVBoxLayout(centre_top)
        ct.setContentsMargins(0, 0, 0, 0)
        ct.setSpacing(4)
        ct.addWidget(self.loss_panel, 1)
        ct.addWidget(self.phase_strip)
        self.centre = QSplitter(Qt.Orientation.Vertical)
        self.centre.setObjectName("centreSplitter")
        self.centre.addWidget(centre_top)
        self.centre.addWidget(self.weights_view)
        self.centre.setStretchFactor(0, 1)
        self.centre.setStretchFactor(1, 1)
        self.centre.setChildrenCollapsible(False)

        self.chat = ChatPanel(self.pool, self.cache)
        self.chat.replyFinished.connect(self.replyFinished)
        self.chat.errorOccurred.connect(self.show_error)
        self.chat.setMinimumWidth(280)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("mainSplitter")
        self.splitter.addWidget(self.left_tabs)
        self.splitter.addWidget(self.centre)
        self.splitter.addWidget(self.chat)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 4)
        self.splitter.setStretchFactor(2, 2)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([340, 620, 320])

        self.banner = QLabel("")
        self.banner.setObjectName("banner")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.error_banner = QWidget()
        self.error_banner.setObjectName("errorBanner")
        self.error_banner.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        eb = QHBoxLayout(self.error_banner)
        eb.setContentsMargins(8, 4, 4, 4)
        self.error_label = QLabel("")
        self.error_label.setObjectName("errorLabel")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("Dismiss")
        close.clicked.connect(lambda: self.error_banner.setVisible(False))
        eb.addWidget(self.error_label, 1)
        eb.addWidget(close)
        self.error_banner.setVisible(False)

        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(6, 4, 6, 4)
        cl.setSpacing(4)
        cl.addWidget(self.banner)
        cl.addWidget(self.error_banner)
        cl.addWidget(self.splitter, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Drop a training file to begin.")
        self._build_menus()

        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(150)
        self._estimate_timer.timeout.connect(self.update_estimate)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        fm = mb.addMenu("&File")
        self.open_action = _action(self, "&Open training file…", self.browse_data_file, QKeySequence.StandardKey.Open)
        fm.addAction(self.open_action)
        fm.addAction(_action(self, "Open &validation file…", self.browse_validation_file))
        fm.addAction(_action(self, "Choose base model &folder…", self.choose_base_folder))
        fm.addSeparator()
        fm.addAction(_action(self, "&Export tuned model…", lambda: self.export_model(None, adapter=False),
                             "Ctrl+E"))
        fm.addAction(_action(self, "Export LoRA &adapter…", lambda: self.export_model(None, adapter=True)))
        fm.addAction(_action(self, "Export loss chart as &PNG…", self.loss_panel._export_png_dialog))
        fm.addAction(_action(self, "Export loss chart as &CSV…", self.loss_panel._export_csv_dialog))
        fm.addSeparator()
        fm.addAction(_action(self, "&Quit", self.close, QKeySequence.StandardKey.Quit))
        tm = mb.addMenu("&Training")
        self.run_action = _action(self, "&Run", self.start_training, "Ctrl+R")
        self.pause_action = _action(self, "&Pause / Resume", self.toggle_pause, "Ctrl+P")
        self.stop_action = _action(self, "&Stop", self.stop_training, "Ctrl+.")
        for a in (self.run_action, self.pause_action, self.stop_action):
            tm.addAction(a)
        vm = mb.addMenu("&View")
        vm.addAction(_action(self, "Run &history", lambda: self.left_tabs.setCurrentIndex(1), "Ctrl+H"))
        vm.addAction(_action(self, "&Data and settings", lambda: self.left_tabs.setCurrentIndex(0), "Ctrl+D"))
        vm.addAction(_action(self, "&Compare with base", self.chat.compare_box.toggle, "Ctrl+K"))
        vm.addAction(_action(self, "&Rescale weights colours", self.weights_view.rescale))
        vm.addAction(_action(self, "&Focus chat", self.chat.input.setFocus, "Ctrl+L"))
        hm = mb.addMenu("&Help")
        hm.addAction(_action(self, "&How it works", self._show_help, QKeySequence.StandardKey.HelpContents))

    # ================================================================== messages
    def show_error(self, message: str) -> None:
        """Every error ends here: shown in the window in plain words, never a crash."""
        self.error_label.setText(message)
        self.error_banner.setVisible(True)
        self.statusBar().showMessage(message.splitlines()[0][:200], 15000)

    def clear_error(self) -> None:
        self.error_banner.setVisible(False)

    def _show_help(self) -> None:
        QMessageBox.information(self, "How it works", (
            "1. Drop a training file (chat JSONL, prompt/completion JSONL, or CSV).\n"
            "2. Check the report: fix errors (click one to see the line).\n"
            "3. Press Run. Every step the model reads a batch (forward), measures how wrong it was "
            "(loss), works out which way each weight should move (backpropagation) and moves them "
            "a little (update).\n"
            "4. Watch the loss fall and the weights change, then chat with the tuned model.\n\n"
            "The model starts from pre-trained weights, not random ones: fine-tuning only nudges them."))

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
        ok = bridge.is_model_folder(path)
        if ok:
            self.banner.setVisible(False)
            desc = bridge.describe_model_folder(path)
            self.phase_strip.set_base("not random", f"Loaded from {Path(path).name}: {desc}")
            self.statusBar().showMessage(f"Base model: {path} ({desc})", 8000)
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
        if self.data_path and not initial:
            self.load_data_file(self.data_path)
        self._update_run_enabled()
        self._schedule_estimate()

    def _fill_base_box(self) -> None:
        box = self.data_panel.base_box
        box.blockSignals(True)
        box.clear()
        emb = str(self.embedded_base)
        box.addItem("Built-in base model" + ("" if bridge.is_model_folder(emb) else " (not installed)"), emb)
        if self.base_model_path and self.base_model_path != emb and not self._is_run_model(self.base_model_path):
            box.addItem(f"Folder: {Path(self.base_model_path).name}", self.base_model_path)
        try:
            runs = [r for r in bridge.list_runs() if r.has_model]
        except Exception:  # noqa: BLE001
            runs = []
        for r in runs:
            box.addItem(f"Run: {bridge.run_title(r.path)}", str(Path(r.path) / "model"))
        box.addItem("Choose a folder…", CHOOSE_FOLDER)
        i = box.findData(self.base_model_path)
        box.setCurrentIndex(max(0, i))
        box.setToolTip(f"{self.base_model_path}\n\n" + box.toolTip().split("\n\n")[-1])
        box.blockSignals(False)

    @staticmethod
    def _is_run_model(path: str) -> bool:
        return Path(path).name == "model" and (Path(path).parent / "run.json").exists()

    def _base_box_changed(self) -> None:
        data = self.data_panel.base_box.currentData()
        if data == CHOOSE_FOLDER:
            self.choose_base_folder()
            return
        if data and data != self.base_model_path:
            self._set_base_model(data)

    def choose_base_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder")
        if not path:
            self._fill_base_box()
            return
        if not bridge.is_model_folder(path):
            self.show_error(f"{path} is not a model folder: it needs config.json and .safetensors weights "
                            "(pytorch_model.bin alone is not loaded, for safety).")
            self._fill_base_box()
            return
        self._set_base_model(path)

    def base_ok(self) -> bool:
        return bool(self.base_model_path) and bridge.is_model_folder(self.base_model_path)

    def _tokenizer(self):
        p = self.base_model_path
        if p not in self._tokenizers:
            self._tokenizers[p] = bridge.load_tokenizer(p)
        return self._tokenizers[p]

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
        self.data_panel.set_validation_file(path)
        if path and self.base_ok():
            try:
                rep = bridge.validate_file(path, self._tokenizer(), self.data_panel.max_len.value())
            except Exception as e:  # noqa: BLE001
                self.show_error(f"Validation file: {plain_error(e)}")
                return
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
        """What a drop, Browse and File > Open all do: validate the file and show the report."""
        if self.is_training():
            self.show_error("A run is in progress: stop it before loading another file.")
            return
        path = str(path)
        p = Path(path)
        self.data_path = path
        self.report = None
        self.data_panel.clear_report()
        self.qsettings.setValue("last_dir", str(p.parent))
        self.qsettings.setValue("last_data", path)
        if not p.is_file():
            self._show_unreadable(path, "the file does not exist" if not p.exists() else "this is a folder, not a file")
            return
        if not self.base_ok():
            self.data_panel.drop_zone.set_state("bad", p.name, "Choose a base model first: its tokenizer counts "
                                                "the tokens of your examples.")
            self._update_run_enabled()
            return
        try:
            tok = self._tokenizer()
        except Exception as e:  # noqa: BLE001
            self._show_unreadable(path, f"the base model's tokenizer cannot be loaded ({plain_error(e)})")
            return
        args = (path, tok, self.data_panel.max_len.value(), None, self._tokens_per_second())
        self.data_panel.drop_zone.set_state("empty", p.name, "checking…")
        if p.stat().st_size <= SYNC_VALIDATE_BYTES:
            try:
                rep = bridge.validate_file(*args)
            except Exception as e:  # noqa: BLE001
                self._show_unreadable(path, plain_error(e))
                return
            self._report_ready(path, rep)
            return
        self._validating = True
        self._update_run_enabled()
        w = FunctionWorker(bridge.validate_file, *args)
        w.result.connect(self._async_report_ready)
        w.error.connect(self._async_report_error)
        w.finished.connect(self._validation_done)
        self.pool.start(w, "validate")

    def _async_report_ready(self, rep) -> None:
        self._report_ready(str(rep.path), rep)

    def _async_report_error(self, msg: str) -> None:
        if self.data_path:
            self._show_unreadable(self.data_path, msg)

    def _validation_done(self) -> None:
        self._validating = False
        self._update_run_enabled()
        if self._pending_run:
            self._pending_run = False
            self.start_training()

    def _show_unreadable(self, path: str, why: str) -> None:
        self._pending_run = False
        self.report = None
        self.data_panel.drop_zone.set_state("bad", Path(path).name, f"Cannot use this file: {why}")
        self.show_error(f"{Path(path).name}: {why}")
        self._update_run_enabled()

    def _report_ready(self, path: str, rep) -> None:
        if path != self.data_path:
            return
        self.report = rep
        self.data_panel.show_report(rep)
        n, tokens, longest = bridge.report_token_stats(rep)
        n_conv = rep.stats.get("examples", len(rep.conversations)) if rep.stats else len(rep.conversations)
        detail = f"{rep.format or '?'} · {n_conv} examples · {tokens:,} tokens"
        if longest:
            detail += f" · longest {longest}"
        if rep.ok:
            detail += f" · {len(rep.warnings)} warning{'s' if len(rep.warnings) != 1 else ''}" if rep.warnings else " · ready"
            self.data_panel.drop_zone.set_state("ok", Path(path).name, detail)
            self.clear_error()
            self.statusBar().showMessage(f"Loaded {path}: {rep.summary_line()}", 8000)
        else:
            self.data_panel.drop_zone.set_state(
                "bad", Path(path).name,
                f"{len(rep.errors)} error{'s' if len(rep.errors) != 1 else ''} must be fixed before training "
                f"(click one to see the line) · {detail}")
        self._update_run_enabled()
        self._schedule_estimate()

    def show_issue_line(self, issue) -> None:
        """Show the file line an issue points at."""
        if not self.data_path or not issue.line:
            QMessageBox.information(self, "Validation", str(issue))
            return
        try:
            with open(self.data_path, encoding="utf-8-sig", errors="replace") as f:
                text = next(itertools.islice(f, issue.line - 1, None), "")
        except OSError as e:
            text = f"(cannot read the file: {e.strerror})"
        if len(text) > 4000:
            text = text[:4000] + " …"
        box = QMessageBox(self)
        box.setObjectName("issueLineDialog")
        box.setWindowTitle(f"Line {issue.line}")
        box.setIcon(QMessageBox.Icon.Warning if issue.severity == "error" else QMessageBox.Icon.Information)
        box.setText(str(issue))
        box.setInformativeText(f"Line {issue.line} of {Path(self.data_path).name}:")
        box.setDetailedText(text.rstrip("\n"))
        box.setStandardButtons(QMessageBox.StandardButton.Ok)
        self._last_issue_dialog = box
        box.open()

    # ================================================================== estimate
    def _schedule_estimate(self) -> None:
        self._estimate_timer.start()

    def _tokens_per_second(self) -> float | None:
        v = self.qsettings.value(f"speed/{self.base_model_path}", 0.0, type=float)
        return v if v and v > 0 else None

    def update_estimate(self) -> None:
        label = self.data_panel.estimate
        if self.report is None or not self.report.ok or not self.base_ok():
            label.setText("Load a valid training file to see how long a run takes.")
            return
        try:
            kw = self.data_panel.train_config_kwargs()
            n, tokens, longest = bridge.report_token_stats(self.report)
            est = bridge.estimate_run(self.base_model_path, kw, n, tokens, longest, self._tokens_per_second())
        except ValueError as e:
            label.setText(str(e))
            return
        except Exception as e:  # noqa: BLE001
            label.setText(f"No estimate: {plain_error(e)}")
            return
        mem = f"{est.memory_bytes / 2**20:,.0f} MB"
        text = (f"About <b>{est.steps} steps</b> ({est.epochs} epoch{'s' if est.epochs != 1 else ''} × batch "
                f"{est.batch_size}, LR {est.learning_rate:.1e}) · ≈ <b>{human_duration(est.seconds)}</b> · "
                f"memory ≈ {mem}")
        if not est.memory_fits:
            text += "<br><span style='color:#a3261b'>This may not fit in memory: lower the batch size or max length.</span>"
        label.setText(text)
        label.setToolTip(est.memory_text)
        self.last_estimate = est

    # ================================================================== training
    def is_training(self) -> bool:
        return self.train_worker is not None

    def _update_run_enabled(self) -> None:
        can = (not self.is_training() and self.base_ok() and (self._validating or
                                                               (self.report is not None and self.report.ok)))
        self.data_panel.run_button.setEnabled(bool(can))
        self.run_action.setEnabled(bool(can))
        self.pause_action.setEnabled(self.is_training())
        self.stop_action.setEnabled(self.is_training())

    def start_training(self) -> None:
        if self.is_training():
            return
        if self._validating:
            self._pending_run = True    # starts as soon as the file is checked
            self.statusBar().showMessage("Checking the file; the run starts right after.")
            return
        if not self.base_ok():
            self.show_error("Choose a base model first (File > Choose base model folder…).")
            return
        if self.report is None or not self.report.ok:
            self.show_error("Load a training file without errors first.")
            return
        try:
            kw = self.data_panel.train_config_kwargs()
            run_dir = bridge.new_run_dir(Path(self.data_path).stem)
            fn = bridge.make_train_fn(self.data_path, str(run_dir), self.base_model_path, kw,
                                      self.data_panel.validation_path())
            control = bridge.make_control()
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot start: {plain_error(e)}")
            return
        self.clear_error()
        self._save_settings()
        self.loss_panel.reset()
        self.loss_panel.clear_overlays()
        self._start_worker(fn, control, str(run_dir))

    def continue_run(self, run_dir: str, extra_epochs: int | None = None) -> None:
        """Resume a stopped run, or add epochs to a finished one, from its newest checkpoint."""
        if self.is_training():
            self.show_error("A run is in progress: wait for it to end (or stop it) first.")
            return
        try:
            info = bridge.read_run_info(run_dir)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot continue: {plain_error(e)}")
            return
        if extra_epochs is None:
            finished = info.get("status") == "finished"
            n, ok = QInputDialog.getInt(self, "Continue training",
                                        "Epochs to add:" if finished else
                                        "Epochs to add after finishing the planned ones (0 = just finish):",
                                        1 if finished else 0, 0, 1000)
            if not ok:
                return
            extra_epochs = n
        try:
            rows = bridge.load_metric_rows(run_dir)
        except Exception:  # noqa: BLE001
            rows = []
        self.clear_error()
        self.loss_panel.clear_overlays()
        self.loss_panel.load_rows(sorted(rows, key=lambda r: (r.get("step") or 0)))
        self._start_worker(bridge.make_resume_fn(run_dir, int(extra_epochs)), bridge.make_control(), run_dir,
                           keep_chart=True)
        self.left_tabs.setCurrentIndex(0)

    def _start_worker(self, fn, control, run_dir: str, keep_chart: bool = False) -> None:
        self.run_dir = str(run_dir)
        self._opened_run = None
        self._ended = None
        self._run_total = 0
        self.control = control
        self._focus_matrix_changed()
        self._keep_chart = keep_chart
        self.weights_view.reset()
        self.phase_strip.reset()
        w = TrainWorker(fn, control)
        w.runStarted.connect(self._on_run_started)
        w.stepsReady.connect(self._on_steps)
        w.evalReady.connect(self.loss_panel.add_eval)
        w.snapshotReady.connect(self.weights_view.add_snapshot)
        w.phaseReady.connect(self._on_phase)
        w.checkpointSaved.connect(self._on_checkpoint)
        w.runEnded.connect(self._on_run_ended)
        w.error.connect(self._on_train_error)
        w.finished.connect(self._on_training_thread_done)
        self.train_worker = w
        self.pool.start(w, "train")
        self.data_panel.set_running(True)
        self.data_panel.progress.setRange(0, 0)   # busy until the loop reports its step count
        self.data_panel.progress.setFormat("preparing…")
        self.data_panel.progress_label.setText("Loading the base model and encoding the data…")
        self._update_run_enabled()

    def toggle_pause(self) -> None:
        if self.control is None or not self.is_training():
            return
        if self.control.paused:
            self.control.resume()
            self.data_panel.set_running(True, paused=False)
            self.statusBar().showMessage("Resumed.", 4000)
        else:
            self.control.pause()
            self.data_panel.set_running(True, paused=True)
            self.phase_strip.set_active(None)
            self.statusBar().showMessage("Paused after the current step. You can chat with the base model, "
                                         "finished runs and the latest checkpoint meanwhile.", 8000)
            self.data_panel.progress_label.setText(self.data_panel.progress_label.text() + " · paused")

    def stop_training(self) -> None:
        if self.control is not None and self.is_training():
            self.control.stop()
            self.data_panel.stop_button.setEnabled(False)
            self.data_panel.pause_button.setEnabled(False)
            self.statusBar().showMessage("Stopping after the current step…")

    def _on_run_started(self, e) -> None:
        if e.resumed_from_step and getattr(self, "_keep_chart", False):
            # the loop truncates metrics.jsonl to the checkpoint: show the same on the chart
            try:
                rows = [r for r in bridge.load_metric_rows(e.run_dir) if (r.get("step") or 0) <= e.resumed_from_step]
                self.loss_panel.load_rows(sorted(rows, key=lambda r: (r.get("step") or 0)))
            except Exception:  # noqa: BLE001
                pass
        self._run_total = max(1, e.total_steps)
        self.run_dir = e.run_dir or self.run_dir
        self.data_panel.progress.setRange(0, self._run_total)
        self.data_panel.progress.setValue(e.resumed_from_step)
        self.data_panel.progress.setFormat(f"step %v / %m")
        pct = 100.0 * e.trainable_params / max(1, e.total_params)
        self.data_panel.progress_label.setText(
            f"{e.num_train_examples} training / {e.num_valid_examples} validation examples · "
            f"{e.epochs} epochs × {e.steps_per_epoch} steps · batch {e.batch_size} · LR {e.learning_rate:.1e} · "
            f"training {e.trainable_params:,} of {e.total_params:,} weights ({pct:.2f}%)")

    def _on_steps(self, metrics: list) -> None:
        self.loss_panel.add_steps(metrics)
        self.weights_view.add_steps(metrics)
        m = metrics[-1]
        self.phase_strip.set_times(m.phases)
        total = max(1, m.total_steps or self._run_total)
        if self.data_panel.progress.maximum() != total:
            self.data_panel.progress.setRange(0, total)
            self.data_panel.progress.setFormat("step %v / %m")
        self.data_panel.progress.setValue(min(m.step, total))
        paused = " · paused" if self.control is not None and self.control.paused else ""
        self.data_panel.progress_label.setText(
            f"step {m.step}/{total} · epoch {m.epoch:.2f} · loss {m.train_loss:.4f} · "
            f"{m.tokens_per_s:,.0f} tokens/s · ETA {human_duration(m.eta_s)}{paused}")
        self._last_speed = m.tokens_per_s

    # slots for worker signals are bound methods of this (GUI-thread) object, so Qt queues them
    # onto the GUI thread
    def _on_phase(self, e) -> None:
        self.phase_strip.set_active(e.phase)

    def _on_train_error(self, msg: str) -> None:
        self.show_error(f"Training stopped: {msg}")

    def _on_checkpoint(self, e) -> None:
        self.statusBar().showMessage(f"Checkpoint saved at step {e.step}.", 5000)
        self.refresh_models()

    def _on_run_ended(self, e) -> None:
        self._ended = e

    def _on_training_thread_done(self) -> None:
        from ..training import events as ev
        e = self._ended
        self.train_worker = None
        self.control = None
        self.data_panel.set_running(False)
        self.phase_strip.set_active(None)
        self.loss_panel._redraw()
        if getattr(self, "_last_speed", 0) and self.base_model_path:
            self.qsettings.setValue(f"speed/{self.base_model_path}", float(self._last_speed))
        self.refresh_runs()
        if isinstance(e, ev.RunFinished):
            self.data_panel.progress.setRange(0, 1)
            self.data_panel.progress.setValue(1)
            self.data_panel.progress.setFormat("finished")
            vl = f", validation loss {e.final_valid_loss:.4f}" if e.final_valid_loss is not None else ""
            self.data_panel.progress_label.setText(
                f"Finished {e.steps} steps in {human_duration(e.elapsed_s)}: train loss {e.final_train_loss:.4f}{vl}. "
                "The chat now talks to the tuned model.")
            model_dir = e.model_dir or str(Path(e.run_dir) / "model")
            self.cache.drop(str(Path(e.run_dir)))
            if not self.chat.select_model(model_dir):
                self.chat.select_model(str(Path(model_dir)))
            self.history.select_run(e.run_dir)
            self._update_run_enabled()
            self.trainingFinished.emit(e.run_dir)
            return
        if isinstance(e, ev.RunStopped):
            self.data_panel.progress.setFormat(f"stopped at step {e.step}")
            self.data_panel.progress_label.setText(
                f"Stopped at step {e.step}." + (" A checkpoint was saved; you can chat with it." if e.checkpoint else ""))
        elif isinstance(e, ev.RunFailed):
            self.data_panel.progress.setFormat("failed")
            self.data_panel.progress_label.setText(f"Failed at step {e.step}.")
            self.show_error(f"Training failed: {e.reason}")
        else:
            self.data_panel.progress.setRange(0, 1)
            self.data_panel.progress.setValue(0)
            self.data_panel.progress.setFormat("not finished")
            if not self.error_banner.isVisible():
                self.show_error("Training ended without finishing.")
        self._update_run_enabled()

    def _focus_matrix_changed(self) -> None:
        if self.control is not None:
            name = self.weights_view.chosen_name()
            if name:
                self.control.focus_matrix = name
                self.weights_view.focus_name = name

    # ================================================================== runs and models
    def refresh_runs(self) -> None:
        try:
            runs = bridge.list_runs()
        except Exception as e:  # noqa: BLE001
            runs = []
            self.show_error(f"Cannot list previous runs: {plain_error(e)}")
        self.history.set_runs(runs)
        self._fill_base_box()
        self.refresh_models(runs)

    def refresh_models(self, runs=None) -> None:
        entries = []
        if self.base_ok():
            label = "Base model (built-in)" if Path(self.base_model_path) == Path(self.embedded_base) \
                else f"Base model: {Path(self.base_model_path).name}"
            entries.append((label, self.base_model_path, ""))
        if runs is None:
            try:
                runs = bridge.list_runs()
            except Exception:  # noqa: BLE001
                runs = []
        for r in runs:
            title = bridge.run_title(r.path)
            if r.has_model:
                entries.append((f"{title} (tuned)", str(Path(r.path) / "model"), r.path))
            try:
                ckpts = bridge.checkpoints(r.path)
            except Exception:  # noqa: BLE001
                ckpts = []
            for c in ckpts:
                entries.append((f"{title} · checkpoint step {bridge.checkpoint_step(c)}",
                                f"checkpoint::{r.path}::{c}", r.path))
        self.chat.set_models(entries)

    def open_run(self, run_dir: str) -> None:
        """Show a saved run's charts and switch the chat to it."""
        if self.is_training():
            self.show_error("A run is in progress: its charts are shown. Open other runs after it ends.")
            return
        try:
            rows = bridge.load_metric_rows(run_dir)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot open {run_dir}: {plain_error(e)}")
            return
        self._opened_run = run_dir
        self.loss_panel.load_rows(sorted(rows, key=lambda r: (r.get("step") or 0)))
        self.weights_view.reset()
        self.weights_view.load_rows(rows)
        self.weights_view.info.setText("Weight snapshots are shown live during a run; this run's gradient norms "
                                       "are below.")
        model = str(Path(run_dir) / "model")
        if not self.chat.select_model(model):
            ck = bridge.checkpoints(run_dir)
            if ck:
                self.chat.select_model(f"checkpoint::{run_dir}::{ck[-1]}")
        self.statusBar().showMessage(f"Opened {bridge.run_title(run_dir)}", 6000)

    def rename_run(self, run_dir: str) -> None:
        old = bridge.run_title(run_dir)
        new, ok = QInputDialog.getText(self, "Rename run", "New name:", text=old)
        if ok and new.strip():
            try:
                bridge.set_run_title(run_dir, new.strip())
            except Exception as e:  # noqa: BLE001
                self.show_error(f"Cannot rename: {plain_error(e)}")
            self.refresh_runs()

    def delete_run(self, run_dir: str, confirm: bool = True) -> None:
        if self.is_training() and self.run_dir and Path(run_dir) == Path(self.run_dir):
            self.show_error("This run is still training. Stop it before deleting it.")
            return
        if confirm and self.confirm_close:
            ans = QMessageBox.question(self, "Delete run",
                                       f"Delete {bridge.run_title(run_dir)} with its model and charts? "
                                       "This cannot be undone.")
            if ans != QMessageBox.StandardButton.Yes:
                return
        try:
            bridge.delete_run(run_dir)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot delete: {plain_error(e)}")
        self.loss_panel.remove_overlay(bridge.run_title(run_dir))
        self.cache.drop(run_dir)
        self.refresh_runs()

    def _overlay_changed(self, run_dir: str, on: bool) -> None:
        name = bridge.run_title(run_dir)
        if not on:
            self.loss_panel.remove_overlay(name)
            return
        try:
            rows = bridge.load_metric_rows(run_dir)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot read {name}: {plain_error(e)}")
            return
        self.loss_panel.add_overlay(name, rows)

    def export_model(self, run_dir: str | None, adapter: bool = False, dest: str | None = None) -> None:
        run_dir = run_dir or self._opened_run or self.run_dir or self.chat.current_run_dir()
        if not run_dir:
            self.show_error("Finish or open a run first: there is no tuned model to export yet.")
            return
        src = Path(run_dir) / ("adapter" if adapter else "model")
        if not src.is_dir():
            self.show_error("This run has no LoRA adapter (it used full fine-tuning, or did not finish)." if adapter
                            else "This run has no finished model to export (it did not finish).")
            return
        if dest is None:
            parent = QFileDialog.getExistingDirectory(self, "Export to which folder?")
            if not parent:
                return
            dest = str(Path(parent) / f"{Path(run_dir).name}-{'adapter' if adapter else 'model'}")
        w = FunctionWorker(bridge.copy_folder, str(src), dest)
        w.result.connect(self._exported)
        w.error.connect(self._export_failed)
        self.pool.start(w, "export")

    def _exported(self, path) -> None:
        self.statusBar().showMessage(f"Exported to {path}", 10000)

    def _export_failed(self, msg: str) -> None:
        self.show_error(f"Export failed: {msg}")

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
        centre = s.value("centre_splitter")
        if isinstance(centre, QByteArray) and not centre.isEmpty():
            self.centre.restoreState(centre)
        try:
            import json
            d = json.loads(s.value("train_settings", "{}", type=str) or "{}")
            if isinstance(d, dict):
                self.data_panel.apply_settings_dict(d)
            chat = json.loads(s.value("chat_settings", "{}", type=str) or "{}")
            if isinstance(chat, dict):
                c = self.chat
                c.temperature.setValue(float(chat.get("temperature", c.temperature.value())))
                c.top_p.setValue(float(chat.get("top_p", c.top_p.value())))
                c.top_k.setValue(int(chat.get("top_k", c.top_k.value())))
                c.max_new.setValue(int(chat.get("max_new_tokens", c.max_new.value())))
                c.rep_pen.setValue(float(chat.get("repetition_penalty", c.rep_pen.value())))
                c.system_prompt.setPlainText(str(chat.get("system", "")))
        except (ValueError, TypeError):
            pass

    def _save_settings(self) -> None:
        import json
        s = self.qsettings
        s.setValue("geometry", self.saveGeometry())
        s.setValue("splitter", self.splitter.saveState())
        s.setValue("centre_splitter", self.centre.saveState())
        s.setValue("train_settings", json.dumps(self.data_panel.settings_dict()))
        c = self.chat
        s.setValue("chat_settings", json.dumps({
            "temperature": c.temperature.value(), "top_p": c.top_p.value(), "top_k": c.top_k.value(),
            "max_new_tokens": c.max_new.value(), "repetition_penalty": c.rep_pen.value(),
            "system": c.system_prompt.toPlainText()}))
        if self.base_model_path:
            s.setValue("base_model", self.base_model_path)
        s.sync()

    def shutdown(self, timeout_s: float = 60.0) -> bool:
        """Stop training and generation and join every worker thread. True when all ended."""
        for t in (self.loss_panel.timer, self.weights_view.timer, self.phase_strip.timer):
            t.stop()
        ok = self.pool.join(timeout_s)
        return ok

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


def _action(parent, text, slot, shortcut=None) -> QAction:
    a = QAction(text, parent)
    if shortcut is not None:
        a.setShortcut(QKeySequence(shortcut))
    a.triggered.connect(lambda _=False: slot())
    return a

