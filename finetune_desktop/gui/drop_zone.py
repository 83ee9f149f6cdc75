"""The drop zone for the training file (objectName `dataDropZone`)."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QVBoxLayout


class DropZone(QFrame):
    """objectName `dataDropZone`: drop a training file here (or click Browse)."""

    fileDropped = Signal(str)
    browseRequested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("dataDropZone")
        self.setAcceptDrops(True)
        self.setAccessibleName("Drop a training file here")
        self.setToolTip("Drop a training file here: JSONL chat (OpenAI style), prompt/completion JSONL, "
                        "or CSV/TSV with a prompt and a response column.")
        self.setProperty("state", "empty")
        self.setMinimumHeight(70)
        self.title = QLabel("<b>Drop a training file here</b>")
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.title.setWordWrap(True)
        self.detail = QLabel("JSONL chat · prompt/completion · CSV/TSV")
        self.detail.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.detail.setWordWrap(True)
        self.detail.setStyleSheet("color: #55626f;")
        self.browse = QPushButton("Browse…")
        self.browse.setObjectName("browseButton")
        self.browse.setToolTip("Choose a training file (Ctrl+O).")
        self.browse.clicked.connect(self.browseRequested)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 6, 8, 6)
        lay.setSpacing(2)
        lay.addWidget(self.title)
        lay.addWidget(self.detail)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.browse)
        row.addStretch(1)
        lay.addLayout(row)

    def set_state(self, state: str, title: str, detail: str) -> None:
        self.setProperty("state", state)
        self.title.setText(f"<b>{_esc(title)}</b>")
        self.detail.setText(detail)
        self.style().unpolish(self)
        self.style().polish(self)

    # drag and drop (the window forwards drops anywhere to the same handlers)
    def dragEnterEvent(self, e) -> None:
        if first_local_file(e.mimeData()):
            e.acceptProposedAction()
            self._set_drag(True)
        else:
            e.ignore()

    def dragMoveEvent(self, e) -> None:
        if first_local_file(e.mimeData()):
            e.acceptProposedAction()

    def dragLeaveEvent(self, e) -> None:
        self._set_drag(False)

    def dropEvent(self, e) -> None:
        self._set_drag(False)
        path = first_local_file(e.mimeData())
        if path:
            e.acceptProposedAction()
            self.fileDropped.emit(path)

    def _set_drag(self, on: bool) -> None:
        self.setProperty("dragActive", "true" if on else "false")
        self.style().unpolish(self)
        self.style().polish(self)


def first_local_file(mime) -> str | None:
    if mime is None or not mime.hasUrls():
        return None
    for url in mime.urls():
        if url.isLocalFile():
            return url.toLocalFile()
    return None


def _esc(s: str) -> str:
    import html
    return html.escape(s)
