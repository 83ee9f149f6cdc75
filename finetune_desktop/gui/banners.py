"""The strips above the panels: a notice (no base model, ...), an error with Dismiss, and the
alarm of a run that overfits or forgets (objectName `overfitBanner`), which says in plain words
what is happening and offers to stop with the best checkpoint as the run's model."""
from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

HEADLINES = {
    "overfit": "Overfitting:",
    "forgetting": "Forgetting:",
}
EXTRA_STYLE = """
#overfitBanner { background: #fff1e0; border: 1px solid #e3a35a; border-radius: 4px; }
#overfitBanner QLabel { color: #5a3300; }
"""


class Banners(QWidget):
    keepBestRequested = Signal()        # "Stop and keep the best checkpoint"
    stopRequested = Signal()            # "Stop now" (an alarm without a best checkpoint)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        self.banner = QLabel("")
        self.banner.setObjectName("banner")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.error_banner, eb, self.error_label = _banner("errorBanner", "errorLabel")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("Dismiss")
        close.clicked.connect(lambda: self.error_banner.setVisible(False))
        eb.addWidget(self.error_label, 1)
        eb.addWidget(close)
        self.error_banner.setVisible(False)
        lay.addWidget(self.banner)
        lay.addWidget(self.error_banner)
        lay.addWidget(self._build_alarm())
        self.setStyleSheet(EXTRA_STYLE)

    def _build_alarm(self) -> QWidget:
        self.alarm_banner, row, self.alarm_label = _banner("overfitBanner", "overfitText")
        self.alarm_label.setTextFormat(Qt.TextFormat.RichText)
        self.keep_best_button = QPushButton("Stop and keep the best checkpoint")
        self.keep_best_button.setObjectName("keepBestButton")
        self.keep_best_button.clicked.connect(self._keep_best)
        self.stop_now_button = QPushButton("Stop now")
        self.stop_now_button.clicked.connect(self._stop_now)
        dismiss = QPushButton("Dismiss")
        dismiss.setToolTip("Hide this message and let the run go on.")
        dismiss.clicked.connect(lambda: self.alarm_banner.setVisible(False))
        buttons = QVBoxLayout()
        buttons.setSpacing(2)
        buttons.addWidget(self.keep_best_button)
        buttons.addWidget(self.stop_now_button)
        buttons.addWidget(dismiss)
        row.addWidget(self.alarm_label, 1)
        row.addLayout(buttons)
        self.alarm_banner.setVisible(False)
        self.alarm = None
        return self.alarm_banner

    # ------------------------------------------------------------------ the alarm
    def show_alarm(self, alarm, running: bool = True) -> None:
        """A RunAlarm: what it means in plain words, and what to do about it."""
        self.alarm = alarm
        head = HEADLINES.get(alarm.kind, "Something in this run needs your attention.")
        best = alarm.best_step is not None
        self.alarm_label.setText(f"<b>{html.escape(head)}</b> {html.escape(alarm.message)}")
        self.keep_best_button.setToolTip(f"Stop now and save the weights of step {alarm.best_step} (the lowest "
                                         "validation loss) as this run's model." if best else "")
        self.keep_best_button.setVisible(best)
        self.keep_best_button.setEnabled(running)
        self.keep_best_button.setText("Stop and keep the best checkpoint")
        self.stop_now_button.setVisible(not best)
        self.stop_now_button.setEnabled(running)
        self.alarm_banner.setVisible(True)

    def run_ended(self) -> None:
        """The run is over: the buttons have nothing left to stop (the words stay until dismissed)."""
        self.keep_best_button.setEnabled(False)
        self.stop_now_button.setEnabled(False)

    def hide_alarm(self) -> None:
        self.alarm = None
        self.alarm_banner.setVisible(False)

    def _keep_best(self) -> None:
        self.keep_best_button.setEnabled(False)
        self.keep_best_button.setText(f"Stopping: step {self.alarm.best_step} becomes the model…"
                                      if self.alarm is not None else "Stopping…")
        self.keepBestRequested.emit()

    def _stop_now(self) -> None:
        self.stop_now_button.setEnabled(False)
        self.stopRequested.emit()


def _banner(name: str, label_name: str) -> tuple[QWidget, QHBoxLayout, QLabel]:
    """A styled banner row with a word-wrapped label (the caller adds its buttons)."""
    w = QWidget()
    w.setObjectName(name)
    w.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
    row = QHBoxLayout(w)
    row.setContentsMargins(8, 4, 4, 4)
    label = QLabel("")
    label.setObjectName(label_name)
    label.setWordWrap(True)
    return w, row, label
