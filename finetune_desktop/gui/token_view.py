"""Per-token loss: one training or validation example with every token coloured by its loss under
a model (grey where the loss does not count), the base model ("before") beside the chosen one
("now"): the base model, a checkpoint, the tuned model or the current weights of the run in this
window (only while it is paused or after it ended). Hovering a token shows its probability and
the model's top 3 guesses, on both sides at once.

The numbers are training.inspect.token_losses (the engine's forward pass), computed on a worker.
Reading the current weights goes through TrainingController.begin_read / end_read, so a resume
waits until the reading is done."""
from __future__ import annotations

import html

from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPen
from PySide6.QtWidgets import (QCheckBox, QComboBox, QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QSplitter,
                               QToolTip, QVBoxLayout, QWidget)

from . import style
from .tokens import LOSS_SCALE_MAX, describe, loss_rgb, shown_text
from .workers import start_job

LIVE = "live::"           # the model spec of "the current weights of the run in this window"
PAD_X, PAD_Y, GAP = 3, 2, 2


class TokenStrip(QWidget):
    """Tokens as coloured chips that wrap like text. hovered(i) when the mouse is over token i."""

    hovered = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setFont(style.app_font())
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.texts: list[str] = []
        self.kinds: list[str] = []
        self.losses: list = []
        self.tip = lambda i: ""
        self.marked = -1
        self._rects: list[QRect] = []
        self._laid_for = -1

    def set_tokens(self, texts, kinds, losses, tip) -> None:
        self.texts, self.kinds, self.losses, self.tip = list(texts), list(kinds), list(losses), tip
        self._laid_for = -1
        self.marked = -1
        self.updateGeometry()
        self.update()

    def clear(self) -> None:
        self.set_tokens([], [], [], lambda i: "")

    def _layout(self, width: int) -> int:
        fm = QFontMetrics(self.font())
        h = fm.height() + 2 * PAD_Y
        x = y = 0
        rects = []
        for t in self.texts:
            label = t if t != "\n" else "\u23ce"
            w = fm.horizontalAdvance(shown_text_label(label)) + 2 * PAD_X
            if x > 0 and x + w > width:
                x, y = 0, y + h + GAP
            rects.append(QRect(x, y, w, h))
            x += w + GAP
            if "\n" in t:
                x, y = 0, y + h + GAP
        self._rects = rects
        self._laid_for = width
        return (y + h) if rects else h

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, w: int) -> int:
        return self._layout(max(50, w))

    def sizeHint(self) -> QSize:
        return QSize(300, self.heightForWidth(self.width() or 300))

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self._laid_for = -1

    def paintEvent(self, e) -> None:
        if self._laid_for != self.width():
            self._layout(self.width())
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        for i, r in enumerate(self._rects):
            if not r.intersects(e.rect()):
                continue
            rgb = loss_rgb(self.losses[i] if i < len(self.losses) else None)
            p.fillRect(r, QColor(*rgb))
            if i == self.marked:
                p.setPen(QPen(QColor("#1d2733"), 2))
                p.drawRect(r.adjusted(1, 1, -1, -1))
            kind = self.kinds[i] if i < len(self.kinds) else "text"
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 150      # white text on the red chips
            faint = kind in ("special", "part")
            p.setPen(QColor(("#f2f2f2" if faint else "#ffffff") if dark else ("#7a8794" if faint else "#1d2733")))
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, shown_text_label(self.texts[i]))
        p.end()

    def index_at(self, pos: QPoint) -> int:
        for i, r in enumerate(self._rects):
            if r.contains(pos):
                return i
        return -1

    def mouseMoveEvent(self, e) -> None:
        i = self.index_at(e.position().toPoint())
        if i >= 0:
            self.mark(i)
            self.hovered.emit(i)
            QToolTip.showText(e.globalPosition().toPoint(), self.tip(i), self)
        super().mouseMoveEvent(e)

    def mark(self, i: int) -> None:
        if i != self.marked:
            self.marked = i
            self.update()


def shown_text_label(text: str) -> str:
    from .tokens import Piece
    return shown_text(Piece(text, "text", text))


class TokenPane(QWidget):
    """A title, the mean loss and a strip of tokens in a scroll area."""

    def __init__(self, title: str, parent=None):
        super().__init__(parent)
        self.title = QLabel(f"<b>{html.escape(title)}</b>")
        self.title.setWordWrap(True)
        self.title.setMinimumHeight(2 * self.title.fontMetrics().lineSpacing() + 2)
        self.strip = TokenStrip()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self.strip)
        self.scroll = scroll
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.title)
        lay.addWidget(scroll, 1)
        self.picture = None

    def show_picture(self, pic) -> None:
        self.picture = pic
        if pic is None:
            self.strip.clear()
            return
        counted = [x for x in pic.losses if x is not None]
        bold = self.title.font()
        bold.setBold(True)
        label = QFontMetrics(bold).elidedText(pic.label, Qt.TextElideMode.ElideRight, max(120, self.width() - 8))
        self.title.setText(f"<b>{html.escape(label)}</b><br>mean loss over the {len(counted)} counted tokens "
                           f"<b>{pic.mean_loss:.3f}</b>")
        self.title.setToolTip(pic.label)
        self.strip.set_tokens([p.text for p in pic.pieces], [p.kind for p in pic.pieces], list(pic.losses),
                              lambda i, pic=pic: describe(pic, i))

    def show_message(self, text: str) -> None:
        self.picture = None
        self.title.setText(html.escape(text))
        self.strip.clear()


class TokenLossView(QWidget):
    """objectName `tokenLossView`."""

    computed = Signal()          # both panes show what was asked for

    def __init__(self, pool, cache, parent=None):
        super().__init__(parent)
        self.setObjectName("tokenLossView")
        self.pool, self.cache = pool, cache
        self.examples: list = []               # bridge.ExampleRef
        self.live_reader = None                # TrainingController (begin_read / end_read / readable)
        self.base_of = lambda spec: None       # the base model spec of a chosen model
        self._gen = 0
        self._waiting = 0
        self._build()

    def _build(self) -> None:
        self.example_box = QComboBox()
        self.example_box.setObjectName("tokenExampleBox")
        self.example_box.setMinimumContentsLength(10)
        self.example_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.example_box.setToolTip("Which example: training or validation, by its line in the file.")
        self.model_box = QComboBox()
        self.model_box.setObjectName("tokenModelBox")
        self.model_box.setMinimumContentsLength(8)
        self.model_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_box.setToolTip("Whose predictions: the base model, a checkpoint, the tuned model, or the "
                                  "current weights (while the run is paused or after it ended).")
        self.compare = QCheckBox("Before vs now")
        self.compare.setChecked(True)
        self.compare.setToolTip("Show the base model (before fine-tuning) beside the chosen model.")
        for w in (self.example_box, self.model_box):
            w.activated.connect(lambda _i: self.refresh())
        self.compare.toggled.connect(self._compare_toggled)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Example"))
        row.addWidget(self.example_box, 2)
        row.addWidget(QLabel("Model"))
        row.addWidget(self.model_box, 1)
        row.addWidget(self.compare)
        self.legend = QLabel(legend_html())
        self.legend.setWordWrap(True)
        self.legend.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.before = TokenPane("before: base model")
        self.now = TokenPane("now")
        self.before.strip.hovered.connect(self.now.strip.mark)
        self.now.strip.hovered.connect(self.before.strip.mark)
        self.splitter = QSplitter()
        self.splitter.addWidget(self.before)
        self.splitter.addWidget(self.now)
        self.splitter.setChildrenCollapsible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(3)
        lay.addLayout(row)
        lay.addWidget(self.legend)
        lay.addWidget(self.splitter, 1)
        self.now.show_message("Load a training file, then choose an example (or double-click one in the data table).")
        self.before.show_message("")

    # ------------------------------------------------------------------ choices
    def set_examples(self, refs) -> None:
        keep = self.current_example()
        self.examples = list(refs)
        self.example_box.blockSignals(True)
        self.example_box.clear()
        for i, r in enumerate(self.examples):
            self.example_box.addItem(f"line {r.line} · {r.split} · {r.preview}", i)
        if keep is not None:
            self.select_example(keep.line, keep.split, compute=False)
        self.example_box.blockSignals(False)

    def set_models(self, entries, live_label: str | None) -> None:
        """entries: runs_controller.ModelEntry list (base first); live_label: the current weights
        entry (None when no run of this window has a model to read)."""
        keep = self.model_box.currentData()
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for e in entries:
            self.model_box.addItem(e.label, e.spec)
        if live_label:
            self.model_box.addItem(live_label, LIVE)
        i = self.model_box.findData(keep)
        self.model_box.setCurrentIndex(i if i >= 0 else self.model_box.count() - 1)
        self.model_box.blockSignals(False)

    def current_example(self):
        i = self.example_box.currentData()
        return self.examples[i] if isinstance(i, int) and 0 <= i < len(self.examples) else None

    def select_example(self, line: int, split: str | None = None, compute: bool = True) -> bool:
        for i, r in enumerate(self.examples):
            if r.line == line and (split is None or r.split == split):
                self.example_box.setCurrentIndex(self.example_box.findData(i))
                if compute:
                    self.refresh()
                return True
        return False

    def select_model(self, spec: str, compute: bool = True) -> bool:
        i = self.model_box.findData(spec)
        if i < 0:
            return False
        self.model_box.setCurrentIndex(i)
        if compute:
            self.refresh()
        return True

    def _compare_toggled(self, on: bool) -> None:
        self.before.setVisible(on)
        if on:
            self.refresh()

    # ------------------------------------------------------------------ computing
    def refresh(self) -> None:
        """Compute what the choices ask for (on workers); `computed` once both panes show it."""
        ex, spec = self.current_example(), self.model_box.currentData()
        if ex is None or not spec:
            return
        self._gen += 1
        gen = self._gen
        self._waiting = 0
        label = self.model_box.currentText()
        self._compute(gen, self.now, spec, ex, f"now: {label}")
        if self.compare.isChecked():
            base = self.base_of(spec)
            if base:
                self._compute(gen, self.before, base, ex, "before: base model")
            else:
                self.before.show_message("before: no base model known for this choice")

    def _compute(self, gen: int, pane: TokenPane, spec: str, ex, label: str) -> None:
        from . import bridge
        pane.show_message(f"{label}: computing…")
        self._waiting += 1
        if spec == LIVE:
            got = self.live_reader.begin_read() if self.live_reader is not None else None
            if got is None:
                self._waiting -= 1
                pane.show_message(f"{label}: the current weights can be read only while the run is paused or "
                                  "after it ended (the training thread is changing them).")
                return
            model, tok = got
            start_job(self.pool, bridge.token_picture, model, tok, ex.input_ids, ex.labels, label,
                      on_result=lambda pic: self._done(gen, pane, pic),
                      on_error=lambda m: self._failed(gen, pane, label, m),
                      on_done=self.live_reader.end_read, name="token-loss")
            return

        def work():
            model, tok = self.cache.get(spec)
            return bridge.token_picture(model, tok, ex.input_ids, ex.labels, label)
        start_job(self.pool, work, on_result=lambda pic: self._done(gen, pane, pic),
                  on_error=lambda m: self._failed(gen, pane, label, m), name="token-loss")

    def _done(self, gen: int, pane: TokenPane, pic) -> None:
        if gen != self._gen:
            return
        pane.show_picture(pic)
        self._settle()

    def _failed(self, gen: int, pane: TokenPane, label: str, message: str) -> None:
        if gen != self._gen:
            return
        pane.show_message(f"{label}: {message}")
        self._settle()

    def _settle(self) -> None:
        self._waiting -= 1
        if self._waiting <= 0:
            self.computed.emit()


def legend_html() -> str:
    stops = [0.0, 1.0, 2.0, 3.0, 4.5, LOSS_SCALE_MAX]
    cells = "".join(f"<span style='background-color:rgb{loss_rgb(v)}'>&nbsp;{v:g}&nbsp;</span>" for v in stops)
    grey = f"<span style='background-color:rgb{loss_rgb(None)}'>&nbsp;grey&nbsp;</span>"
    return (f"Loss per token (nats): {cells}+ · {grey} not counted · hover a token: its probability and "
            "the model's top 3 guesses")
