"""Run history: every run under the app's runs folder, reopened after a restart to view its
charts, settings and final metrics and to chat with it; rename, delete, overlay curves, export.
The panel shows RunEntry objects (runs_controller.py), read on a worker: it reads no files."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
                               QTableWidgetItem, QTextBrowser, QVBoxLayout, QWidget)

STATUS_TEXT = {"finished": "✔ finished", "stopped": "■ stopped", "failed": "✖ failed", "running": "● running",
               "interrupted": "⚠ interrupted", "elsewhere": "● elsewhere"}


def status_of(info) -> str:
    """A run's status as the panel shows it: "running" splits into running here and elsewhere
    (training.runs.load_run gives the other process in `reason`)."""
    if info.status == "running" and (info.reason or "").startswith("training in another process"):
        return "elsewhere"
    return info.status


def can_continue(entry) -> bool:
    """Continue makes sense: not running anywhere, and a checkpoint to continue from (an
    interrupted run without one starts again from step 0)."""
    st = status_of(entry.info)
    return st == "interrupted" or (st not in ("running", "elsewhere") and bool(entry.checkpoints))


def is_busy(entry) -> bool:
    """Another process (or this one) is writing the run: no rename, no delete."""
    return status_of(entry.info) in ("running", "elsewhere")


class HistoryPanel(QWidget):
    openRequested = Signal(str)
    renameRequested = Signal(str)
    deleteRequested = Signal(str)
    overlayChanged = Signal(str, bool)
    exportModelRequested = Signal(str)
    exportAdapterRequested = Signal(str)
    continueRequested = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("runHistory")
        self.table = QTableWidget(0, 5)
        self.table.setObjectName("runTable")
        self.table.setHorizontalHeaderLabels(["∿", "run", "status", "train", "valid"])
        for c, tip in enumerate(("Tick to draw this run's loss curve on the chart, for comparison.", "The run's name.",
                                 "finished, stopped, failed, interrupted, running here or elsewhere",
                                 "Final training loss.", "Final validation loss.")):
            self.table.horizontalHeaderItem(c).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for c in (2, 3, 4):
            hh.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setToolTip("Double-click a run to open its charts and chat with it. Tick the first column "
                              "to draw its loss curve on the chart for comparison.")
        self.table.itemChanged.connect(self._item_changed)
        self.table.cellDoubleClicked.connect(lambda r, _c: self._emit(self.openRequested, r))
        self.table.itemSelectionChanged.connect(self._show_details)
        self.details = QTextBrowser()
        self.details.setObjectName("runDetails")
        self.details.setMaximumHeight(170)
        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Show this run's charts and chat with its model.")
        self.rename_button = QPushButton("Rename…")
        self.delete_button = QPushButton("Delete…")
        self.continue_button = QPushButton("Continue…")
        self.continue_button.setToolTip("Finish a stopped run, or train a finished run for more epochs, "
                                        "from its last checkpoint.")
        self.export_model_button = QPushButton("Export…")
        self.export_model_button.setToolTip("Save the tuned model as a GGUF file (llama.cpp, Ollama, LM Studio), a "
                                            "Hugging Face folder, or its LoRA adapter (PEFT).")
        self.export_adapter_button = QPushButton("Export adapter…")
        self.export_adapter_button.setToolTip("Save only the LoRA adapter (PEFT format) to use on top of the base model.")
        self.export_adapter_button.setVisible(False)       # Export… offers it
        for b, sig in ((self.open_button, self.openRequested), (self.rename_button, self.renameRequested),
                       (self.delete_button, self.deleteRequested),
                       (self.continue_button, self.continueRequested),
                       (self.export_model_button, self.exportModelRequested),
                       (self.export_adapter_button, self.exportAdapterRequested)):
            b.clicked.connect(lambda _=False, s=sig: self._emit(s, self.table.currentRow()))
        row1 = QHBoxLayout()
        row1.addWidget(self.open_button)
        row1.addWidget(self.rename_button)
        row1.addWidget(self.delete_button)
        row2 = QHBoxLayout()
        row2.addWidget(self.continue_button)
        row2.addWidget(self.export_model_button)
        row2.addWidget(self.export_adapter_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(QLabel("Every run is kept here, also after a restart."))
        lay.addWidget(self.table, 1)
        lay.addLayout(row1)
        lay.addLayout(row2)
        lay.addWidget(self.details)
        self.runs = []
        self._overlaid: set[str] = set()

    def set_runs(self, runs) -> None:
        """runs: list[RunEntry], newest first."""
        self.runs = list(runs)
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.runs))
        for r, entry in enumerate(self.runs):
            info = entry.info
            chk = QTableWidgetItem()
            chk.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            chk.setCheckState(Qt.CheckState.Checked if info.path in self._overlaid else Qt.CheckState.Unchecked)
            chk.setData(Qt.ItemDataRole.UserRole, info.path)
            self.table.setItem(r, 0, chk)
            name = QTableWidgetItem(entry.title)
            name.setToolTip(f"{info.path}\ndata: {info.data_path}\nbase: {info.base_model}")
            self.table.setItem(r, 1, name)
            st = status_of(info)
            status = QTableWidgetItem(STATUS_TEXT.get(st, st))
            if info.reason:
                status.setToolTip(info.reason)
            self.table.setItem(r, 2, status)
            self.table.setItem(r, 3, QTableWidgetItem(_f(info.final_train_loss)))
            self.table.setItem(r, 4, QTableWidgetItem(_f(info.final_valid_loss)))
        self.table.blockSignals(False)
        self._overlaid &= {i.path for i in self.runs}
        self._show_details()

    def is_overlaid(self, path: str) -> bool:
        return path in self._overlaid

    def _emit(self, signal, row: int) -> None:
        if 0 <= row < len(self.runs):
            signal.emit(self.runs[row].path)

    def _item_changed(self, item) -> None:
        if item.column() != 0:
            return
        path = item.data(Qt.ItemDataRole.UserRole)
        on = item.checkState() == Qt.CheckState.Checked
        (self._overlaid.add if on else self._overlaid.discard)(path)
        self.overlayChanged.emit(path, on)

    def _show_details(self) -> None:
        r = self.table.currentRow()
        if not (0 <= r < len(self.runs)):
            self.details.setPlainText("Select a run to see its settings and results.")
            for b in (self.open_button, self.rename_button, self.delete_button, self.export_model_button,
                      self.export_adapter_button, self.continue_button):
                b.setEnabled(False)
            return
        entry = self.runs[r]
        info, d = entry.info, entry.details
        st = status_of(info)
        self.open_button.setEnabled(True)
        for b in (self.rename_button, self.delete_button):
            b.setEnabled(not is_busy(entry))
            b.setToolTip("A run that is training cannot be renamed or deleted." if is_busy(entry) else "")
        self.continue_button.setEnabled(can_continue(entry))
        self.continue_button.setText("Continue (finish it)" if st == "interrupted" else "Continue…")
        self.export_model_button.setEnabled(info.has_model)
        self.export_adapter_button.setEnabled(entry.has_adapter)
        s = d.get("settings") or {}
        hyper = d.get("hyper") or {}
        lr = hyper.get("learning_rate", s.get("learning_rate"))
        try:
            lr = f"{float(lr):.2e}"
        except (TypeError, ValueError):
            pass
        import html
        long_status = "● running elsewhere (another process trains it)" if st == "elsewhere" else STATUS_TEXT.get(st, st)
        lines = [f"<b>{html.escape(entry.title)}</b> — {long_status}",
                 f"folder: {info.path}",
                 f"created {info.created[:19].replace('T', ' ')}",
                 f"data: {info.data_path}", f"base model: {info.base_model}",
                 f"method: {s.get('method', '?')}"
                 + (f" (rank {s.get('lora_rank')}, alpha {s.get('lora_alpha')})" if s.get("method") == "lora" else ""),
                 f"epochs {hyper.get('epochs', s.get('epochs'))} · batch {hyper.get('batch_size', s.get('batch_size'))}"
                 f" · LR {lr} · {s.get('schedule', '')}",
                 f"steps {info.steps}/{info.total_steps or '?'} · final train loss {_f(info.final_train_loss)}"
                 f" · valid loss {_f(info.final_valid_loss)}"]
        if info.reason:
            what = {"interrupted": "interrupted: ", "elsewhere": "", "failed": "failed: "}.get(st, "")
            lines.insert(1, f"<span style='color:#a3261b'>{what}{html.escape(info.reason)}</span>")
        self.details.setHtml("<br>".join(x if x.startswith("<") else html.escape(x) for x in lines))

    def select_run(self, path: str) -> None:
        for r, entry in enumerate(self.runs):
            if entry.path == path:
                self.table.selectRow(r)
                return


def _f(v) -> str:
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return "–"
