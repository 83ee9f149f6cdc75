"""The monitor widgets on their own: the loss chart (100k points, export), the weights view
(real snapshots from the training package's SnapshotMaker on a tiny model), the phase strip."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).parent))


def _steps(n, start=1, spe=1000):
    from finetune_desktop.training.events import PhaseTimes, StepMetrics
    ph = PhaseTimes(1.0, 0.2, 2.0, 0.5)
    rng = np.random.default_rng(0)
    loss = 3.0 * np.exp(-np.arange(start, start + n) / 20000) + 0.1 * rng.random(n)
    return [StepMetrics(step=s, epoch=s / spe, train_loss=float(l), train_token_accuracy=0.5, lr=1e-3,
                        grad_norm=1.0, tokens_per_s=1000.0, elapsed_s=s * 0.01, eta_s=1.0, total_steps=start + n,
                        phases=ph) for s, l in zip(range(start, start + n), loss)]


def test_loss_chart_100k_points_stays_fast_and_exports(qtbot, tmp_path):
    from finetune_desktop.gui.loss_chart import LossPanel
    from finetune_desktop.training.events import EvalMetrics
    p = LossPanel()
    qtbot.addWidget(p)
    p.resize(800, 400)
    p.show()
    batch = _steps(100_000)
    for i in range(0, len(batch), 5000):      # arrives in coalesced batches, like from the worker
        p.add_steps(batch[i:i + 5000])
    p.add_eval(EvalMetrics(step=50_000, epoch=50.0, valid_loss=1.5, valid_token_accuracy=0.6))
    p.redraw()
    qtbot.wait(1)
    assert p.chart.point_count() == 100_000
    assert len(p.chart.epoch_lines) == 100                 # an epoch boundary every 1000 steps
    # adding more points and redrawing (what the 10 fps timer does); how fast it is, is measured by
    # bench/gui_latency.py, not asserted here
    for k in range(3):
        p.add_steps(_steps(100, start=100_001 + 100 * k))
        p.redraw()
    # smoothing is an EMA: smoother than the raw values
    raw, sm = p.steps.view("loss"), p.steps.view("smooth")
    assert np.std(np.diff(sm)) < np.std(np.diff(raw))
    assert "validation 1.5000" in p.describe_step(int(np.searchsorted(p.steps.view("step"), 50_000)))
    # export
    p.export_csv(str(tmp_path / "loss.csv"))
    rows = list(csv.reader(open(tmp_path / "loss.csv", encoding="utf-8")))
    assert rows[0][:4] == ["kind", "step", "epoch", "train_loss"]
    assert len(rows) == 1 + 100_300 + 1
    p.export_png(str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_loss_chart_loads_saved_rows_and_overlays(qtbot):
    from finetune_desktop.gui.loss_chart import LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    rows = [{"step": i, "epoch": i / 10, "train_loss": 2.0 / i, "train_token_accuracy": 0.1, "lr": 1e-3,
             "grad_norm": 1.0, "tokens_per_s": 10.0} for i in range(1, 31)]
    rows += [{"step": 10, "epoch": 1.0, "valid_loss": 0.5, "valid_token_accuracy": 0.7}]
    p.load_rows(rows)
    assert p.chart.point_count() == 30
    assert p.evals.n == 1
    assert len(p.chart.epoch_lines) == 3
    p.add_overlay("other run", rows)
    assert "other run" in p.chart.overlays
    p.remove_overlay("other run")
    assert not p.chart.overlays


def test_epoch_labels_stay_apart_after_the_window_narrows(qtbot):
    """12 epochs of 8 steps drawn wide, then the chart narrows: the visible labels thin out so
    that neighbours stay at least EPOCH_LABEL_PX apart on screen (they overlapped before)."""
    import pyqtgraph as pg
    from finetune_desktop.gui.loss_chart import EPOCH_LABEL_PX, LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    p.resize(1400, 400)
    p.show()
    rows = [{"step": i, "epoch": i / 8, "train_loss": 2.0 / i, "train_token_accuracy": 0.1, "lr": 1e-3,
             "grad_norm": 1.0, "tokens_per_s": 10.0} for i in range(1, 97)]
    p.load_rows(rows)
    p.redraw()

    def shown_px():
        vb = p.chart.getPlotItem().vb
        xs = [vb.mapViewToScene(pg.Point(line.value(), 0)).x() for line in p.chart.epoch_lines
              if line.label.isVisible()]
        return xs

    qtbot.wait(20)
    wide = shown_px()
    p.resize(520, 400)
    qtbot.waitUntil(lambda: p.chart.getPlotItem().vb.width() < 500)
    qtbot.wait(20)
    narrow = shown_px()
    assert len(wide) > len(narrow) >= 1
    assert min(b - a for a, b in zip(narrow, narrow[1:])) >= EPOCH_LABEL_PX - 1, narrow


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Real WeightSnapshots: a tiny model with LoRA, a few real AdamW updates."""
    from tinymodel import make_tiny_model_folder

    from finetune_desktop.engine import LoraConfig, Model
    from finetune_desktop.engine.optim import AdamWConfig, adamw_init, adamw_step
    from finetune_desktop.training.snapshots import SnapshotMaker
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "m")
    m = Model.from_pretrained(folder)
    m.add_lora(LoraConfig(r=4, alpha=8), seed=0)
    maker = SnapshotMaker(m)
    opt = adamw_init(m.trainable_params())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, size=(2, 12))
    out = [maker.build(0, None, {})]
    for step in range(1, 4):
        before = maker.before_update()
        loss, grads = m.loss_and_grads(ids, ids)
        adamw_step(m.trainable_params(), grads, opt, 1e-2, AdamWConfig())
        out.append(maker.build(step, before, maker.grad_norms(grads)))
    return out


def test_weights_view_draws_real_snapshots(qtbot, snapshots):
    from finetune_desktop.gui import weights_view as wv
    v = wv.WeightsView()
    qtbot.addWidget(v)
    v.resize(700, 350)
    v.show()
    for s in snapshots:
        v.add_snapshot(s)
    assert v.snapshot_count == len(snapshots)
    assert v.layer_box.count() == 2 and v.proj_box.count() == 7
    v.select("layer 1", "v_proj")
    v._draw()
    name = v.chosen_name()
    assert name == "model.layers.1.self_attn.v_proj.weight"
    img = v.image.image
    assert img.shape == snapshots[-1].matrices[name].shape
    assert np.abs(img).max() > 0                        # LoRA moved away from zero
    lo, hi = v.image.getLevels()
    assert lo == -hi and hi > 0                        # symmetric levels ...
    p99 = float(np.percentile(np.abs(img), 99))
    assert hi == pytest.approx(p99 * wv.LEVEL_HEADROOM, rel=1e-5)   # ... from the 99th percentile, not the peak
    assert np.mean(np.abs(img) > hi) <= 0.01           # (almost) nothing saturates
    # the scale does not shrink when a smaller change arrives (growth stays visible) ...
    v.add_snapshot(snapshots[1])
    v._draw()
    assert v.image.getLevels()[1] == hi
    # ... and Rescale fits it to what is shown now
    v.rescale()
    assert v.image.getLevels()[1] == pytest.approx(float(np.percentile(np.abs(snapshots[1].matrices[name]), 99)),
                                                   rel=1e-5)
    # where the change concentrates: RMS of every row and column of the shown matrix
    shown = snapshots[1].matrices[name]
    np.testing.assert_allclose(v.row_bars.opts["width"], np.sqrt(np.mean(shown.astype(float) ** 2, axis=1)), rtol=1e-6)
    np.testing.assert_allclose(v.col_bars.opts["height"], np.sqrt(np.mean(shown.astype(float) ** 2, axis=0)), rtol=1e-6)
    assert "(α/r)·B·A" in v.heat_plot.titleLabel.text   # LoRA: the effective change the adapter adds
    # current values mode
    v.mode_now.setChecked(True)
    v._draw()
    assert np.allclose(v.image.image, snapshots[1].current[name])
    # bias now vs pre-trained, histogram
    x, y = v.bias_now.getData()
    assert x is not None and len(x) > 0
    hx, hy = v.hist_curve.getData()
    assert hy is not None and hy.sum() > 0


def test_phase_strip(qtbot):
    from finetune_desktop.gui.phase_strip import PhaseStrip
    from finetune_desktop.training.events import PhaseTimes
    s = PhaseStrip()
    qtbot.addWidget(s)
    s.set_base("loaded: tiny")
    s.set_times(PhaseTimes(12.5, 1.25, 30.0, 4.0))
    assert s.boxes["forward"][2].text() == "12 ms" or s.boxes["forward"][2].text() == "13 ms"
    assert s.boxes["loss"][2].text() == "1.2 ms" or s.boxes["loss"][2].text() == "1.3 ms"
    s.set_active("backward")
    s._tick()
    assert s._active == "backward"
    from finetune_desktop.gui import phase_strip as ps
    assert s.boxes["backward"][0].colour == ps._ACTIVE
    assert s.boxes["forward"][0].colour == ps._DONE
    assert s.boxes["update"][0].colour == ps._IDLE
