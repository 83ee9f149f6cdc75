"""The teaching views in the real window, on a real tiny model and real files: Step runs exactly
one step (the weights equal a normal run's after one step, LoRA and full fine-tuning) and shows
its phases; the per-token loss view shows the engine's losses (Korean included); the overview
of moved matrices is exact; the overfit banner stops with the best checkpoint."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import Qt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_training_helpers import conversations, write_jsonl  # noqa: E402
from gui_helpers import main_window  # noqa: E402
from tinymodel import make_tiny_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pirate_captain.jsonl"
KOREAN = ROOT / "sample_data" / "gyeongsang_ajumma.jsonl"


@pytest.fixture
def window(qtbot, tiny_model):
    with main_window(qtbot, tiny_model, size=(1280, 800), timeout_s=60) as w:
        yield w


def load(qtbot, w, path):
    w.load_data_file(str(path))
    qtbot.waitUntil(lambda: w.drop_zone.property("state") in ("ok", "bad"), timeout=60_000)
    assert w.drop_zone.property("state") == "ok", w.drop_zone.detail.text()


def train_rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip() and "train_loss" in json.loads(x)]


def reference_weights_after_one_step(run_dir, base, data_path):
    """The same run (run.json's settings, data, base) through the library, normally: the weights
    right after its first step."""
    from finetune_desktop.training.config import TrainConfig
    from finetune_desktop.training.events import StepMetrics
    from finetune_desktop.training.session import (estimate_tokens_per_second, fit_config_to_model, load_base_model,
                                                   prepare_data, start_training)
    info = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    cfg = TrainConfig.from_dict(info["settings"])
    model, tok, base_dir = load_base_model(str(base))
    fitted = fit_config_to_model(cfg, model)
    data = prepare_data(data_path, tok, fitted, None, estimate_tokens_per_second(model, fitted.method),
                        base_dir=base_dir)
    got = {}
    from finetune_desktop.training.control import TrainControl
    control = TrainControl()

    def on_event(e):           # a normal run: weights read right after step 1's update, then stopped
        if isinstance(e, StepMetrics) and e.step == 1:
            got.update({k: v.copy() for k, v in model.trainable_params().items()})
            control.stop()
    start_training(data_path, run_dir=Path(run_dir).with_name("reference"), config=cfg, base=str(base),
                   on_event=on_event, control=control, prepared=(model, tok, base_dir, data))
    return got


@pytest.mark.parametrize("method", ["lora", "full"])
def test_step_from_idle_runs_exactly_one_step_like_a_normal_run(window, qtbot, tiny_model, method):
    w = window
    load(qtbot, w, SAMPLE)
    w.data_panel.method.setCurrentIndex(w.data_panel.method.findData(method))
    w.data_panel.epochs.setValue(2)
    w.data_panel.batch.setValue(4)
    step = w.findChild(type(w.run_button), "stepButton")
    assert step.isEnabled()
    qtbot.mouseClick(step, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.training.waiting, timeout=120_000)           # paused after the step
    qtbot.waitUntil(lambda: w.step_view.picture is not None and bool(w.step_view.picture.rows), timeout=30_000)
    run_dir = w.run_dir
    assert [r["step"] for r in train_rows(run_dir)] == [1]                 # exactly one step row
    assert w.pause_button.text() == "Resume" and step.isEnabled()
    # what it computed, phase by phase
    d = w.step_view.picture.detail
    assert d.step == 1 and "Step 1" in w.step_view.header.text()
    assert w.monitor.tabs.currentWidget() is w.step_view
    cfg = json.loads((Path(tiny_model) / "config.json").read_text())
    assert len(w.step_view.forward_bars.opts["height"]) == cfg["num_hidden_layers"] + 1
    for key in ("batch", "forward", "loss", "backward", "update"):
        qtbot.mouseClick(w.step_view.phase_buttons[key], Qt.MouseButton.LeftButton)
        assert w.step_view.stack.currentWidget() is w.step_view.pages[key]
        assert w.step_view.explain.text()
    assert "learning rate" in w.step_view.explain.text() and f"{d.learning_rate:.2e}" in w.step_view.explain.text()
    grads = w.step_view.grad_grid.grid
    assert grads.shape[0] == cfg["num_hidden_layers"] and np.isfinite(grads).sum() >= 7 * cfg["num_hidden_layers"]
    line0, pieces, counted = w.step_view.picture.rows[0]
    assert any(counted) and not all(counted)                               # replies count, the prompt does not
    # the weights after that step equal a normal run's after its first step
    got = w.training.begin_read()
    assert got is not None
    stepped = {k: v.copy() for k, v in got[0].trainable_params().items()}
    w.training.end_read()
    ref = reference_weights_after_one_step(run_dir, tiny_model, str(SAMPLE))
    assert set(ref) == set(stepped)
    for k in ref:
        np.testing.assert_array_equal(stepped[k], ref[k], err_msg=k)
    # one more step from the pause, then stop: the checkpoint holds the step-2 weights
    qtbot.mouseClick(step, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.training.waiting and w.step_view.picture.detail.step == 2, timeout=120_000)
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    got = w.training.begin_read()
    after2 = {k: v.copy() for k, v in got[0].trainable_params().items()}
    w.training.end_read()
    qtbot.mouseClick(w.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.is_training(), timeout=60_000)
    from finetune_desktop.training.runs import latest_checkpoint, load_checkpoint
    saved, _, state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == 2
    for k in after2:
        np.testing.assert_array_equal(saved[k], after2[k], err_msg=k)
    # no general dialogs with this base model: the forgetting meter is absent, not faked
    assert w.loss_panel.chart.general_curve.getData()[1] is None or not len(w.loss_panel.chart.general_curve.getData()[1])
    assert "general ability" not in w.loss_panel.legend_entries


def test_token_loss_view_shows_the_engines_losses_in_korean(window, qtbot, tiny_model):
    from finetune_desktop.engine import Model, Tokenizer
    from finetune_desktop.gui.token_view import LIVE
    from finetune_desktop.training.inspect import token_losses
    w = window
    load(qtbot, w, KOREAN)
    qtbot.waitUntil(lambda: w.token_view.example_box.count() > 0, timeout=30_000)
    # double-click the first example in the data table
    table = w.data_panel.preview
    line = int(table.item(0, 0).text())
    with qtbot.waitSignal(w.token_view.computed, timeout=60_000):
        table.cellDoubleClicked.emit(0, 2)
    assert w.monitor.tabs.currentWidget() is w.token_view
    ex = w.token_view.current_example()
    assert ex.line == line
    pic = w.token_view.now.picture
    model, tok = Model.from_pretrained(tiny_model), Tokenizer.from_pretrained(tiny_model)
    want = token_losses(model, tok, ex.input_ids, ex.labels)
    assert pic is not None and len(pic.losses) == len(want.losses)
    for got_l, want_l in zip(pic.losses, want.losses):
        assert (got_l is None) == (want_l is None)
        if want_l is not None:
            assert got_l == pytest.approx(want_l, rel=1e-6, abs=1e-7)
    loss, counted, _ = model.loss(np.asarray(ex.input_ids)[None], np.asarray(ex.labels)[None])
    assert pic.mean_loss == pytest.approx(loss, rel=1e-5)                  # the engine's loss of this example
    assert f"{loss:.3f}" in w.token_view.now.title.text()
    # the strip shows readable Korean: the pieces put together are the text, no stray bytes
    strip = w.token_view.now.strip
    text = "".join(p.text for p in pic.pieces if p.kind != "part")
    assert text == tok.decode(list(ex.input_ids)) and "\ufffd" not in text
    assert any("\uac00" <= ch <= "\ud7a3" for ch in text)                   # Hangul syllables
    i = next(t for t in range(1, len(pic.losses)) if pic.losses[t] is not None)
    tip = strip.tip(i)
    assert "probability" in tip and "top guesses" in tip and f"{pic.losses[i]:.3f}" in tip
    assert w.token_view.before.picture is not None                          # before vs now, side by side
    # the current weights cannot be chosen before a run of this window
    assert w.token_view.model_box.findData(LIVE) < 0


def test_overview_is_exact_and_measured_only_while_shown(qtbot, tmp_path):
    """ChangeMeter against the full-size matrices, LoRA and full fine-tuning."""
    from finetune_desktop.engine import LoraConfig, Model
    from finetune_desktop.gui.live_model import ChangeMeter, matrix_names
    folder = make_tiny_model_folder(tmp_path / "m", layers=3)
    for lora in (True, False):
        m = Model.from_pretrained(folder)
        if lora:
            m.add_lora(LoraConfig(r=4, alpha=8), seed=0)
        meter = ChangeMeter(m)
        w0 = {n: m.params[n].copy() for n in matrix_names(m.params)}
        rng = np.random.default_rng(1)
        for arr in m.trainable_params().values():
            arr += rng.standard_normal(arr.shape).astype(arr.dtype) * 0.01
        m.weights_changed()
        got = meter.measure()
        merged = m.merged_params()
        assert set(got) == set(w0) and len(got) == 3 * 7
        for n, W0 in w0.items():
            want = np.linalg.norm(merged[n] - W0) / np.linalg.norm(W0)
            assert got[n] == pytest.approx(want, rel=1e-4), n


def test_overfit_banner_stops_and_keeps_the_best_checkpoint(window, qtbot, tmp_path, tiny_model):
    from finetune_desktop.data.types import Conversation, Message
    w = window
    train = write_jsonl(tmp_path / "pirate8.jsonl", conversations(8))
    plain = [Conversation((Message("user", f"Question number {i}, please?"),
                           Message("assistant", "The weather is sunny and warm today.")), i + 1) for i in range(8)]
    valid = write_jsonl(tmp_path / "plain.jsonl", plain)
    load(qtbot, w, train)
    dp = w.data_panel
    dp.epochs.setValue(40)
    dp.batch.setValue(4)
    dp.lr.setCurrentText("3e-2")
    dp.lora_rank.setValue(32)
    dp.lora_alpha.setValue(64)
    dp.seed.setValue(1)
    w.set_validation_file(str(valid))
    banner = w.findChild(type(w.error_banner), "overfitBanner")
    assert not banner.isVisible()
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: banner.isVisible() or not w.is_training(), timeout=300_000)
    assert banner.isVisible(), "no alarm during the run"
    text = w.banners.alarm_label.text()
    assert "Overfitting" in text and "memorising" in text and "validation loss went up" in text
    qtbot.mouseClick(w.banners.keep_best_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.is_training(), timeout=120_000)
    run_dir = Path(w.run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "stopped" and info["final"]["restored_best"]
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if x.strip() and "valid_loss" in json.loads(x)]
    best = min((e for e in evals if e["step"] > 0), key=lambda e: e["valid_loss"])
    from finetune_desktop.data import encode_conversations
    from finetune_desktop.data.batching import make_batches
    from finetune_desktop.engine import Model, Tokenizer
    from finetune_desktop.training.loop import evaluate
    saved = Model.from_pretrained(run_dir / "model")
    tok = Tokenizer.from_pretrained(tiny_model)     # as the run encoded them (model/ adds its system prompt)
    va = encode_conversations(tok, plain, 512)
    vl, _ = evaluate(saved, va, 4, tok.pad_token_id, make_batches)
    assert vl == pytest.approx(best["valid_loss"], abs=1e-4), (vl, best)
    assert not w.banners.keep_best_button.isEnabled()                       # nothing left to stop
