"""Run history: every run under the app's runs folder, reopened after a restart to view its
charts, settings and final metrics and to chat with it; rename, delete, overlay curves, export.
The panel shows RunEntry objects (runs_controller.py), read on a worker: it reads no files."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
                               QTableWidgetItem, QTextBrowser, QVBoxLayout, QWidget)

STATUS_TEXT = {"finished": "✔ finished", "stopped": "■ stopped", "failed": "✖ failed", "running": "● running"}


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
        self.table.setHorizontalHeaderLabels(["overlay", "run", "status", "train loss", "valid loss"])
        self.table.verticalHeader().setVisible(False)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for c in (2, 3, 4):
            hh.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setToolTip("Double-click a run to open its charts and chat with it. Tick 'overlay' to "
                              "draw its loss curve on the chart for comparison.")
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
        self.export_model_button = QPushButton("Export model…")
        self.export_model_button.setToolTip("Save the tuned model as a Hugging Face folder (LoRA merged).")
        self.export_adapter_button = QPushButton("Export adapter…")
        self.export_adapter_button.setToolTip("Save only the LoRA adapter (PEFT format) to use on top of the base model.")
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
            self.table.setItem(r, 2, QTableWidgetItem(STATUS_TEXT.get(info.status, info.status)))
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
        for b in (self.open_button, self.rename_button, self.delete_button):
            b.setEnabled(True)
        self.continue_button.setEnabled(info.status != "running" and bool(entry.checkpoints))
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
        lines = [f"<b>{html.escape(entry.title)}</b> — {STATUS_TEXT.get(info.status, info.status)}",
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
            lines.append(f"<span style='color:#a3261b'>failed: {html.escape(info.reason)}</span>")
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
