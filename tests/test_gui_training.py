"""The app's core flow, driven through the widgets' fixed object names: drop a file, run, watch
the chart and the weights view fill, finish, chat with the result; stop; bad files; closing."""
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDragEnterEvent, QDropEvent  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QPushButton, QSpinBox, QWidget  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gui_helpers import main_window  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pirate_captain.jsonl"
BAD = ROOT / "sample_data" / "with_mistakes.jsonl"


@pytest.fixture
def window(qtbot, tiny_model):
    with main_window(qtbot, tiny_model, size=(1280, 800)) as w:
        yield w


def drop_file(widget, path):
    """A real drag-enter + drop, delivered the way Qt delivers them (Qt only delivers a drop to
    the widget that accepted the drag-enter)."""
    import warnings
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(QPoint(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                                Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted(), "the drag was refused"
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, ev)
    assert ev.isAccepted(), "the drop was refused"
    return ev


def wait_checked(qtbot, w, timeout=60_000):
    """The file is checked on a worker thread: wait for the drop zone to show the result."""
    qtbot.waitUntil(lambda: w.drop_zone.property("state") in ("ok", "bad"), timeout=timeout)


def find(w, cls, name):
    obj = w.findChild(cls, name)
    assert obj is not None, f"no {cls.__name__} named {name}"
    return obj


def test_object_names_exist(window):
    import pyqtgraph as pg
    for name in ("dataDropZone", "weightsView", "chatInput", "chatTranscript"):
        find(window, QWidget, name)
    for name in ("runButton", "pauseButton", "stopButton", "chatSendButton"):
        find(window, QPushButton, name)
    find(window, QSpinBox, "epochsSpinBox")
    find(window, QComboBox, "modelSelector")
    assert isinstance(find(window, pg.PlotWidget, "lossChart"), pg.PlotWidget)
    assert hasattr(find(window, QWidget, "chatTranscript"), "toPlainText")
    assert find(window, QWidget, "progressBar") is not None


def test_drop_run_finish_then_chat_and_compare(window, qtbot):
    w = window
    drop_file(find(w, QWidget, "dataDropZone"), SAMPLE)
    wait_checked(qtbot, w)
    run = find(w, QPushButton, "runButton")
    assert run.isEnabled(), w.data_panel.drop_zone.detail.text()
    assert w.data_panel.preview.rowCount() > 0
    find(w, QSpinBox, "epochsSpinBox").setValue(1)
    w.data_panel.batch.setValue(16)
    at_finish = []     # what the chat talks to when trainingFinished arrives
    w.trainingFinished.connect(lambda _: at_finish.append((find(w, QComboBox, "modelSelector").currentData(),
                                                           w.chat.effective_system_prompt())))
    with qtbot.waitSignal(w.trainingFinished, timeout=120_000) as blocker:
        qtbot.mouseClick(run, Qt.MouseButton.LeftButton)
        assert not run.isEnabled()
    run_dir = Path(blocker.args[0])
    assert (run_dir / "model" / "config.json").is_file()
    system = json.loads(SAMPLE.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
    assert at_finish == [(str(run_dir / "model"), system)]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    qtbot.waitUntil(lambda: not w.running_threads(), timeout=10_000)
    assert w.loss_chart.point_count() > 0
    assert w.weights_view.snapshot_count > 0
    assert w.weights_view.image.image is not None
    bar = find(w, QWidget, "progressBar")
    assert bar.value() == bar.maximum()
    # the chat switched to the tuned model
    sel = find(w, QComboBox, "modelSelector")
    assert sel.currentData() == str(run_dir / "model")
    # compare mode: one prompt, base and tuned side by side
    w.chat.compare_box.setChecked(True)
    w.chat.max_new.setValue(8)
    w.chat.temperature.setValue(1.0)
    w.chat.seed.setValue(0)
    inp = find(w, QWidget, "chatInput")
    inp.setPlainText("Hello there, captain!")
    with qtbot.waitSignal(w.replyFinished, timeout=60_000) as reply:
        qtbot.mouseClick(find(w, QPushButton, "chatSendButton"), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=30_000)
    text = find(w, QWidget, "chatTranscript").toPlainText()
    assert "Hello there, captain!" in text
    assert w.chat.transcript.messages[-1]["content"] == reply.args[0]
    assert "Hello there, captain!" in w.chat.base_transcript.toPlainText()
    assert w.chat.base_history and w.chat.base_history[-1]["role"] == "assistant"
    qtbot.waitUntil(lambda: (run_dir / "chats.jsonl").exists()
                    and (run_dir / "chats.jsonl").read_text(encoding="utf-8").endswith("\n"), timeout=10_000)
    chats = (run_dir / "chats.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(chats[-1])["user"] == "Hello there, captain!"
    # the run is in the history and its checkpoints are in the model selector
    assert any(r.path == str(run_dir) for r in w.history.runs)
    assert any(str(sel.itemData(i)).startswith("checkpoint::") for i in range(sel.count()))


def test_pause_resume_and_stop_mid_run(window, qtbot):
    w = window
    w.load_data_file(str(SAMPLE))          # what Browse and File > Open call
    w.data_panel.epochs.setValue(50)
    w.data_panel.batch.setValue(8)
    finished = []
    w.trainingFinished.connect(finished.append)
    qtbot.mouseClick(w.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.progress_bar.maximum() > 1 and w.progress_bar.value() >= 2, timeout=60_000)
    # pause: the button becomes Resume and the step count stops moving
    qtbot.mouseClick(w.pause_button, Qt.MouseButton.LeftButton)
    assert w.pause_button.text() == "Resume"
    qtbot.wait(1000)                       # the step in flight finishes and is reported
    held = w.progress_bar.value()
    qtbot.wait(600)
    assert w.progress_bar.value() == held
    assert w.chat.send_button.isEnabled()   # chatting is allowed while paused
    qtbot.mouseClick(w.pause_button, Qt.MouseButton.LeftButton)
    assert w.pause_button.text() == "Pause"
    qtbot.waitUntil(lambda: w.progress_bar.value() > held, timeout=30_000)
    qtbot.mouseClick(w.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.is_training(), timeout=60_000)
    qtbot.waitUntil(lambda: not w.running_threads(), timeout=10_000)
    assert not finished
    info = json.loads((Path(w.run_dir) / "run.json").read_text())
    assert info["status"] == "stopped"
    assert w.progress_bar.value() < 50 * 16
    assert w.run_button.isEnabled()
    assert "stopped" in w.progress_bar.format()


def test_bad_file_shows_errors_and_disables_run(window, qtbot):
    w = window
    drop_file(w, BAD)                          # dropped anywhere on the window
    wait_checked(qtbot, w)
    assert w.drop_zone.property("state") == "bad"
    assert not w.run_button.isEnabled()
    issues = w.data_panel.issues
    assert issues.isVisible() and issues.count() > 0
    texts = [issues.item(i).text() for i in range(issues.count())]
    assert any("line" in t for t in texts), texts
    # clicking an error shows the line it points at
    first = issues.item(0)
    issue = first.data(Qt.ItemDataRole.UserRole)
    w.show_issue_line(issue)                   # the line is read on a worker
    qtbot.waitUntil(lambda: getattr(w, "_last_issue_dialog", None) is not None, timeout=10_000)
    box = w._last_issue_dialog
    assert f"Line {issue.line}" in box.windowTitle()
    with open(BAD, encoding="utf-8") as f:
        line = f.read().splitlines()[issue.line - 1]
    assert box.detailedText().strip() == line.strip()
    box.close()
    # an unreadable path is an error in the window, not a crash
    w.load_data_file(str(BAD.parent / "does-not-exist.jsonl"))
    qtbot.waitUntil(lambda: w.error_banner.isVisible(), timeout=10_000)
    assert "does not exist" in w.error_label.text()
    assert not w.run_button.isEnabled()


def test_close_during_training_stops_and_joins(qtbot, tiny_model):
    from finetune_desktop.gui import MainWindow
    w = MainWindow(base_model=tiny_model)
    w.confirm_close = False
    qtbot.addWidget(w)
    w.show()
    w.load_data_file(str(SAMPLE))
    w.data_panel.epochs.setValue(50)
    w.start_training()
    qtbot.waitUntil(lambda: w.progress_bar.maximum() > 1 and w.progress_bar.value() >= 1, timeout=60_000)
    w.close()
    assert not w.running_threads()
    info = json.loads((Path(w.run_dir) / "run.json").read_text())
    assert info["status"] == "stopped"


def test_missing_embedded_model_is_a_message_not_a_crash(qtbot, monkeypatch, tmp_path):
    from finetune_desktop.gui import bridge
    monkeypatch.setattr(bridge, "embedded_base_model", lambda: tmp_path / "not-installed")
    from finetune_desktop.gui import MainWindow
    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    assert w.banner.isVisible()
    assert "not installed" in w.banner.text()
    w.load_data_file(str(SAMPLE))
    assert not w.run_button.isEnabled()
    w.start_training()        # refused with a message
    assert w.error_banner.isVisible() or w.banner.isVisible()
    assert not w.running_threads()


def test_settings_persist(qtbot, tiny_model):
    from finetune_desktop.gui import MainWindow
    w = MainWindow(base_model=tiny_model)
    qtbot.addWidget(w)
    w.data_panel.epochs.setValue(7)
    w.data_panel.seed.setValue(42)
    w.chat.temperature.setValue(0.3)
    w.resize(701, 501)
    w.close()
    assert (Path(os.environ["FINETUNE_DESKTOP_HOME"]) / "settings.ini").is_file()
    w2 = MainWindow(base_model=tiny_model)
    qtbot.addWidget(w2)
    assert w2.data_panel.epochs.value() == 7
    assert w2.data_panel.seed.value() == 42
    assert abs(w2.chat.temperature.value() - 0.3) < 1e-9
    assert w2.size().width() == 701
