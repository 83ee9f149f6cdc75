"""Runs in the real window beyond the happy path: an interrupted run shows why and finishes with
one Continue (its Notice in the status bar); a run another process trains is shown as running
elsewhere and cannot be continued, renamed or deleted; File > Export… writes GGUF (q8_0), an HF
folder and the PEFT adapter on workers; Runs > Import… turns a TRL job's output into a run; the
base-model selector lists the local Hugging Face cache (usable ones with their size, the others
greyed out with the reason)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import Qt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_training_helpers import conversations, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "pirate_prompt_completion.jsonl"


def make_run(tiny_model, stop_at: int | None = None) -> Path:
    """A run under the app's runs folder, made by the library (stopped at `stop_at` if given)."""
    from finetune_desktop.gui import bridge
    from finetune_desktop.training.config import TrainConfig
    from finetune_desktop.training.control import TrainControl
    from finetune_desktop.training.events import StepMetrics
    from finetune_desktop.training.session import start_training
    control = TrainControl()

    def on_event(e):
        if stop_at is not None and isinstance(e, StepMetrics) and e.step == stop_at:
            control.stop()
    run_dir = bridge.new_run_dir("earlier")
    start_training(str(DATA), run_dir=run_dir, config=TrainConfig(epochs=2, batch_size=4), base=str(tiny_model),
                   on_event=on_event, control=control)
    return Path(run_dir)


def open_window(qtbot, tiny_model):
    from finetune_desktop.gui import MainWindow
    w = MainWindow(base_model=tiny_model)
    w.confirm_close = False
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.runs.loaded, timeout=10_000)
    return w


def close(w):
    assert w.shutdown(timeout_s=60)
    assert not w.running_threads()
    w.close()


def row_of(w, run_dir) -> int:
    return [r.path for r in w.history.runs].index(str(run_dir))


def test_interrupted_run_continues_with_one_click_and_says_how(qtbot, tiny_model):
    run = make_run(tiny_model, stop_at=3)
    info = json.loads((run / "run.json").read_text())
    info.update(status="running", pid=2 ** 22 + 12345)          # the process died (no lock, pid gone)
    (run / "run.json").write_text(json.dumps(info))
    (run / ".metrics.jsonl.x1y2.tmp").write_text("half-written")  # left by the dead process
    w = open_window(qtbot, tiny_model)
    r = row_of(w, run)
    assert w.history.table.item(r, 2).text() == "⚠ interrupted"
    w.history.table.selectRow(r)
    details = w.history.details.toPlainText()
    assert "interrupted" in details and "step 3" in details and "continue" in details
    assert w.history.continue_button.isEnabled() and w.history.continue_button.text() == "Continue (finish it)"
    messages = []
    w.statusBar().messageChanged.connect(messages.append)
    with qtbot.waitSignal(w.trainingFinished, timeout=120_000):
        qtbot.mouseClick(w.history.continue_button, Qt.MouseButton.LeftButton)   # no question asked
    assert any("half-written" in m for m in messages), messages                  # the run's Notice
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "finished" and after["step"] == after["hyper"]["total_steps"]
    assert not (run / ".metrics.jsonl.x1y2.tmp").exists()
    close(w)


def test_a_run_training_in_another_process_cannot_be_continued_or_deleted(qtbot, tiny_model):
    run = make_run(tiny_model, stop_at=2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from finetune_desktop.training.runs import RunLock\n"
        "lock = RunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"), str(run)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((run / "run.json").read_text())
        info.update(status="running", pid=holder.pid)
        (run / "run.json").write_text(json.dumps(info))
        w = open_window(qtbot, tiny_model)
        r = row_of(w, run)
        assert w.history.table.item(r, 2).text() == "● elsewhere"
        assert f"pid {holder.pid}" in w.history.table.item(r, 2).toolTip()
        w.history.table.selectRow(r)
        h = w.history
        assert not h.continue_button.isEnabled() and not h.delete_button.isEnabled()
        assert not h.rename_button.isEnabled() and h.open_button.isEnabled()
        w.delete_run(str(run), confirm=False)                    # refused, in words
        assert w.error_banner.isVisible() and "cannot be deleted" in w.error_label.text()
        w.continue_run(str(run), 1)
        assert "another process" in w.error_label.text() and not w.is_training()
        qtbot.wait(300)
        assert run.exists() and (run / "run.json").exists()
        close(w)
    finally:
        holder.kill()
        holder.wait(10)


def test_export_gguf_hf_and_adapter_and_import_a_trl_job(qtbot, tiny_model, tmp_path):
    from test_interop_job import fake_job_output

    from finetune_desktop.gui.window_interop import ExportDialog
    from finetune_desktop.interop.trl_job import write_job
    from finetune_desktop.training.config import TrainConfig
    run = make_run(tiny_model)
    w = open_window(qtbot, tiny_model)
    dlg = ExportDialog("earlier", has_adapter=True, parent=w)
    assert dlg.choice() == ("gguf", "q8_0")
    dlg.hf.setChecked(True)
    assert dlg.choice()[0] == "hf" and not dlg.gguf_type.isEnabled()
    dlg.close()
    assert not ExportDialog("full run", has_adapter=False).peft.isEnabled()
    for kind, dest in (("gguf", tmp_path / "out" / "tuned.gguf"), ("hf", tmp_path / "hf"),
                       ("peft", tmp_path / "peft")):
        w.last_export = None
        w.export_run(str(run), kind, str(dest), "q8_0")
        qtbot.waitUntil(lambda: w.last_export is not None or w.error_banner.isVisible(), timeout=60_000)
        assert not w.error_banner.isVisible(), w.error_label.text()
    with open(tmp_path / "out" / "tuned.gguf", "rb") as f:
        assert f.read(4) == b"GGUF"
    assert "q8_0" in w.last_export or (tmp_path / "out" / "Modelfile").exists()
    assert (tmp_path / "out" / "Modelfile").exists()
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "peft" / "adapter_config.json").exists()
    # Runs > Import…: a finished TRL job becomes a run in the history
    data = write_jsonl(tmp_path / "pirate.jsonl", conversations(8))
    job = write_job(data, tmp_path / "job", TrainConfig(epochs=2, batch_size=4, val_split=0.25), str(tiny_model))
    fake_job_output(job.folder, tiny_model)
    w.last_import = None
    w.import_run(str(job.folder))
    qtbot.waitUntil(lambda: w.last_import is not None or w.error_banner.isVisible(), timeout=60_000)
    assert not w.error_banner.isVisible(), w.error_label.text()
    qtbot.waitUntil(lambda: w.last_import in [r.path for r in w.history.runs], timeout=20_000)
    entry = w.runs.entry(w.last_import)
    assert entry.details["trained_by"] == "trl" and entry.info.has_model
    assert w.left_tabs.currentIndex() == 1 and w.history.table.currentRow() == row_of(w, w.last_import)
    close(w)


def test_base_selector_lists_the_hugging_face_cache(qtbot, tiny_model, tmp_path, monkeypatch):
    from test_interop_hf_cache import add_repo, folder_files
    cache = tmp_path / "hub"
    files = folder_files(tiny_model)
    snap = add_repo(cache, "testorg/tiny-chat", files)
    add_repo(cache, "testorg/pickles", {"config.json": files["config.json"], "tokenizer.json": files["tokenizer.json"],
                                        "pytorch_model.bin": b"not really a pickle"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    w = open_window(qtbot, tiny_model)
    box = w.data_panel.base_box
    qtbot.waitUntil(lambda: any("testorg/tiny-chat" in box.itemText(i) for i in range(box.count())), timeout=20_000)
    texts = [box.itemText(i) for i in range(box.count())]
    ok = next(i for i, t in enumerate(texts) if "testorg/tiny-chat" in t)
    bad = next(i for i, t in enumerate(texts) if "testorg/pickles" in t)
    assert " MB)" in texts[ok] or " kB)" in texts[ok]                     # with its size
    assert box.model().item(ok).isEnabled() and not box.model().item(bad).isEnabled()
    assert "pickle" in box.itemData(bad, Qt.ItemDataRole.ToolTipRole)       # the reason, as its tooltip
    box.setCurrentIndex(ok)
    box.activated.emit(ok)
    assert w.base_model_path == str(snap) and w.base_ok()
    close(w)
