"""The chat pane on a real tiny model: Enter sends, Shift+Enter is a new line, replies stream
in a worker thread, Stop interrupts, conversations are saved, errors stay in the window."""
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import Qt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gui_helpers import main_window  # noqa: E402


@pytest.fixture
def window(qtbot, tiny_model):
    with main_window(qtbot, tiny_model) as w:
        yield w


def test_enter_sends_and_reply_arrives(window, qtbot):
    w = window
    w.chat.max_new.setValue(12)
    w.chat.temperature.setValue(1.0)   # a random tiny model's greedy reply is only newlines
    w.chat.seed.setValue(0)
    inp = w.findChild(type(w.chat.input), "chatInput")
    inp.setFocus()
    inp.setPlainText("안녕하세요 ")          # QTest cannot type Hangul; the rest is typed
    inp.moveCursor(inp.textCursor().MoveOperation.End)
    qtbot.keyClicks(inp, "captain")
    with qtbot.waitSignal(w.replyFinished, timeout=30_000) as blocker:
        qtbot.keyClick(inp, Qt.Key.Key_Return)
    reply = blocker.args[0]
    qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=10_000)
    text = w.findChild(type(w.chat.transcript), "chatTranscript").toPlainText()
    assert "안녕하세요 captain" in text
    assert reply.strip()
    visible = "".join(ch for ch in reply if ch.isprintable() and ch != "\ufffd")
    for word in visible.split():
        assert word in text, (word, text)
    assert w.chat.transcript.messages[-1]["content"] == reply
    assert inp.toPlainText() == ""
    saved = Path(os.environ["FINETUNE_DESKTOP_HOME"]) / "chats" / "base.jsonl"
    qtbot.waitUntil(lambda: saved.exists() and saved.read_text(encoding="utf-8").endswith("\n"),
                    timeout=10_000)    # appended on a worker thread (the line, not just the file)
    rec = json.loads(saved.read_text(encoding="utf-8").splitlines()[-1])
    assert rec["user"] == "안녕하세요 captain" and rec["assistant"] == reply
    # the same seed and settings give the same reply
    with qtbot.waitSignal(w.replyFinished, timeout=30_000) as again:
        w.chat.new_conversation()
        assert w.chat.send("안녕하세요 captain")
    assert again.args[0] == reply


def test_shift_enter_adds_a_newline(window, qtbot):
    inp = window.chat.input
    qtbot.keyClicks(inp, "line one")
    qtbot.keyClick(inp, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(inp, "line two")
    assert inp.toPlainText() == "line one\nline two"
    assert not window.chat.is_generating()


def test_stop_generation(window, qtbot):
    w = window
    w.chat.max_new.setValue(2000)
    w.chat.temperature.setValue(1.0)
    w.chat.rep_pen.setValue(1.0)
    assert w.chat.send("tell me a long story")
    assert w.chat.stop_button.isEnabled()
    qtbot.mouseClick(w.chat.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=30_000)
    assert not w.chat.stop_button.isEnabled()
    assert w.chat.send_button.isEnabled()


def test_model_error_is_shown_not_raised(window, qtbot, tmp_path):
    w = window
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    w.chat.set_models([("broken", str(broken), "")])
    w.chat.send("hello")
    qtbot.waitUntil(lambda: not w.chat.is_generating(), timeout=30_000)
    assert w.error_banner.isVisible()
    assert "Chat:" in w.error_label.text()
    assert "No reply" in w.chat.transcript.toPlainText()
    assert w.chat.history == []


def test_streamed_reply_updates_only_the_last_bubble(qtbot):
    """Each streamed piece replaces the last bubble instead of rebuilding the whole transcript
    (which grew with the chat's length); the result looks the same as a full render."""
    from finetune_desktop.gui.chat_panel import ChatTranscript
    t = ChatTranscript()
    qtbot.addWidget(t)
    t.resize(400, 300)
    t.show()
    for i in range(30):
        t.add("user", f"question {i}")
        t.add("assistant", f"answer {i}\nwith two lines")
    t.add("assistant", "")
    full_renders = []
    real = t.setHtml
    t.setHtml = lambda h: (full_renders.append(1), real(h))
    for k in range(20):
        t.update_last("Arr " * k + "\nmatey", note="0.5 s" if k == 19 else None)
    assert not full_renders, "a streamed piece re-rendered the whole transcript"
    streamed_text, streamed = t.toPlainText(), t.grab().toImage()
    t.setHtml = real
    t.set_title("x")
    t.set_title("")                                  # a full render of the same messages
    assert t.toPlainText() == streamed_text
    assert t.grab().toImage() == streamed
    assert streamed_text.rstrip().endswith("matey\n0.5 s")
