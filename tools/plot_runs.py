"""Draw the loss curves of fine-tuning runs into one PNG (for the README and the model card).

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out docs/loss_curves.png [--size 1200x500]

One panel per run, side by side, titled with the run's training file name (from run.json; the
folder name when run.json has none). Each panel shows, against the training step:
  - the training loss of every step (thin, faint): the raw numbers, noisy because every batch differs;
  - the same loss smoothed with a centred moving average over about a tenth of the steps
    (no lag, unlike an exponential average);
  - in the corner: the first step's training loss -> the mean of the last steps, and the first ->
    last validation loss;
  - the validation loss (dots joined by a line), evaluated during the run and at each epoch end;
  - dotted vertical lines at epoch ends.
Only metrics.jsonl (and run.json for the label) are read. Drawn with QPainter on a QImage
(Qt's offscreen platform; no window, no matplotlib). The PNG is written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from finetune_desktop.training.runs import load_run_metrics  # noqa: E402


class PlotError(Exception):
    """A problem with the inputs, in words."""


@dataclass(frozen=True)
class RunSeries:
    label: str
    steps: tuple[int, ...]           # training steps with a train_loss
    train: tuple[float, ...]
    valid_steps: tuple[int, ...]
    valid: tuple[float, ...]
    epoch_ends: tuple[int, ...]      # steps at which an epoch ended (inside the plotted range)


def load_series(run_dir, label: str | None = None) -> RunSeries:
    """Read a run folder's metrics.jsonl (a cut-off last line is skipped) and its data file name."""
    run_dir = Path(run_dir)
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a run folder?)")
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    epoch_at: dict[int, float] = {}
    metrics = load_run_metrics(run_dir)  # skips blank, cut-off and non-object lines
    for d in metrics.train + metrics.eval:
        if not isinstance(d.get("step"), (int, float)):
            continue
        s = int(d["step"])
        if _finite(d.get("train_loss")):
            train[s] = float(d["train_loss"])        # a resumed run rewrites a step: the last one wins
        if _finite(d.get("valid_loss")):
            valid[s] = float(d["valid_loss"])
        if _finite(d.get("epoch")):
            epoch_at[s] = float(d["epoch"])
    if not train and not valid:
        raise PlotError(f"{p}: no train_loss or valid_loss lines")
    if label is None:
        label = run_dir.name
        try:
            info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
            dp = (info.get("data") or {}).get("path") if isinstance(info, dict) else None
            if dp:
                label = Path(dp).name
        except (OSError, ValueError, AttributeError):
            pass
    steps = sorted(train)
    ends = []
    for s in sorted(epoch_at):
        e = epoch_at[s]
        if s > 0 and abs(e - round(e)) < 1e-6 and round(e) >= 1:
            ends.append(s)
    last = max(list(train) + list(valid))
    ends = sorted(set(s for s in ends if s < last))
    vs = sorted(valid)
    return RunSeries(label, tuple(steps), tuple(train[s] for s in steps), tuple(vs), tuple(valid[s] for s in vs),
                     tuple(ends))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def moving_average(y, window: int) -> list[float]:
    """Centred moving average; near the ends the window is cut off (only real points are averaged,
    no padding), so the curve does not lag behind the raw loss."""
    n = len(y)
    h = max(0, window // 2)
    out = []
    for i in range(n):
        seg = y[max(0, i - h): i + h + 1]
        out.append(sum(seg) / len(seg))
    return out


def smoothing_window(n: int) -> int:
    w = max(3, int(round(n / 10)))
    return w | 1  # odd


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    t = math.ceil(lo / step - 1e-9) * step
    out = []
    while t <= hi + 1e-9 * step:
        out.append(round(t, 10))
        t += step
    return out


def _fmt_tick(v: float) -> str:
    if abs(v - round(v)) < 1e-9:
        return f"{int(round(v))}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _ensure_gui_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    # a QApplication (not just a QGuiApplication): the instance is process-wide, and widgets made
    # later in the same process (the app, or tests run after this one) need the widget kind
    app = QApplication.instance()
    if app is None:
        app = QApplication(["plot_runs"])
    return app


TRAIN_RAW = (31, 119, 180, 85)     # blue, faint
TRAIN_SMOOTH = (31, 119, 180, 255)
VALID = (230, 110, 20, 255)        # orange
GRID = (225, 225, 225, 255)
AXIS = (90, 90, 90, 255)
TEXT = (30, 30, 30, 255)


def render(series: list[RunSeries], width: int = 1200, height: int = 500, title: str | None = None):
    """Draw the panels and return a QImage."""
    _ensure_gui_app()
    from PySide6.QtCore import QPointF, QRectF, Qt
    from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPainterPath, QPen

    img = QImage(width, height, QImage.Format.Format_ARGB32)
    img.fill(QColor(255, 255, 255))
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    p.setRenderHint(QPainter.RenderHint.TextAntialiasing, True)
    scale = height / 500.0
    f_title, f_label, f_tick = QFont(), QFont(), QFont()
    f_title.setPixelSize(max(10, int(19 * scale)))
    f_title.setBold(True)
    f_label.setPixelSize(max(9, int(15 * scale)))
    f_tick.setPixelSize(max(8, int(13 * scale)))

    top_band = int(34 * scale) if title else 0
    legend_h = int(30 * scale)
    if title:
        p.setFont(f_title)
        p.setPen(QColor(*TEXT))
        p.drawText(QRectF(0, 4 * scale, width, top_band), Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, title)

    n = max(1, len(series))
    pw = width / n
    for i, s in enumerate(series):
        _draw_panel(p, s, QRectF(i * pw, top_band, pw, height - top_band - legend_h), scale, f_title, f_label, f_tick,
                    QPointF, QRectF, Qt, QColor, QPainterPath, QPen)

    # legend (shared), bottom centre
    p.setFont(f_label)
    items = [("training loss, each step", TRAIN_RAW, 1.5, False),
             ("training loss, smoothed", TRAIN_SMOOTH, 3.0, False),
             ("validation loss", VALID, 2.5, True)]
    fm = p.fontMetrics()
    sw = 34 * scale
    gap = 28 * scale
    total = sum(sw + 8 * scale + fm.horizontalAdvance(t) for t, *_ in items) + gap * (len(items) - 1)
    x = (width - total) / 2
    y = height - legend_h / 2
    for text, color, wline, dots in items:
        pen = QPen(QColor(*color))
        pen.setWidthF(wline * scale)
        p.setPen(pen)
        p.drawLine(QPointF(x, y), QPointF(x + sw, y))
        if dots:
            p.setBrush(QColor(*color))
            p.drawEllipse(QPointF(x + sw / 2, y), 4.5 * scale, 4.5 * scale)
            p.setBrush(Qt.BrushStyle.NoBrush)
        p.setPen(QColor(*TEXT))
        p.drawText(QPointF(x + sw + 8 * scale, y + fm.ascent() / 2 - 1), text)
        x += sw + 8 * scale + fm.horizontalAdvance(text) + gap
    p.end()
    return img


def _draw_panel(p, s: RunSeries, box, scale, f_title, f_label, f_tick, QPointF, QRectF, Qt, QColor, QPainterPath, QPen):
    ml, mr, mt, mb = 64 * scale, 18 * scale, 40 * scale, 46 * scale
    plot = QRectF(box.left() + ml, box.top() + mt, box.width() - ml - mr, box.height() - mt - mb)
    p.setFont(f_title)
    p.setPen(QColor(*TEXT))
    p.drawText(QRectF(box.left() + ml, box.top() + 6 * scale, plot.width(), mt - 8 * scale),
               Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter, s.label)

    ys = list(s.train) + list(s.valid)
    xs = list(s.steps) + list(s.valid_steps)
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    x0 = min(x0, 1) if x0 >= 0 else x0
    if x1 <= x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.06 or 0.1
    y0, y1 = max(0.0, y0 - pad), y1 + pad

    def X(v):
        return plot.left() + (v - x0) / (x1 - x0) * plot.width()

    def Y(v):
        return plot.bottom() - (v - y0) / (y1 - y0) * plot.height()

    # grid + ticks
    p.setFont(f_tick)
    fm = p.fontMetrics()
    for t in nice_ticks(y0, y1, 5):
        if t < y0 - 1e-12 or t > y1 + 1e-12:
            continue
        p.setPen(QPen(QColor(*GRID), 1))
        p.drawLine(QPointF(plot.left(), Y(t)), QPointF(plot.right(), Y(t)))
        p.setPen(QColor(*AXIS))
        txt = _fmt_tick(t)
        p.drawText(QPointF(plot.left() - 8 * scale - fm.horizontalAdvance(txt), Y(t) + fm.ascent() / 2 - 1), txt)
    for t in nice_ticks(x0, x1, 6):
        if t < x0 or t > x1:
            continue
        p.setPen(QPen(QColor(*GRID), 1))
        p.drawLine(QPointF(X(t), plot.top()), QPointF(X(t), plot.bottom()))
        p.setPen(QColor(*AXIS))
        txt = _fmt_tick(t)
        p.drawText(QPointF(X(t) - fm.horizontalAdvance(txt) / 2, plot.bottom() + 6 * scale + fm.ascent()), txt)
    # epoch ends
    pen = QPen(QColor(150, 150, 150))
    pen.setStyle(Qt.PenStyle.DotLine)
    pen.setWidthF(1.2 * scale)
    for k, e in enumerate(s.epoch_ends, 1):
        p.setPen(pen)
        p.drawLine(QPointF(X(e), plot.top()), QPointF(X(e), plot.bottom()))
        if len(s.epoch_ends) <= 8:
            p.setPen(QColor(130, 130, 130))
            txt = f"epoch {k}"
            p.drawText(QPointF(X(e) - fm.horizontalAdvance(txt) - 4 * scale, plot.top() + fm.ascent() + 2), txt)
    # axes
    p.setPen(QPen(QColor(*AXIS), 1.2 * scale))
    p.drawLine(plot.bottomLeft(), plot.bottomRight())
    p.drawLine(plot.bottomLeft(), plot.topLeft())
    p.setFont(f_label)
    p.setPen(QColor(*TEXT))
    fm = p.fontMetrics()
    p.drawText(QRectF(plot.left(), plot.bottom() + 22 * scale, plot.width(), mb - 22 * scale),
               Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, "training step")
    p.save()
    p.translate(box.left() + 4 * scale + fm.ascent(), plot.center().y())
    p.rotate(-90)
    p.drawText(QPointF(-fm.horizontalAdvance("loss") / 2, 0), "loss")
    p.restore()

    p.setClipRect(plot.adjusted(-6, -6, 6, 6))

    def polyline(xv, yv, color, width):
        if len(xv) < 2:
            return
        path = QPainterPath(QPointF(X(xv[0]), Y(yv[0])))
        for a, b in zip(xv[1:], yv[1:]):
            path.lineTo(QPointF(X(a), Y(b)))
        pen = QPen(QColor(*color))
        pen.setWidthF(width * scale)
        pen.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
        p.setPen(pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawPath(path)

    polyline(s.steps, s.train, TRAIN_RAW, 1.5)
    if len(s.train) >= 3:
        polyline(s.steps, moving_average(list(s.train), smoothing_window(len(s.train))), TRAIN_SMOOTH, 3.0)
    polyline(s.valid_steps, s.valid, VALID, 2.5)
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QColor(*VALID))
    for a, b in zip(s.valid_steps, s.valid):
        p.drawEllipse(QPointF(X(a), Y(b)), 4.5 * scale, 4.5 * scale)
    p.setBrush(Qt.BrushStyle.NoBrush)
    p.setClipping(False)
    # first -> last numbers, top right (the curves fall from the top left)
    p.setFont(f_tick)
    fm = p.fontMetrics()
    lines = []
    if s.train:
        w = min(len(s.train), smoothing_window(len(s.train)))
        tail = s.train[-w:]
        lines.append(f"train {s.train[0]:.2f} → {sum(tail) / len(tail):.2f} (last {w} steps)")
    if s.valid:
        lines.append(f"validation {s.valid[0]:.2f} → {s.valid[-1]:.2f}")
    p.setPen(QColor(*TEXT))
    yy = plot.top() + (fm.ascent() + 4) * (2 if s.epoch_ends else 1) + 4 * scale
    for ln in lines:
        p.drawText(QPointF(plot.right() - fm.horizontalAdvance(ln) - 8 * scale, yy), ln)
        yy += fm.height() + 2


def save_png(img, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")
    if not img.save(str(tmp), "PNG"):
        raise PlotError(f"{out}: could not write the PNG")
    os.replace(tmp, out)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1200x500, got {text!r}") from None
    if not (200 <= w <= 8000 and 150 <= h <= 8000):
        raise argparse.ArgumentTypeError(f"size {w}x{h} is out of range")
    return w, h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--size", type=_size, default=(1200, 500), help="WIDTHxHEIGHT in pixels (default 1200x500)")
    ap.add_argument("--title", help="a title above the panels")
    ap.add_argument("--labels", help="comma-separated panel titles, one per run (default: the data file names)")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        print(f"error: --labels has {len(labels)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        series = [load_series(r, lab) for r, lab in zip(args.runs, labels)]
        img = render(series, *args.size, title=args.title)
        save_png(img, Path(args.out))
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.size[0]}x{args.size[1]}, {len(series)} run{'s' if len(series) != 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
