"""The left side: the training file (drop zone, validation report, preview), the validation
data, the base model, the method and hyperparameters, the estimate and the run controls."""
from __future__ import annotations

import math
import time
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QButtonGroup, QComboBox, QDoubleSpinBox, QFormLayout,
                               QGroupBox, QHBoxLayout, QHeaderView, QLabel, QListWidget, QListWidgetItem,
                               QProgressBar, QPushButton, QRadioButton, QSizePolicy, QSpinBox, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from . import style
from .drop_zone import DropZone, first_local_file  # noqa: F401 - re-exported for the window

DATA_FILTER = "Training data (*.jsonl *.json *.csv *.tsv *.txt);;All files (*)"


class AutoSpinBox(QSpinBox):
    """A whole-number field whose lowest value reads "Auto" (meaning: let the app choose)."""

    def __init__(self, hi: int, tip: str, parent=None):
        super().__init__(parent)
        self.setRange(0, hi)
        self.setSpecialValueText("Auto")
        self.setValue(0)
        self.setToolTip(tip)
        self.setAccelerated(True)

    def auto_or_value(self):
        return "auto" if self.value() == 0 else int(self.value())


class LearningRateBox(QComboBox):
    """Editable: "Auto" or a number like 2e-4."""

    PRESETS = ["Auto", "1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "2e-3", "5e-3"]

    def __init__(self, tip: str, parent=None):
        super().__init__(parent)
        self.setEditable(True)
        self.addItems(self.PRESETS)
        self.setToolTip(tip)
        self.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)

    def auto_or_value(self):
        t = self.currentText().strip().lower()
        if t in ("", "auto"):
            return "auto"
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"Learning rate: {self.currentText()!r} is not a number (use e.g. 2e-4, or Auto)") from None
        if not (0 < v < 1):
            raise ValueError("Learning rate must be between 0 and 1 (typical: 1e-5 to 5e-3), or Auto")
        return v

    def set_value(self, v) -> None:
        self.setCurrentText("Auto" if v in (None, "auto") else f"{float(v):g}")


TIPS = {
    "validation": "Examples kept aside to check the model on data it does not train on. Too few and the check "
                  "is noisy; too many and less is left to learn from.",
    "split": "Share of your examples held out for validation when you give no validation file. "
             "0% = no validation.",
    "base": "The pre-trained model you start from. Fine-tuning adjusts its weights; it does not start from random.",
    "method": "LoRA trains small add-on matrices and leaves the original weights frozen: fast, light, "
              "hard to break. Full changes every weight: more capacity, more memory, easier to overdo.",
    "rank": "Size of the LoRA add-ons. Higher = can learn more but is slower and can overfit; lower = lighter "
            "but may not pick up the style.",
    "alpha": "How strongly the LoRA add-ons act (scale = alpha / rank). Too high is like a too-high learning rate.",
    "epochs": "How many times the model sees every example. Too few: it barely changes. Too many: it memorises "
              "your examples and gets worse at new questions. Auto picks from your data size.",
    "batch": "Examples per update step. Bigger = smoother, fewer steps and more memory; smaller = noisier, "
             "more steps. Auto picks from your data size and example length.",
    "lr": "How big each update step is. Too high: the loss jumps around or explodes. Too low: nothing is "
          "learned. Auto picks a safe value for the method.",
    "schedule": "How the learning rate changes over the run: constant, falling in a straight line, or falling "
                "along a cosine curve. Falling rates help the model settle at the end.",
    "warmup": "Share of the steps at the start where the learning rate ramps up from zero. Avoids large "
              "jumps in the first updates.",
    "maxlen": "Longest example in tokens; longer ones are cut at the end. Higher = more memory and time "
              "per step; too low cuts off answers.",
    "seed": "Makes a run repeatable: the same seed, data and settings give the same result.",
}


class DataPanel(QWidget):
    """Emits requests; MainWindow does the work."""

    fileChosen = Signal(str)
    browseRequested = Signal()
    validationFileRequested = Signal()
    baseModelChanged = Signal()
    settingsChanged = Signal()
    issueActivated = Signal(object)   # an Issue
    exampleActivated = Signal(int)    # the line of an example double-clicked in the preview

    def __init__(self, parent=None):
        super().__init__(parent)
        self.validation_file: str | None = None
        self._build()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(6)
        self._build_file(lay)
        lay.addWidget(self._build_validation_box())
        lay.addWidget(self._build_settings_box())
        self.estimate = QLabel("Load a training file to see how long a run takes.")
        self.estimate.setObjectName("estimateLabel")
        self.estimate.setWordWrap(True)
        lay.addWidget(self.estimate)
        self._build_run_controls(lay)
        for w in (self.epochs, self.batch, self.warmup, self.max_len, self.seed, self.lora_rank, self.val_split):
            w.valueChanged.connect(self.settingsChanged)
        self.lora_alpha.valueChanged.connect(self.settingsChanged)
        self.lr.currentTextChanged.connect(self.settingsChanged)
        self.schedule.currentIndexChanged.connect(self.settingsChanged)
        self.method.currentIndexChanged.connect(self.settingsChanged)
        self.val_split_radio.toggled.connect(self.settingsChanged)
        self._val_mode_changed()

    def _build_file(self, lay) -> None:
        self.drop_zone = DropZone()
        self.drop_zone.fileDropped.connect(self.fileChosen)
        self.drop_zone.browseRequested.connect(self.browseRequested)
        lay.addWidget(self.drop_zone)

        # validation report
        self.issues = QListWidget()
        self.issues.setObjectName("validationReport")
        self.issues.setToolTip("Problems found in the file. Click one to see that line.")
        self.issues.setMaximumHeight(110)
        self.issues.setWordWrap(True)
        self.issues.setVisible(False)
        self.issues.itemActivated.connect(self._issue_clicked)
        self.issues.itemClicked.connect(self._issue_clicked)
        lay.addWidget(self.issues)

        # preview
        self.preview = QTableWidget(0, 3)
        self.preview.setObjectName("previewTable")
        self.preview.setHorizontalHeaderLabels(["line", "role", "content"])
        self.preview.verticalHeader().setVisible(False)
        self.preview.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.preview.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.preview.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.preview.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.preview.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.preview.setWordWrap(False)
        self.preview.setMinimumHeight(80)
        self.preview.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
        self.preview.setToolTip("The first examples of the file, one message per row, coloured by role. "
                                "Double-click one to see the loss of each of its tokens.")
        self.preview.cellDoubleClicked.connect(self._preview_activated)
        lay.addWidget(self.preview, 1)

    def _build_validation_box(self) -> QGroupBox:
        vbox = QGroupBox("Validation data")
        vbox.setToolTip(TIPS["validation"])
        vl = QHBoxLayout(vbox)
        vl.setContentsMargins(6, 2, 6, 4)
        self.val_split_radio = QRadioButton("Hold out")
        self.val_split_radio.setChecked(True)
        self.val_split = QSpinBox()
        self.val_split.setObjectName("valSplitSpinBox")
        self.val_split.setRange(0, 50)
        self.val_split.setSuffix(" %")
        self.val_split.setValue(10)
        self.val_split.setToolTip(TIPS["split"])
        self.val_file_radio = QRadioButton("File")
        self.val_file_button = QPushButton("Choose…")
        self.val_file_button.setToolTip("A separate file of examples used only to check the model.")
        self.val_file_button.clicked.connect(self.validationFileRequested)
        self.val_file_label = QLabel("")
        self.val_file_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        g = QButtonGroup(self)
        g.addButton(self.val_split_radio)
        g.addButton(self.val_file_radio)
        self.val_split_radio.toggled.connect(self._val_mode_changed)
        vl.addWidget(self.val_split_radio)
        vl.addWidget(self.val_split)
        vl.addWidget(self.val_file_radio)
        vl.addWidget(self.val_file_button)
        vl.addWidget(self.val_file_label, 1)
        return vbox

    def _build_settings_box(self) -> QGroupBox:
        hp = QGroupBox("Model and settings")
        form = QFormLayout(hp)
        form.setContentsMargins(6, 2, 6, 4)
        form.setVerticalSpacing(4)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.base_box = QComboBox()
        self.base_box.setObjectName("baseModelSelector")
        self.base_box.setToolTip(TIPS["base"])
        self.base_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.base_box.setMinimumContentsLength(12)
        self.base_box.activated.connect(lambda _i: self.baseModelChanged.emit())
        form.addRow(_label("Base model", TIPS["base"]), self.base_box)

        self.method = QComboBox()
        self.method.setObjectName("methodSelector")
        self.method.addItem("LoRA (light)", "lora")
        self.method.addItem("Full fine-tuning", "full")
        self.method.setToolTip(TIPS["method"])
        self.lora_rank = QSpinBox()
        self.lora_rank.setRange(1, 256)
        self.lora_rank.setValue(16)
        self.lora_rank.setToolTip(TIPS["rank"])
        self.lora_alpha = QDoubleSpinBox()
        self.lora_alpha.setRange(0.5, 1024)
        self.lora_alpha.setDecimals(1)
        self.lora_alpha.setValue(32)
        self.lora_alpha.setToolTip(TIPS["alpha"])
        form.addRow(_label("Method", TIPS["method"]), self.method)
        mrow = QHBoxLayout()
        self.rank_label = _label("LoRA rank", TIPS["rank"])
        self.alpha_label = _label("alpha", TIPS["alpha"])
        mrow.addWidget(self.lora_rank, 1)
        mrow.addWidget(self.alpha_label)
        mrow.addWidget(self.lora_alpha, 1)
        self.method.currentIndexChanged.connect(self._method_changed)
        form.addRow(self.rank_label, mrow)
        self._form = form
        self._rank_row_field = mrow

        self.epochs = AutoSpinBox(1000, TIPS["epochs"])
        self.epochs.setObjectName("epochsSpinBox")
        self.batch = AutoSpinBox(512, TIPS["batch"])
        self.batch.setObjectName("batchSizeSpinBox")
        erow = QHBoxLayout()
        erow.addWidget(self.epochs, 1)
        erow.addWidget(_label("Batch", TIPS["batch"]))
        erow.addWidget(self.batch, 1)
        form.addRow(_label("Epochs", TIPS["epochs"]), erow)

        self.lr = LearningRateBox(TIPS["lr"])
        self.lr.setObjectName("learningRateBox")
        self.schedule = QComboBox()
        self.schedule.setObjectName("scheduleSelector")
        for label, v in (("linear decay", "linear"), ("cosine decay", "cosine"), ("constant", "constant")):
            self.schedule.addItem(label, v)
        self.schedule.setToolTip(TIPS["schedule"])
        lrow = QHBoxLayout()
        lrow.addWidget(self.lr, 1)
        lrow.addWidget(self.schedule, 1)
        form.addRow(_label("Learning rate", TIPS["lr"]), lrow)

        self.warmup = QSpinBox()
        self.warmup.setObjectName("warmupSpinBox")
        self.warmup.setRange(0, 50)
        self.warmup.setSuffix(" %")
        self.warmup.setValue(5)
        self.warmup.setToolTip(TIPS["warmup"])
        self.max_len = QSpinBox()
        self.max_len.setObjectName("maxSeqLenSpinBox")
        self.max_len.setRange(16, 32768)
        self.max_len.setSingleStep(64)
        self.max_len.setValue(512)
        self.max_len.setToolTip(TIPS["maxlen"])
        self.seed = QSpinBox()
        self.seed.setObjectName("seedSpinBox")
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip(TIPS["seed"])
        wrow = QHBoxLayout()
        wrow.addWidget(self.warmup, 1)
        wrow.addWidget(_label("Max length", TIPS["maxlen"]))
        wrow.addWidget(self.max_len, 1)
        form.addRow(_label("Warmup", TIPS["warmup"]), wrow)
        form.addRow(_label("Seed", TIPS["seed"]), self.seed)
        return hp

    def _build_run_controls(self, lay) -> None:
        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("runButton")
        self.run_button.setToolTip("Start fine-tuning (Ctrl+R).")
        self.run_button.setEnabled(False)
        self.pause_button = QPushButton("Pause")
        self.pause_button.setObjectName("pauseButton")
        self.pause_button.setToolTip("Pause after the current step; you can chat with the checkpoints while paused.")
        self.pause_button.setEnabled(False)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop after the current step and keep a checkpoint.")
        self.stop_button.setEnabled(False)
        self.step_button = QPushButton("Step")
        self.step_button.setObjectName("stepButton")
        self.step_button.setToolTip("Run exactly one training step (from idle or from a pause), then pause and show "
                                    "what it computed, phase by phase.")
        self.step_button.setEnabled(False)
        brow = QHBoxLayout()
        brow.setSpacing(4)
        for b in (self.run_button, self.step_button, self.pause_button, self.stop_button):
            b.setMinimumWidth(44)          # four buttons share the panel's width; none widens the panel
        brow.addWidget(self.run_button, 2)
        brow.addWidget(self.step_button, 1)
        brow.addWidget(self.pause_button, 1)
        brow.addWidget(self.stop_button, 1)
        lay.addLayout(brow)
        self.progress = QProgressBar()
        self.progress.setObjectName("progressBar")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        lay.addWidget(self.progress)
        self.progress_label = QLabel("")
        self.progress_label.setObjectName("progressLabel")
        self.progress_label.setWordWrap(True)
        lay.addWidget(self.progress_label)

    # ------------------------------------------------------------------ helpers
    def _method_changed(self) -> None:
        lora = self.method.currentData() == "lora"
        self._form.setRowVisible(self.rank_label, lora)

    def _val_mode_changed(self) -> None:
        split = self.val_split_radio.isChecked()
        self.val_split.setEnabled(split)
        self.val_file_button.setEnabled(not split)

    def set_validation_file(self, path: str | None) -> None:
        self.validation_file = path
        self.val_file_label.setText(Path(path).name if path else "")
        self.val_file_label.setToolTip(path or "")
        if path:
            self.val_file_radio.setChecked(True)
        self.settingsChanged.emit()

    def show_report(self, report, preview_rows: int = 200) -> None:
        """Fill the issue list and the preview table from a ValidationReport."""
        self.issues.clear()
        for issue in list(report.errors) + list(report.warnings):
            item = QListWidgetItem(("✖ " if issue.severity == "error" else "⚠ ") + str(issue))
            item.setData(Qt.ItemDataRole.UserRole, issue)
            item.setForeground(QBrush(QColor("#a3261b" if issue.severity == "error" else "#8a5a00")))
            item.setToolTip("Click to see this line of the file." if issue.line else str(issue))
            self.issues.addItem(item)
        self.issues.setVisible(self.issues.count() > 0)
        self.preview.setRowCount(0)
        rows = []
        for conv in report.conversations:
            for m in conv.messages:
                rows.append((conv.line, m.role, m.content))
                if len(rows) >= preview_rows:
                    break
            if len(rows) >= preview_rows:
                break
        self.preview.setRowCount(len(rows))
        for r, (line, role, content) in enumerate(rows):
            bg = style.ROLE_COLOURS.get(role, QColor("#ffffff"))
            cells = [QTableWidgetItem(str(line)), QTableWidgetItem(role),
                     QTableWidgetItem(content.replace("\n", " ⏎ "))]
            cells[1].setForeground(QBrush(QColor(style.ROLE_TEXT.get(role, "#333333"))))
            cells[2].setToolTip(content[:2000])
            for c, item in enumerate(cells):
                item.setBackground(QBrush(bg))
                self.preview.setItem(r, c, item)

    def _preview_activated(self, row: int, _col: int) -> None:
        item = self.preview.item(row, 0)
        if item is not None and item.text().isdigit():
            self.exampleActivated.emit(int(item.text()))

    def clear_report(self) -> None:
        self.issues.clear()
        self.issues.setVisible(False)
        self.preview.setRowCount(0)

    def _issue_clicked(self, item) -> None:
        issue = item.data(Qt.ItemDataRole.UserRole)
        if issue is not None:
            self.issueActivated.emit(issue)

    # ------------------------------------------------------------------ the settings
    def train_config_kwargs(self) -> dict:
        """The TrainConfig fields this panel sets (raises ValueError with a plain message)."""
        kw = dict(method=self.method.currentData(), lora_rank=int(self.lora_rank.value()),
                  lora_alpha=float(self.lora_alpha.value()), epochs=self.epochs.auto_or_value(),
                  batch_size=self.batch.auto_or_value(), learning_rate=self.lr.auto_or_value(),
                  schedule=self.schedule.currentData(), warmup_ratio=self.warmup.value() / 100.0,
                  max_seq_len=int(self.max_len.value()), seed=int(self.seed.value()))
        kw["val_split"] = self.val_split.value() / 100.0 if self.val_split_radio.isChecked() else 0.0
        return kw

    def validation_path(self) -> str | None:
        return self.validation_file if self.val_file_radio.isChecked() else None

    def set_running(self, running: bool, paused: bool = False) -> None:
        self.pause_button.setEnabled(running)
        self.stop_button.setEnabled(running)
        self.pause_button.setText("Resume" if paused else "Pause")
        self.pause_button.setToolTip("Continue training." if paused else
                                     "Pause after the current step; you can chat while paused.")
        self.step_button.setToolTip("Run one more step, then pause again." if paused else
                                    "Run exactly one training step (from idle or from a pause), then pause and "
                                    "show what it computed, phase by phase.")
        for w in (self.drop_zone.browse, self.base_box, self.method, self.lora_rank, self.lora_alpha, self.epochs,
                  self.batch, self.lr, self.schedule, self.warmup, self.max_len, self.seed, self.val_split,
                  self.val_split_radio, self.val_file_radio, self.val_file_button):
            w.setEnabled(not running)
        if not running:
            self._val_mode_changed()

    def settings_dict(self) -> dict:
        return {"method": self.method.currentData(), "lora_rank": self.lora_rank.value(),
                "lora_alpha": self.lora_alpha.value(), "epochs": self.epochs.value(), "batch": self.batch.value(),
                "lr": self.lr.currentText(), "schedule": self.schedule.currentData(), "warmup": self.warmup.value(),
                "max_len": self.max_len.value(), "seed": self.seed.value(), "val_split": self.val_split.value()}

    def apply_settings_dict(self, d: dict) -> None:
        def num(k, default, cast=int):
            try:
                return cast(d.get(k, default))
            except (TypeError, ValueError):
                return default
        i = self.method.findData(d.get("method", "lora"))
        self.method.setCurrentIndex(max(0, i))
        self.lora_rank.setValue(num("lora_rank", 16))
        self.lora_alpha.setValue(num("lora_alpha", 32.0, float))
        self.epochs.setValue(num("epochs", 0))
        self.batch.setValue(num("batch", 0))
        self.lr.setCurrentText(str(d.get("lr", "Auto")))
        i = self.schedule.findData(d.get("schedule", "linear"))
        self.schedule.setCurrentIndex(max(0, i))
        self.warmup.setValue(num("warmup", 5))
        self.max_len.setValue(num("max_len", 512))
        self.seed.setValue(num("seed", 0))
        self.val_split.setValue(num("val_split", 10))
        self._method_changed()

    def save_settings(self, s) -> None:
        import json
        s.setValue("train_settings", json.dumps(self.settings_dict()))

    def restore_settings(self, s) -> None:
        import json
        try:
            d = json.loads(s.value("train_settings", "{}", type=str) or "{}")
        except (ValueError, TypeError):
            return
        if isinstance(d, dict):
            self.apply_settings_dict(d)

    # ------------------------------------------------------------------ the file and the estimate
    def set_base_choices(self, embedded: str, embedded_ok: bool, current: str | None, runs: list,
                         choose_marker: str, cached: list = ()) -> None:
        """The base model box: the built-in model, the current folder, runs with a model, models in
        the Hugging Face cache ((label, folder, tooltip, usable): unusable ones greyed out, the
        reason as tooltip), Choose…"""
        box = self.base_box
        box.blockSignals(True)
        box.clear()
        box.addItem("Built-in base model" + ("" if embedded_ok else " (not installed)"), embedded)
        run_paths = {path for _, path in runs} | {c[1] for c in cached}
        if current and current != embedded and current not in run_paths:
            box.addItem(f"Folder: {Path(current).name}", current)
        for label, path in runs:
            box.addItem(label, path)
        for label, path, tip, usable in cached:
            box.addItem(label, path if usable else None)
            i = box.count() - 1
            box.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
            if not usable:
                box.model().item(i).setEnabled(False)
        box.addItem("Choose a folder…", choose_marker)
        box.setCurrentIndex(max(0, box.findData(current)))
        box.setToolTip(f"{current}\n\n" + TIPS["base"])
        box.blockSignals(False)

    def show_file_report(self, path: str, rep, sizes) -> None:
        """A checked training file: the issues, the preview and a one-line summary in the drop zone."""
        self.show_report(rep)
        detail = f"{rep.format or '?'} · {sizes.examples} examples · {sizes.tokens:,} tokens"
        if sizes.longest:
            detail += f" · longest {sizes.longest}"
        if rep.ok:
            n = len(rep.warnings)
            detail += f" · {n} warning{'s' if n != 1 else ''}" if n else " · ready"
            self.drop_zone.set_state("ok", Path(path).name, detail)
        else:
            n = len(rep.errors)
            self.drop_zone.set_state("bad", Path(path).name, f"{n} error{'s' if n != 1 else ''} must be fixed "
                                                             f"before training (click one to see the line) · {detail}")

    def show_unusable(self, path: str, why: str) -> None:
        self.drop_zone.set_state("bad", Path(path).name, f"Cannot use this file: {why}")

    def show_issue_line(self, issue, text: str, file_name: str):
        """A dialog with the file line an issue points at (non-blocking). Returns the dialog."""
        from PySide6.QtWidgets import QMessageBox
        box = QMessageBox(self.window())
        box.setObjectName("issueLineDialog")
        box.setWindowTitle(f"Line {issue.line}")
        box.setIcon(QMessageBox.Icon.Warning if issue.severity == "error" else QMessageBox.Icon.Information)
        box.setText(str(issue))
        box.setInformativeText(f"Line {issue.line} of {file_name}:")
        box.setDetailedText(text.rstrip("\n"))
        box.setStandardButtons(QMessageBox.StandardButton.Ok)
        box.open()
        return box

    def show_estimate(self, est, message: str = "") -> None:
        """A bridge.Estimate, or a message when there is none."""
        if est is None:
            self.estimate.setText(message)
            return
        text = (f"About <b>{est.steps} steps</b> ({est.epochs} epoch{'s' if est.epochs != 1 else ''} × batch "
                f"{est.batch_size}, LR {est.learning_rate:.1e}) · ≈ <b>{human_duration(est.seconds)}</b> · "
                f"memory ≈ {est.memory_bytes / 2**20:,.0f} MB")
        if not est.memory_fits:
            text += ("<br><span style='color:#a3261b'>This may not fit in memory: lower the batch size or "
                     "max length.</span>")
        self.estimate.setText(text)
        self.estimate.setToolTip(est.memory_text)

    # ------------------------------------------------------------------ a run's progress
    def show_preparing(self) -> None:
        self.progress.setRange(0, 0)   # busy until the loop reports its step count
        self.progress.setFormat("preparing…")
        self.progress_label.setText("Loading the base model and encoding the data…")
        self._label_at = 0.0

    def show_run_started(self, e) -> None:
        total = max(1, e.total_steps)
        self.progress.setRange(0, total)
        self.progress.setValue(e.resumed_from_step)
        self.progress.setFormat("step %v / %m")
        pct = 100.0 * e.trainable_params / max(1, e.total_params)
        self.progress_label.setText(
            f"{e.num_train_examples} training / {e.num_valid_examples} validation examples · "
            f"{e.epochs} epochs × {e.steps_per_epoch} steps · batch {e.batch_size} · LR {e.learning_rate:.1e} · "
            f"training {e.trainable_params:,} of {e.total_params:,} weights ({pct:.2f}%)")
        self._label_at = time.monotonic() + 3.0   # keep this summary readable for a few seconds

    def show_step(self, m, paused: bool = False, force: bool = False) -> None:
        """The latest StepMetrics: the bar at once, the text at most 4 times a second (a wrapped
        label that changes size relays the whole panel out)."""
        total = max(1, m.total_steps or self.progress.maximum())
        if self.progress.maximum() != total:
            self.progress.setRange(0, total)
            self.progress.setFormat("step %v / %m")
        self.progress.setValue(min(m.step, total))
        now = time.monotonic()
        if not force and now - getattr(self, "_label_at", 0.0) < 0.25:
            return
        self._label_at = now
        self.progress_label.setText(
            f"step {m.step}/{total} · epoch {m.epoch:.2f} · loss {m.train_loss:.4f} · "
            f"{m.tokens_per_s:,.0f} tokens/s · ETA {human_duration(m.eta_s)}" + (" · paused" if paused else ""))

    def show_paused(self, paused: bool) -> None:
        text = self.progress_label.text().removesuffix(" · paused")
        self.progress_label.setText(text + (" · paused" if paused else ""))

    def show_ended(self, e) -> None:
        """RunFinished / RunStopped / RunFailed, or None (the run never started)."""
        from ..training import events as ev
        if isinstance(e, ev.RunFinished):
            self.progress.setRange(0, 1)
            self.progress.setValue(1)
            self.progress.setFormat("finished")
            vl = f", validation loss {e.final_valid_loss:.4f}" if e.final_valid_loss is not None else ""
            self.progress_label.setText(
                f"Finished {e.steps} steps in {human_duration(e.elapsed_s)}: train loss {e.final_train_loss:.4f}{vl}. "
                "The chat now talks to the tuned model.")
        elif isinstance(e, ev.RunStopped):
            self.progress.setFormat(f"stopped at step {e.step}")
            self.progress_label.setText(
                f"Stopped at step {e.step}." + (" A checkpoint was saved; you can chat with it." if e.checkpoint else ""))
        elif isinstance(e, ev.RunFailed):
            self.progress.setFormat("failed")
            self.progress_label.setText(f"Failed at step {e.step}.")
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("not finished")


def _label(text: str, tip: str) -> QLabel:
    lab = QLabel(text)
    lab.setToolTip(tip)
    return lab


def human_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0 or math.isinf(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"
