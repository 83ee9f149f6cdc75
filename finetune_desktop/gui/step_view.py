"""One step, phase by phase: what the training step that step mode ran computed, in the lecture's
order. Batch (the examples and their tokens, which of them count toward the loss) -> forward
(the size of the residual stream entering each layer) -> loss (the loss of every token of the
first example) -> backprop (the gradient norm of every tensor, with LoRA of every adapted
matrix, A and B together) -> update (how far the update moved each tensor, relative to its size,
with the learning rate).

The numbers are the loop's own (events.StepDetail); the token texts are decoded on a worker."""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QHBoxLayout, QLabel, QPushButton, QScrollArea, QSizePolicy,
                               QStackedWidget, QVBoxLayout, QWidget)

from .tensor_grid import LayerTensorGrid, kind_label, split_tensor
from .token_view import TokenStrip, legend_html
from .tokens import describe
from .workers import start_job

PHASES = ("batch", "forward", "loss", "backward", "update")
TITLES = {"batch": "1 Batch", "forward": "2 Forward", "loss": "3 Loss", "backward": "4 Backprop",
          "update": "5 Update"}
MAX_ROWS_SHOWN = 16


@dataclass(frozen=True)
class StepPicture:
    detail: object                    # events.StepDetail
    rows: tuple                       # per batch row: (line, pieces, counted flags)


def step_picture(detail, tokenizer) -> StepPicture:
    """Decode the batch's real tokens for display (a worker)."""
    from .tokens import display_pieces
    rows = []
    ids, labels, mask = (np.asarray(a) for a in (detail.input_ids, detail.labels, detail.attention_mask))
    for r in range(min(len(ids), MAX_ROWS_SHOWN)):
        real = int(mask[r].sum())
        pieces = display_pieces(tokenizer, ids[r][:real])
        counted = tuple(bool(labels[r][t] != -100) and t > 0 for t in range(real))
        line = detail.example_lines[r] if r < len(detail.example_lines) else 0
        rows.append((int(line), tuple(pieces), counted))
    return StepPicture(detail, tuple(rows))


class StepView(QWidget):
    """objectName `stepView`: the centre tab step mode fills."""

    openTokens = Signal(int)          # the source line of the example whose loss page is shown
    phaseShown = Signal(str)          # the phase whose page is shown ("batch", "forward", ...)

    def __init__(self, pool, parent=None):
        super().__init__(parent)
        self.setObjectName("stepView")
        self.pool = pool
        self.picture: StepPicture | None = None
        self.phase = "batch"
        self._gen = 0
        self._build()

    def _build(self) -> None:
        self.header = QLabel("Press <b>Step</b> to run exactly one training step and see what it computed, "
                             "phase by phase. Each further press runs one more step.")
        self.header.setObjectName("stepHeader")
        self.header.setWordWrap(True)
        self.header.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        bar = QHBoxLayout()
        bar.setContentsMargins(0, 0, 0, 0)
        bar.setSpacing(2)
        self.phase_buttons: dict[str, QPushButton] = {}
        group = QButtonGroup(self)
        group.setExclusive(True)
        for i, key in enumerate(PHASES):
            if i:
                arrow = QLabel("→")
                arrow.setStyleSheet("color: #8a96a3;")
                bar.addWidget(arrow)
            b = QPushButton(TITLES[key])
            b.setObjectName(f"stepPhase_{key}")
            b.setCheckable(True)
            b.setMinimumWidth(40)
            b.clicked.connect(lambda _=False, k=key: self.show_phase(k))
            group.addButton(b)
            bar.addWidget(b, 1)
            self.phase_buttons[key] = b
        self.open_tokens = QPushButton("Per token…")
        self.open_tokens.setToolTip("Open this example in the per-token loss view (probabilities, top guesses, "
                                    "before vs now).")
        self.open_tokens.clicked.connect(self._open_tokens)
        self.open_tokens.setEnabled(False)
        bar.addWidget(self.open_tokens)
        self.explain = QLabel("")
        self.explain.setObjectName("stepExplain")
        self.explain.setWordWrap(True)
        self.explain.setTextFormat(Qt.TextFormat.RichText)
        self.explain.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.stack = QStackedWidget()
        self._build_pages()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(3)
        lay.addWidget(self.header)
        lay.addLayout(bar)
        lay.addWidget(self.explain)
        lay.addWidget(self.stack, 1)
        self.phase_buttons["batch"].setChecked(True)
        for b in self.phase_buttons.values():
            b.setEnabled(False)

    def _build_pages(self) -> None:
        self.batch_box = QWidget()
        self.batch_layout = QVBoxLayout(self.batch_box)
        self.batch_layout.setContentsMargins(2, 2, 2, 2)
        self.batch_layout.setSpacing(4)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self.batch_box)
        self.forward_plot = pg.PlotWidget(background="w")
        fp = self.forward_plot.getPlotItem()
        fp.setMenuEnabled(False)
        fp.hideButtons()
        fp.setMouseEnabled(x=False, y=False)
        fp.showGrid(y=True, alpha=0.2)
        fp.setLabel("left", "RMS of the residual stream")
        fp.setLabel("bottom", "entering layer … / after the last layer")
        for ax in ("left", "bottom"):
            fp.getAxis(ax).enableAutoSIPrefix(False)
        self.forward_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=(31, 95, 168, 190))
        fp.addItem(self.forward_bars)
        self.loss_strip = TokenStrip()
        loss_scroll = QScrollArea()
        loss_scroll.setWidgetResizable(True)
        loss_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        loss_scroll.setWidget(self.loss_strip)
        loss_page = QWidget()
        lp = QVBoxLayout(loss_page)
        lp.setContentsMargins(0, 0, 0, 0)
        lp.setSpacing(2)
        legend = QLabel(legend_html())
        legend.setWordWrap(True)
        legend.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        lp.addWidget(legend)
        lp.addWidget(loss_scroll, 1)
        self.grad_grid = LayerTensorGrid("gradient norm (this step)")
        self.grad_grid.setObjectName("stepGradGrid")
        self.update_grid = LayerTensorGrid("update / weight (this step)")
        self.update_grid.setObjectName("stepUpdateGrid")
        self.pages = {"batch": scroll, "forward": self.forward_plot, "loss": loss_page,
                      "backward": self.grad_grid, "update": self.update_grid}
        for key in PHASES:
            self.stack.addWidget(self.pages[key])

    # ------------------------------------------------------------------ data in
    def show_detail(self, detail, tokenizer) -> None:
        """A StepDetail: the numbers at once, the decoded tokens when the worker has them."""
        self._gen += 1
        gen = self._gen
        self.picture = StepPicture(detail, ())
        self._fill_numbers(detail)
        for b in self.phase_buttons.values():
            b.setEnabled(True)
        if tokenizer is None:
            return
        start_job(self.pool, step_picture, detail, tokenizer,
                  on_result=lambda pic: self._pictured(gen, pic), name="step-tokens")

    def _pictured(self, gen: int, pic: StepPicture) -> None:
        if gen != self._gen:
            return
        self.picture = pic
        self._fill_batch(pic)
        self._fill_loss(pic)
        self.open_tokens.setEnabled(bool(pic.rows))
        self.show_phase(self.phase)

    def _fill_numbers(self, d) -> None:
        B, T = np.asarray(d.input_ids).shape
        self.header.setText(f"<b>Step {d.step}</b> · batch of {B} examples × {T} tokens · loss <b>{d.loss:.4f}</b> "
                            f"· learning rate {d.learning_rate:.2e}. Press <b>Step</b> again for the next one.")
        rms = np.asarray(d.activation_rms, dtype=float)
        self.forward_bars.setOpts(x=np.arange(len(rms)), height=rms, width=0.7)
        fp = self.forward_plot.getPlotItem()
        fp.vb.setRange(xRange=(-0.6, len(rms) - 0.4), yRange=(0, float(rms.max()) * 1.15 if len(rms) else 1),
                       padding=0)
        every = max(1, len(rms) // 10)
        ticks = [(i, str(i)) for i in range(0, len(rms) - 1, every)] + [(len(rms) - 1, "out")]
        fp.getAxis("bottom").setTicks([ticks])
        self.grad_grid.set_values(d.grad_norms)
        self.update_grid.set_values(d.update_ratios)
        self.show_phase(self.phase)

    def _fill_batch(self, pic: StepPicture) -> None:
        while self.batch_layout.count():
            w = self.batch_layout.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        for line, pieces, counted in pic.rows:
            label = QLabel(f"line {line}: {sum(counted)} of {len(pieces)} tokens count toward the loss")
            label.setStyleSheet("color: #44515f;")
            strip = TokenStrip()
            strip.set_tokens([p.text for p in pieces], [p.kind for p in pieces],
                             [0.0 if c else None for c in counted],
                             lambda i, c=counted, ps=pieces: _batch_tip(ps, c, i))
            self.batch_layout.addWidget(label)
            self.batch_layout.addWidget(strip)
        self.batch_layout.addStretch(1)

    def _fill_loss(self, pic: StepPicture) -> None:
        if not pic.rows:
            return
        d = pic.detail
        _, pieces, _ = pic.rows[0]
        losses = [None if (t >= len(d.token_losses) or not np.isfinite(d.token_losses[t])) else
                  float(d.token_losses[t]) for t in range(len(pieces))]
        self.loss_strip.set_tokens([p.text for p in pieces], [p.kind for p in pieces], losses,
                                   lambda i: describe(None, i, losses[i], counted=losses[i] is not None))

    # ------------------------------------------------------------------ phases
    def show_phase(self, key: str) -> None:
        self.phase = key
        self.phase_buttons[key].setChecked(True)
        self.stack.setCurrentWidget(self.pages[key])
        self.explain.setText(self._explanation(key))
        if self.picture is not None:
            self.phaseShown.emit(key)

    def _explanation(self, key: str) -> str:
        pic = self.picture
        if pic is None:
            return ""
        d = pic.detail
        B, T = np.asarray(d.input_ids).shape
        mask, labels = np.asarray(d.attention_mask), np.asarray(d.labels)
        counted = int(((labels[:, 1:] != -100) & (mask[:, 1:] > 0)).sum())
        real = int(mask.sum())
        if key == "batch":
            first = "the pre-trained weights (nothing learned yet)" if d.step == 1 else \
                f"the weights after step {d.step - 1}"
            lines = ", ".join(str(x) for x in d.example_lines[:12]) + (" …" if len(d.example_lines) > 12 else "")
            return (f"The step starts from {first}. It reads <b>{B} examples</b> (lines {html.escape(lines)}): "
                    f"{real} real tokens, {B * T - real} padding. <span style='background:#d6f0d6'>&nbsp;Green&nbsp;"
                    f"</span> tokens ({counted}) are the replies the model learns to write: only they count toward "
                    "the loss. Grey ones (system prompt, questions, chat markup) are context.")
        if key == "forward":
            rms = d.activation_rms
            return (f"<b>Forward</b>: the tokens flow through the {len(rms) - 1} layers; every position predicts "
                    f"the next token. Bars: how big the numbers in the residual stream are (RMS) entering each "
                    f"layer ({rms[0]:.2f} after the embeddings, {rms[-1]:.2f} after the last layer): each layer adds "
                    "its own contribution to the stream.")
        if key == "loss":
            row0 = d.token_losses[np.isfinite(d.token_losses)]
            mean = float(row0.mean()) if row0.size else float("nan")
            return (f"<b>Loss</b>: how surprised the model was by each reply token of the first example (line "
                    f"{d.example_lines[0] if d.example_lines else '?'}): −log p(token). Its mean here is {mean:.3f}; "
                    f"over the whole batch it is <b>{d.loss:.4f}</b>, the number training pushes down.")
        if key == "backward":
            return (f"<b>Backprop</b>: for every trainable tensor, which way to move it to lower the loss. Colour: the "
                    f"size (L2 norm) of that direction, the gradient, per layer and matrix{_others(d.grad_norms)}. "
                    f"Largest: {_largest(d.grad_norms)}.")
        return (f"<b>Update</b>: AdamW moves every trainable tensor a step against its gradient; the learning "
                f"rate of this step, <b>{d.learning_rate:.2e}</b>, sets how far. Colour: how far each weight matrix "
                f"moved relative to its size, ||ΔW|| / ||W||{_others(d.update_ratios)}. Largest: "
                f"{_largest(d.update_ratios)}. Too large a step would wreck what pre-training learned.")

    def _open_tokens(self) -> None:
        if self.picture is not None and self.picture.rows:
            self.openTokens.emit(self.picture.rows[0][0])


def _batch_tip(pieces, counted, i: int) -> str:
    p = pieces[i]
    what = "counts toward the loss (a reply token)" if counted[i] else "context: does not count toward the loss"
    return f"token {i}: {p.raw!r}\n{what}"


def _largest(values: dict) -> str:
    if not values:
        return "–"
    name, v = max(values.items(), key=lambda kv: kv[1])
    lk = split_tensor(name)
    where = f"layer {lk[0]} {kind_label(lk[1])}" if lk else name.replace("model.", "")
    return f"{where} ({v:.2g})"


def _others(values: dict) -> str:
    """Tensors outside the layers (full fine-tuning: embeddings, final norm), in words."""
    rest = [(k, v) for k, v in values.items() if split_tensor(k) is None]
    if not rest:
        return ""
    return "; outside the layers: " + ", ".join(f"{k.replace('model.', '').replace('.weight', '')} {v:.2g}"
                                                 for k, v in rest[:3])

