"""Run history after a restart: a run made earlier (by the same training code the CLI uses) is
listed, reopened with its charts, chatted with (model and checkpoint), renamed, overlaid,
exported and deleted."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).parent))
from gui_helpers import main_window  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "pirate_prompt_completion.jsonl"


@pytest.fixture
def earlier_run(tiny_model):
    """A finished LoRA run under $FINETUNE_DESKTOP_HOME/runs, as an earlier session left it."""
    from finetune_desktop.gui import bridge
    from finetune_desktop.training.config import TrainConfig
    from finetune_desktop.training.session import start_training
    run_dir = bridge.new_run_dir("earlier")
    res = start_training(str(DATA), run_dir=run_dir, config=TrainConfig(epochs=2, batch_size=4, val_split=0.2),
                         base=str(tiny_model))
    assert res.status == "finished"
    return Path(run_dir)


@pytest.fixture
def window(qtbot, tiny_model, earlier_run):
    with main_window(qtbot, tiny_model) as w:
        qtbot.waitUntil(lambda: w.runs.loaded, timeout=10_000)   # runs are listed on a worker
        yield w


def test_reopen_rename_overlay_chat_export_delete(window, qtbot, earlier_run, tiny_model, tmp_path):
    w = window
    paths = [r.path for r in w.history.runs]
    assert str(earlier_run) in paths
    # reopen: the chart shows the saved curve, the chat talks to that run's model
    w.open_run(str(earlier_run))
    qtbot.waitUntil(lambda: w.loss_chart.point_count() > 0, timeout=10_000)
    assert w.loss_panel.evals.n > 0
    assert w.chat.current_spec() == str(earlier_run / "model")
    # the selector also offers the base model and the run's checkpoint
    specs = [w.chat.model_selector.itemData(i) for i in range(w.chat.model_selector.count())]
    ckpt = [s for s in specs if str(s).startswith("checkpoint::")]
    assert str(tiny_model) in specs and ckpt
    # chat with the checkpoint (base model + the checkpoint's LoRA tensors)
    w.chat.select_model(ckpt[0])
    w.chat.max_new.setValue(5)
    w.chat.temperature.setValue(1.0)
    w.chat.seed.setValue(0)
    with qtbot.waitSignal(w.replyFinished, timeout=30_000):
        assert w.chat.send("Ahoy?")
    qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=10_000)
    assert not w.error_banner.isVisible(), w.error_label.text()
    qtbot.waitUntil(lambda: (earlier_run / "chats.jsonl").exists()
                    and (earlier_run / "chats.jsonl").read_text(encoding="utf-8").endswith("\n"), timeout=10_000)
    saved = (earlier_run / "chats.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(saved[-1])["user"] == "Ahoy?"
    # rename (kept in run.json; the folder stays where it is)
    from finetune_desktop.gui import bridge
    bridge.set_run_title(str(earlier_run), "Pirate v1")
    w.refresh_runs()
    qtbot.waitUntil(lambda: w.history.table.item(0, 1).text() == "Pirate v1", timeout=10_000)
    # overlay its curve for comparison
    w.history.table.item(0, 0).setCheckState(w.history.table.item(0, 0).checkState().Checked)
    qtbot.waitUntil(lambda: "Pirate v1" in w.loss_chart.overlays, timeout=10_000)
    # export the merged model and the PEFT adapter (worker threads, atomic copies)
    w.export_model(str(earlier_run), adapter=False, dest=str(tmp_path / "exported-model"))
    w.export_model(str(earlier_run), adapter=True, dest=str(tmp_path / "exported-adapter"))
    qtbot.waitUntil(lambda: (tmp_path / "exported-model" / "config.json").exists()
                    and (tmp_path / "exported-adapter" / "adapter_config.json").exists(), timeout=20_000)
    qtbot.waitUntil(lambda: not w.running_threads(), timeout=10_000)
    from finetune_desktop.engine import Model
    Model.from_pretrained(tmp_path / "exported-model")
    # delete
    w.delete_run(str(earlier_run), confirm=False)
    qtbot.waitUntil(lambda: str(earlier_run) not in [r.path for r in w.history.runs], timeout=10_000)
    assert not earlier_run.exists()
    assert all(not str(w.chat.model_selector.itemData(i)).startswith(f"checkpoint::{earlier_run}")
               for i in range(w.chat.model_selector.count()))


def test_previous_run_as_base_model(window, earlier_run):
    w = window
    box = w.data_panel.base_box
    specs = [box.itemData(i) for i in range(box.count())]
    assert str(earlier_run / "model") in specs
    i = specs.index(str(earlier_run / "model"))
    box.setCurrentIndex(i)
    box.activated.emit(i)                    # what choosing it with the mouse sends
    assert w.base_model_path == str(earlier_run / "model")
    assert w.base_ok()
    assert not w.banner.isVisible()


def test_continue_a_finished_run_for_one_more_epoch(window, qtbot, earlier_run):
    w = window
    before = json.loads((earlier_run / "run.json").read_text())["hyper"]["total_steps"]
    with qtbot.waitSignal(w.trainingFinished, timeout=60_000) as done:
        w.continue_run(str(earlier_run), extra_epochs=1)
    assert done.args[0] == str(earlier_run)
    qtbot.waitUntil(lambda: not w.running_threads(), timeout=10_000)
    info = json.loads((earlier_run / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["hyper"]["total_steps"] > before
    steps = w.loss_panel.steps.view("step")
    assert steps[0] == 1 and steps[-1] == info["hyper"]["total_steps"]   # old and new steps on one chart
