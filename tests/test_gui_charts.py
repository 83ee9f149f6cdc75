"""How the live charts redraw: while a run's range is known the loss chart's view does not
move per point (no auto-range, no axis tick regeneration), the LR strip has two ticks, the
weights view draws at most a few times a second and not when it is hidden. No timings."""
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).parent))


def _steps(start, n, total, loss0=3.0):
    from finetune_desktop.training.events import PhaseTimes, StepMetrics
    ph = PhaseTimes(1.0, 0.2, 2.0, 0.5)
    return [StepMetrics(step=s, epoch=s / 50, train_loss=loss0 * np.exp(-s / 80), train_token_accuracy=0.4,
                        lr=1e-3 * min(1.0, s / 10), grad_norm=1.0, tokens_per_s=500.0, elapsed_s=s * 0.1,
                        eta_s=1.0, total_steps=total, phases=ph) for s in range(start, start + n)]


class _Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)


def test_loss_chart_keeps_its_view_while_a_run_draws(qtbot):
    from finetune_desktop.gui.loss_chart import LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    p.resize(900, 500)
    p.show()
    qtbot.waitExposed(p)
    p.begin_run(total_steps=200, peak_lr=1e-3)
    p.add_steps(_steps(1, 5, 200))
    p.redraw()
    p.grab()
    vb = p.chart.getPlotItem().vb
    axis = p.chart.getPlotItem().getAxis("left")
    specs = _Counter(axis.generateDrawSpecs)
    axis.generateDrawSpecs = specs              # counts tick-label layouts of the loss axis
    first = vb.viewRange()
    moves = p.chart.view_fit.changes
    for k in range(10):                         # ten timer redraws, each with new points
        p.add_steps(_steps(6 + 10 * k, 10, 200))
        p.redraw()
        p.grab()                                # paint
        assert vb.viewRange()[0] == first[0]    # x: the whole run, all along
    moved = p.chart.view_fit.changes - moves
    assert vb.state["autoRange"] == [False, False]
    assert moved <= 2, "the view followed the falling loss point by point"
    assert specs.n <= moved, "the loss axis relaid out its tick labels while the view did not move"
    assert first[0] == [0.0, 200.0]
    lo, hi = vb.viewRange()[1]
    assert 0 <= lo <= p.steps.view("loss").min() and hi >= p.steps.view("loss").max()
    assert p.chart.point_count() == 105
    # a loss above the view grows it once (with headroom), then it is stable again
    spike = _steps(106, 1, 200, loss0=30.0)
    p.add_steps(spike)
    p.redraw()
    assert vb.viewRange()[1][1] > spike[0].train_loss
    grown = p.chart.view_fit.changes
    p.add_steps(_steps(107, 3, 200))
    p.redraw()
    assert p.chart.view_fit.changes == grown


def test_lr_strip_has_two_ticks(qtbot):
    from finetune_desktop.gui.loss_chart import LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    p.resize(1000, 400)
    p.show()
    qtbot.waitExposed(p)
    p.begin_run(total_steps=50, peak_lr=2e-4)
    qtbot.wait(50)
    from PySide6.QtGui import QImage, QPainter
    ax = p.lr_chart.getPlotItem().getAxis("left")

    def labels():
        img = QImage(200, 200, QImage.Format.Format_ARGB32)
        painter = QPainter(img)
        try:
            specs = ax.generateDrawSpecs(painter)      # what the axis would draw
        finally:
            painter.end()
        return [t[2] for t in specs[2]] if specs else []
    qtbot.waitUntil(lambda: bool(labels()), timeout=5_000)   # laid out
    texts = [(None, None, t) for t in labels()]
    assert [t[2] for t in texts] == ["0", "2e-04"]


def test_weights_view_draws_a_few_times_a_second_and_not_when_hidden(qtbot, tmp_path):
    from tinymodel import make_tiny_model_folder

    from finetune_desktop.engine import LoraConfig, Model
    from finetune_desktop.gui import weights_view as wv
    from finetune_desktop.training.snapshots import SnapshotMaker
    m = Model.from_pretrained(make_tiny_model_folder(tmp_path / "m"))
    m.add_lora(LoraConfig(r=4, alpha=8), seed=0)
    snap = SnapshotMaker(m).build(1, None, {})
    v = wv.WeightsView()
    qtbot.addWidget(v)
    v.resize(700, 350)
    v.show()
    qtbot.waitExposed(v)
    drawn = []
    v.snapshotDrawn.connect(drawn.append)
    # snapshots arrive 10 times faster than the view may draw them: it keeps only the latest
    for _ in range(12):
        v.add_snapshot(snap)
        qtbot.wait(int(wv.DRAW_INTERVAL_S * 100))
    qtbot.wait(int(wv.DRAW_INTERVAL_S * 1000) + 3 * wv.TICK_MS + 100)
    assert 1 <= len(drawn) <= 12 * 0.1 / wv.DRAW_INTERVAL_S + 2
    v.hide()
    n = len(drawn)
    v.add_snapshot(snap)
    qtbot.wait(int(wv.DRAW_INTERVAL_S * 1000) + 4 * wv.TICK_MS)
    assert len(drawn) == n, "a hidden view drew"
    v.show()
    qtbot.waitUntil(lambda: len(drawn) > n, timeout=5_000)   # drawn once it is visible again
    assert v.hist_plot.vb.state["autoRange"] == [False, False]


def test_lr_strip_follows_at_most_once_a_second_and_catches_up_at_the_end(qtbot):
    from finetune_desktop.gui.loss_chart import LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    p.show()
    p.begin_run(total_steps=100, peak_lr=1e-3)
    p.add_steps(_steps(1, 10, 100))
    p.redraw(live=True)
    drawn = len(p.lr_curve.getData()[0])
    assert drawn == 10
    p.add_steps(_steps(11, 10, 100))
    p.redraw(live=True)                           # right after: the loss follows, the LR strip not yet
    assert p.chart.point_count() == 20
    assert len(p.lr_curve.getData()[0]) == drawn
    p.redraw()                                    # a pause or the end: everything
    assert len(p.lr_curve.getData()[0]) == 20
