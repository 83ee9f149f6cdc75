"""The lecture's steps of one training step, lit up live with their time in milliseconds:
weights loaded from the pre-trained model -> forward -> loss -> backpropagation -> update."""
from __future__ import annotations

import time

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

PHASES = [
    ("weights", "Pre-trained", "The model starts from the weights it learned in pre-training "
                               "(not random numbers). Fine-tuning only nudges them."),
    ("forward", "Forward", "The model reads a batch of your examples and predicts every next token."),
    ("loss", "Loss", "How wrong the predictions were, measured on the answer tokens only."),
    ("backward", "Backprop", "Backpropagation: works out, for every trainable weight, which direction lowers the loss."),
    ("update", "Update", "The optimizer (AdamW) moves the weights a small step in that direction."),
]

# background colours of a box: idle, done this step, running now (set through the palette: cheap
# enough to change several times per second, unlike a style sheet)
_IDLE = "#f3f5f8"
_DONE = "#eaf4ec"
_ACTIVE = "#ffe9b3"


class PhaseStrip(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("phaseStrip")
        self.boxes: dict[str, tuple[QFrame, QLabel, QLabel]] = {}
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        for i, (key, title, tip) in enumerate(PHASES):
            if i:
                arrow = QLabel("→")
                arrow.setAlignment(Qt.AlignmentFlag.AlignCenter)
                arrow.setStyleSheet("color: #8a96a3; font-size: 14pt;")
                lay.addWidget(arrow)
            box = QFrame()
            box.setObjectName("phaseBox")
            box.setToolTip(tip)
            box.setFrameShape(QFrame.Shape.StyledPanel)
            box.setAutoFillBackground(True)
            _paint(box, _IDLE)
            box.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            v = QVBoxLayout(box)
            v.setContentsMargins(6, 3, 6, 3)
            v.setSpacing(0)
            t = QLabel(title)
            t.setAlignment(Qt.AlignmentFlag.AlignCenter)
            t.setStyleSheet("font-weight: 600;")
            ms = QLabel("–")
            ms.setAlignment(Qt.AlignmentFlag.AlignCenter)
            ms.setStyleSheet("color: #44515f;")
            ms.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            t.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            t.setMinimumWidth(t.fontMetrics().horizontalAdvance(title) + 4)
            v.addWidget(t)
            v.addWidget(ms)
            lay.addWidget(box, 1)
            self.boxes[key] = (box, t, ms)
        self._active = None
        self._active_since = 0.0
        self._pending_phase = None
        self.timer = QTimer(self)            # at most 10 colour changes a second, only while phases come
        self.timer.setSingleShot(True)
        self.timer.setInterval(100)
        self.timer.timeout.connect(self._tick)

    def set_base(self, short: str, description: str = "", pretrained: bool = True) -> None:
        box, t, ms = self.boxes["weights"]
        ms.setText(short)
        box.setToolTip(PHASES[0][2] + ("\n\n" + description if description else ""))
        box = self.boxes["weights"][0]
        _paint(box, _DONE if pretrained else _IDLE)

    def reset(self) -> None:
        for key, (box, _, ms) in self.boxes.items():
            if key != "weights":
                _paint(box, _IDLE)
                ms.setText("–")
        self._active = None

    def set_times(self, phases) -> None:
        """PhaseTimes of the latest step."""
        for key, val in (("forward", phases.forward_ms), ("loss", phases.loss_ms),
                         ("backward", phases.backward_ms), ("update", phases.update_ms)):
            self.boxes[key][2].setText(_ms(val))

    def set_active(self, phase: str | None) -> None:
        """Highlight the phase running now (PhaseEvent.phase); None = idle."""
        self._pending_phase = phase or "none"
        if not self.timer.isActive():
            self.timer.start()

    def _tick(self) -> None:
        if self._pending_phase is None:
            return
        phase = None if self._pending_phase == "none" else self._pending_phase
        self._pending_phase = None
        if phase == self._active:
            return
        order = [k for k, *_ in PHASES]
        for key, (box, _, _) in self.boxes.items():
            if key == "weights":
                continue
            if phase is None:
                _paint(box, _IDLE)
            elif key == phase:
                _paint(box, _ACTIVE)
            elif phase in order and order.index(key) < order.index(phase):
                _paint(box, _DONE)
            else:
                _paint(box, _IDLE)
        self._active = phase
        self._active_since = time.monotonic()


def _paint(box: QFrame, colour: str) -> None:
    if getattr(box, "colour", None) == colour:
        return
    box.colour = colour
    pal = box.palette()
    pal.setColor(QPalette.ColorRole.Window, QColor(colour))
    box.setPalette(pal)


def _ms(v: float) -> str:
    if v != v:
        return "–"
    return f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"
