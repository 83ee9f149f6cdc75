"""The GUI's workers and controllers on real files and the real tiny model: steps are flushed
when a pause starts and when a run ends; validation, run listing and chat-log writes happen on
worker threads; the chat log is appended (never rewritten) and survives a torn last line; the
model cache evicts by whole path components; a checkpoint that does not fit its base model is a
clear error."""
import json
import os
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).parent))
from gui_helpers import main_window  # noqa: E402
from tinymodel import make_tiny_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pirate_captain.jsonl"
VALID = ROOT / "sample_data" / "pirate_captain_valid.jsonl"
SMALL = ROOT / "sample_data" / "pirate_prompt_completion.jsonl"


@pytest.fixture
def window(qtbot, tiny_model):
    with main_window(qtbot, tiny_model) as w:
        yield w


def _threads_of(monkeypatch, module, name):
    """Wrap module.name so every call records whether it ran on the GUI (main) thread."""
    seen = []
    real = getattr(module, name)

    def spy(*a, **kw):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(*a, **kw)
    monkeypatch.setattr(module, name, spy)
    return seen


# ----------------------------------------------------------------------------- TrainWorker flushes
@pytest.fixture
def train_worker(tiny_model, tmp_path):
    """A TrainWorker on the real loop whose time-based flush never fires (1 hour), so steps only
    reach the GUI thread when the worker flushes for a non-step event. Stopped and joined after."""
    pool, worker, control, received = _make_worker(tiny_model, tmp_path)
    yield pool, worker, control, received
    control.stop()
    assert pool.join(60)


def _make_worker(tiny_model, tmp_path, epochs=1):
    from finetune_desktop.gui import bridge
    from finetune_desktop.gui.workers import ThreadPool, TrainWorker
    fn = bridge.make_train_fn(str(SAMPLE), str(tmp_path / "run"), str(tiny_model),
                              dict(epochs=epochs, batch_size=8, max_seq_len=96), None)
    control = bridge.make_control()
    worker = TrainWorker(fn, control, flush_interval_s=3600.0)
    received = []
    worker.stepsReady.connect(lambda steps: received.extend(m.step for m in steps))
    pool = ThreadPool()
    return pool, worker, control, received


def test_steps_are_flushed_when_a_pause_starts_and_when_the_run_ends(qtbot, train_worker, tmp_path):
    pool, worker, control, received = train_worker
    at_pause, at_end = [], []
    worker.paused.connect(lambda e: at_pause.append((e.step, list(received))))
    worker.runEnded.connect(lambda e: at_end.append((e.step, list(received))))
    pool.start(worker, "train")
    metrics = tmp_path / "run" / "metrics.jsonl"       # the loop writes a line per step

    def steps_done():
        try:
            return len(metrics.read_text(encoding="utf-8").splitlines())
        except OSError:
            return 0
    qtbot.waitUntil(lambda: steps_done() >= 3, timeout=60_000)
    control.pause()
    qtbot.waitUntil(lambda: bool(at_pause), timeout=60_000)
    step, seen = at_pause[0]
    assert step >= 3
    assert seen == list(range(1, step + 1)), "steps before the pause were still buffered"
    control.resume()
    qtbot.waitUntil(lambda: steps_done() >= step + 2, timeout=60_000)
    control.stop()
    qtbot.waitUntil(lambda: bool(at_end), timeout=60_000)
    assert pool.join(30)
    step, seen = at_end[0]
    assert seen == list(range(1, step + 1)), "steps before the end were still buffered"


# ----------------------------------------------------------------------------- file work off the GUI thread
def test_validation_and_run_listing_run_on_worker_threads(window, qtbot, monkeypatch):
    from finetune_desktop.gui import bridge
    validated = _threads_of(monkeypatch, bridge, "validate_file")
    listed = _threads_of(monkeypatch, bridge, "list_runs")
    scanned = _threads_of(monkeypatch, bridge, "checkpoints")
    w = window
    w.load_data_file(str(SMALL))                          # a small file: was checked on the GUI thread
    qtbot.waitUntil(lambda: w.report is not None, timeout=30_000)
    w.set_validation_file(str(VALID))
    qtbot.waitUntil(lambda: len(validated) >= 2, timeout=30_000)
    from finetune_desktop.training.runs import new_run_dir, write_run_json
    run = new_run_dir("listed")
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "state.json").write_text("{}", encoding="utf-8")
    write_run_json(run, {"format": 1, "status": "stopped", "created": "x", "settings": {}})
    w.refresh_runs()
    qtbot.waitUntil(lambda: any(e.path == str(run) for e in w.runs.entries), timeout=10_000)
    assert validated and not any(validated), "a file was validated on the GUI thread"
    assert listed and not any(listed), "runs were listed on the GUI thread"
    assert scanned and not any(scanned), "checkpoints were scanned on the GUI thread"
    assert w.runs.entry(run).checkpoints


# ----------------------------------------------------------------------------- the chat log
def test_chat_log_is_appended_on_a_worker_and_survives_a_torn_line(window, qtbot, monkeypatch):
    from finetune_desktop.gui import chat_log
    writes = _threads_of(monkeypatch, chat_log, "append_record")
    log = Path(os.environ["FINETUNE_DESKTOP_HOME"]) / "chats" / "base.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    old = json.dumps({"user": "earlier", "assistant": "kept"}) + "\n" + '{"user": "torn", "assis'
    log.write_text(old, encoding="utf-8")                 # the app died in the middle of a write
    inode = log.stat().st_ino
    w = window
    w.chat.max_new.setValue(4)
    w.chat.temperature.setValue(1.0)
    w.chat.seed.setValue(0)
    for text in ("first", "second"):
        with qtbot.waitSignal(w.replyFinished, timeout=30_000):
            assert w.chat.send(text)
        qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=10_000)
    qtbot.waitUntil(lambda: len(chat_log.read_records(log)) == 3, timeout=10_000)
    assert writes == [False, False], "the chat log was written on the GUI thread"
    raw = log.read_text(encoding="utf-8")
    assert raw.startswith(old + "\n"), "the file was rewritten, not appended to"
    assert log.stat().st_ino == inode
    recs = chat_log.read_records(log)
    assert [r["user"] for r in recs] == ["earlier", "first", "second"]


# ----------------------------------------------------------------------------- the model cache
def test_model_cache_drops_whole_path_components(tmp_path):
    from finetune_desktop.gui.model_cache import make_model_cache
    runs = tmp_path / "runs"
    one = make_tiny_model_folder(runs / "run-1" / "model")
    ten = make_tiny_model_folder(runs / "run-10" / "model")
    cache = make_model_cache(max_items=4)
    m1, _ = cache.get(str(one))
    m10, _ = cache.get(str(ten))
    assert cache.get(str(one))[0] is m1                   # a hit
    assert cache.drop(str(runs / "run-1")) == [str(one)]
    assert str(ten) in cache and str(one) not in cache    # run-10 is not inside run-1
    assert cache.get(str(ten))[0] is m10
    assert cache.drop(str(runs) + "/") == [str(ten)]      # a trailing slash is the same folder


# ----------------------------------------------------------------------------- checkpoints as chat models
def test_a_checkpoint_that_does_not_fit_its_base_model_is_a_clear_error(tmp_path, tiny_model):
    from finetune_desktop.engine.errors import UserError
    from finetune_desktop.gui import bridge
    from finetune_desktop.training.config import TrainConfig
    from finetune_desktop.training.runs import update_run_json
    from finetune_desktop.training.session import start_training
    run = tmp_path / "full-run"
    res = start_training(str(SMALL), run_dir=run, config=TrainConfig(method="full", epochs=1, batch_size=8,
                                                                     max_seq_len=96), base=str(tiny_model))
    assert res.status == "finished"
    ckpt = bridge.checkpoints(run)[-1]
    model, _ = bridge.load_checkpoint_model(run, ckpt)       # fits: loads
    other = make_tiny_model_folder(tmp_path / "wider", hidden=48, intermediate=96)
    update_run_json(run, base_model={"path": str(other)})
    with pytest.raises(UserError, match="wrong shape"):
        bridge.load_checkpoint_model(run, ckpt)


def test_chart_exports_from_the_menu_are_written_on_a_worker(window, qtbot, monkeypatch, tmp_path):
    from PySide6.QtWidgets import QFileDialog

    from finetune_desktop.gui import loss_chart
    from finetune_desktop.training.events import PhaseTimes, StepMetrics
    csv_writes = _threads_of(monkeypatch, loss_chart, "_write_csv")
    png_writes = _threads_of(monkeypatch, loss_chart, "_save_image")
    w = window
    w.loss_panel.add_steps([StepMetrics(step=s, epoch=s / 10, train_loss=2.0 / s, train_token_accuracy=0.5, lr=1e-3,
                                        grad_norm=1.0, tokens_per_s=10.0, elapsed_s=s, eta_s=1.0, total_steps=20,
                                        phases=PhaseTimes(1, 1, 1, 1)) for s in range(1, 21)])
    for name, dialog in (("loss.csv", w.loss_panel.export_csv_dialog), ("loss.png", w.loss_panel.export_png_dialog)):
        monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, n=name: (str(tmp_path / n), "")))
        dialog()
        qtbot.waitUntil(lambda n=name: (tmp_path / n).exists(), timeout=10_000)
    assert csv_writes == [False] and png_writes == [False], "a chart export was written on the GUI thread"
    assert len((tmp_path / "loss.csv").read_text(encoding="utf-8").splitlines()) == 21
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_model_cache_shares_one_load_between_threads_and_packs_for_decoding(tmp_path):
    """A preload and a reply asking for the same model at once load it once; the pair comes back
    with its decoding weights already packed, so the first reply does not pay for that."""
    import threading
    import time

    from finetune_desktop.gui.model_cache import ModelCache, load_folder
    from tinymodel import make_tiny_model_folder

    folder = tmp_path / "m"
    make_tiny_model_folder(folder)
    loads = []

    def slow_load(path):
        loads.append(path)
        time.sleep(0.3)  # long enough for the second thread to arrive while the first loads
        return load_folder(path)

    cache = ModelCache(loaders={"slow::": slow_load})
    spec = f"slow::{folder}"
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(loads) == 1 and len(got) == 2 and got[0] is got[1]
    model = got[0][0]
    assert model._decode_cache is not None and model._decode_cache[0] == model.version
