"""The chat pane: message bubbles, streaming replies, sampling settings, a model selector
(base, each run, each checkpoint) and a Compare mode that sends one prompt to the base and
the tuned model and shows both answers side by side. Each finished reply is appended to a
chat log (chat_log.py) on a worker thread."""
from __future__ import annotations

import html
import json
import time
import uuid
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout,
                               QLabel, QPlainTextEdit, QPushButton, QSizePolicy, QSpinBox, QSplitter, QTextBrowser,
                               QToolButton, QVBoxLayout, QWidget)

from . import chat_log, style
from ..training.chat import GenerationSettings
from .paths import chats_dir
from .workers import ChatSettings, GenerateWorker, GenerationJob, start_job

RUN_ROLE = Qt.ItemDataRole.UserRole + 1        # model selector: the run folder ("" = not a run)
SYSTEM_ROLE = Qt.ItemDataRole.UserRole + 2     # model selector: the run's training system prompt

USER_BG, USER_FG = "#dbeafe", "#0b2b57"
BOT_BG, BOT_FG = "#eef2f6", "#1d2733"
SYS_FG = "#6b7785"


class ChatTranscript(QTextBrowser):
    """Bubbles rendered as rich text. toPlainText() gives the whole conversation as text.

    A streamed reply only replaces the last bubble (a text cursor from where it starts to the
    end), so each piece costs the same at the first message and the hundredth; adding a message
    renders everything once."""

    def __init__(self, name: str = "chatTranscript", title: str = "", parent=None):
        super().__init__(parent)
        self.setObjectName(name)
        self.setOpenExternalLinks(False)
        self.setAccessibleName(title or "Chat transcript")
        self.title = title
        self.messages: list[dict] = []   # {"role", "content", "note"}
        self._last_start: int | None = None   # where the last bubble starts in the document
        self.setFont(style.app_font())
        self._render()

    def set_title(self, title: str) -> None:
        if title != self.title:
            self.title = title
            self._render()

    def add(self, role: str, content: str, note: str = "") -> None:
        self.messages.append({"role": role, "content": content, "note": note})
        self._render()

    def update_last(self, content: str, note: str | None = None) -> None:
        if not self.messages:
            return
        self.messages[-1]["content"] = content
        if note is not None:
            self.messages[-1]["note"] = note
        self._render_last()

    def remove_last(self) -> None:
        if self.messages:
            self.messages.pop()
            self._render()

    def clear_messages(self) -> None:
        self.messages = []
        self._render()

    def _render(self) -> None:
        """The whole transcript: every bubble but the last as one document, then the last one."""
        parts = ["<html><body style='margin:2px'>"]
        if self.title:
            parts.append(f"<p style='color:{SYS_FG}; font-size:small; margin:2px'><b>{html.escape(self.title)}</b></p>")
        if not self.messages:
            parts.append(f"<p style='color:{SYS_FG}; margin:8px'>Type a message below and press Enter.</p>")
        parts.extend(_bubble(m) for m in self.messages[:-1])
        parts.append("</body></html>")
        self.setHtml("".join(parts))
        self._last_start = None
        if self.messages:
            cur = QTextCursor(self.document())
            cur.movePosition(QTextCursor.MoveOperation.End)
            self._last_start = cur.position()
            cur.insertHtml(_bubble(self.messages[-1]))
        self._scroll_to_end()

    def _render_last(self) -> None:
        if self._last_start is None:
            self._render()
            return
        cur = QTextCursor(self.document())
        cur.setPosition(self._last_start)
        cur.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cur.beginEditBlock()
        cur.removeSelectedText()
        cur.insertHtml(_bubble(self.messages[-1]))
        cur.endEditBlock()
        self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        self.moveCursor(QTextCursor.MoveOperation.End)
        sb = self.verticalScrollBar()
        sb.setValue(sb.maximum())


def _bubble(m: dict) -> str:
    text = html.escape(m["content"] or "…").replace("\n", "<br>")
    note = f"<br><span style='color:{SYS_FG}; font-size:small'>{html.escape(m['note'])}</span>" \
        if m.get("note") else ""
    if m["role"] == "user":
        return ("<table width='100%' cellspacing='0' cellpadding='0' style='margin-top:6px'><tr>"
                "<td width='18%'></td>"
                f"<td style='background-color:{USER_BG}; color:{USER_FG}; padding:7px'>{text}</td>"
                "</tr></table>")
    if m["role"] == "note":
        return f"<p align='center' style='color:{SYS_FG}; font-size:small; margin:6px'>{text}</p>"
    if m["role"] == "error":
        return f"<p style='color:#a3261b; margin:6px'>⚠ {text}</p>"
    return ("<table width='100%' cellspacing='0' cellpadding='0' style='margin-top:6px'><tr>"
            f"<td style='background-color:{BOT_BG}; color:{BOT_FG}; padding:7px'>{text}{note}</td>"
            "<td width='18%'></td></tr></table>")


class ChatInput(QPlainTextEdit):
    """Enter sends; Shift+Enter adds a new line."""

    submitted = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("chatInput")
        self.setPlaceholderText("Message the model… (Enter sends, Shift+Enter for a new line)")
        self.setTabChangesFocus(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(64)

    def keyPressEvent(self, e: QKeyEvent) -> None:
        if e.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (e.modifiers() & Qt.KeyboardModifier.ShiftModifier):
            self.submitted.emit()
            return
        super().keyPressEvent(e)


class ChatPanel(QWidget):
    replyFinished = Signal(str)
    errorOccurred = Signal(str)
    generatingChanged = Signal(bool)

    def __init__(self, pool, cache, parent=None):
        super().__init__(parent)
        self.pool = pool
        self.cache = cache
        self.worker: GenerateWorker | None = None
        self.history: list[dict] = []        # main conversation (user/assistant)
        self.base_history: list[dict] = []   # compare mode: the base model's side
        self.conversation_id = uuid.uuid4().hex[:12]
        self.base_spec: str | None = None
        self._pending_targets: set[str] = set()
        self._build()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        self.model_selector = QComboBox()
        self.model_selector.setObjectName("modelSelector")
        self.model_selector.setToolTip("Which model answers: the base model, a finished run, or a checkpoint.")
        self.model_selector.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_selector.setMinimumContentsLength(14)
        self.model_selector.currentIndexChanged.connect(self._model_changed)
        self.compare_box = QCheckBox("Compare with base")
        self.compare_box.setObjectName("compareCheckBox")
        self.compare_box.setToolTip("Send each message to the base model too and show both answers side by side.")
        self.compare_box.toggled.connect(self._compare_toggled)
        self.clear_button = QToolButton()
        self.clear_button.setText("New chat")
        self.clear_button.setToolTip("Start a new conversation (the old one stays saved with the run).")
        self.clear_button.clicked.connect(self.new_conversation)

        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(QLabel("<b>Chat</b>"))
        top.addWidget(self.model_selector, 1)
        top2 = QHBoxLayout()
        top2.setContentsMargins(0, 0, 0, 0)
        top2.addWidget(self.compare_box)
        top2.addStretch(1)
        top2.addWidget(self.clear_button)

        self.transcript = ChatTranscript("chatTranscript")
        self.base_transcript = ChatTranscript("baseTranscript", "Base model")
        self.base_transcript.hide()
        self.split = QSplitter(Qt.Orientation.Horizontal)
        self.split.addWidget(self.base_transcript)
        self.split.addWidget(self.transcript)
        self.split.setChildrenCollapsible(False)

        self.input = ChatInput()
        self.input.submitted.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("chatSendButton")
        self.send_button.setToolTip("Send the message (Enter).")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("chatStopButton")
        self.stop_button.setToolTip("Stop the reply being written now.")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_generation)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        inrow = QHBoxLayout()
        inrow.addWidget(self.input, 1)
        inrow.addLayout(buttons)

        # generation settings
        self.settings_box = QGroupBox("Reply settings")
        self.settings_box.setCheckable(True)
        self.settings_box.setChecked(False)
        self.settings_box.toggled.connect(self._toggle_settings)
        self.settings_inner = QWidget()
        f = QFormLayout(self.settings_inner)
        f.setContentsMargins(4, 0, 4, 0)
        f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setObjectName("systemPrompt")
        self.system_prompt.setPlaceholderText("Optional: instructions the model sees before the chat")
        self.system_prompt.setFixedHeight(46)
        self.system_prompt.setToolTip("A hidden first message that sets the model's role. Use the same one as in "
                                      "your training data to get the tuned behaviour.")
        self.temperature = _dspin(0.0, 2.0, 0.05, 0.7, "Randomness. 0 = always the most likely word (repeatable); "
                                  "higher = more varied, too high = nonsense.")
        self.top_p = _dspin(0.05, 1.0, 0.05, 0.9, "Only pick from the most likely words whose chances add up to this. "
                            "Lower = safer, 1 = off.")
        self.top_k = _ispin(0, 500, 0, "Only pick from this many most likely words. 0 = off.")
        self.max_new = _ispin(1, 2048, 200, "The longest reply, in tokens. Longer replies take longer to write.")
        self.rep_pen = _dspin(1.0, 2.0, 0.05, 1.1, "Discourages repeating words. 1 = off; too high makes "
                              "replies odd.")
        self.seed = _ispin(-1, 2**31 - 1, -1, "Fixes the randomness so the same message gives the same reply. "
                           "-1 = random each time.")
        self.seed.setSpecialValueText("random")
        f.addRow("System prompt", self.system_prompt)
        row1 = QHBoxLayout()
        row1.addWidget(QLabel("Temp."))
        row1.addWidget(self.temperature)
        row1.addWidget(QLabel("Top-p"))
        row1.addWidget(self.top_p)
        row1.addWidget(QLabel("Top-k"))
        row1.addWidget(self.top_k)
        f.addRow(row1)
        row2 = QHBoxLayout()
        row2.addWidget(QLabel("Max tokens"))
        row2.addWidget(self.max_new)
        row2.addWidget(QLabel("Repeat pen."))
        row2.addWidget(self.rep_pen)
        row2.addWidget(QLabel("Seed"))
        row2.addWidget(self.seed)
        f.addRow(row2)
        sb = QVBoxLayout(self.settings_box)
        sb.setContentsMargins(4, 4, 4, 4)
        sb.addWidget(self.settings_inner)
        self.settings_inner.setVisible(False)

        self.status = QLabel("")
        self.status.setObjectName("chatStatus")
        self.status.setWordWrap(True)
        self.status.setStyleSheet(f"color: {SYS_FG};")

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addLayout(top2)
        lay.addWidget(self.split, 1)
        lay.addWidget(self.status)
        lay.addLayout(inrow)
        lay.addWidget(self.settings_box)

    def _toggle_settings(self, on: bool) -> None:
        self.settings_inner.setVisible(on)

    # ------------------------------------------------------------------ models
    def set_models(self, entries, keep: str | None = None) -> None:
        """entries: ModelEntry objects (runs_controller.py) or (label, spec, run_dir) tuples.
        Keeps the current choice when possible."""
        want = keep if keep is not None else self.current_spec()
        box = self.model_selector
        box.blockSignals(True)
        box.clear()
        for e in entries:
            label, spec, run_dir = (e.label, e.spec, e.run_dir) if hasattr(e, "spec") else tuple(e)[:3]
            box.addItem(label, spec)
            i = box.count() - 1
            box.setItemData(i, run_dir, RUN_ROLE)
            box.setItemData(i, getattr(e, "system_prompt", ""), SYSTEM_ROLE)
            box.setItemData(i, spec, Qt.ItemDataRole.ToolTipRole)
        i = box.findData(want) if want else -1
        box.setCurrentIndex(i if i >= 0 else 0)
        box.blockSignals(False)
        self._update_send_enabled()
        self._update_system_placeholder()

    def add_model(self, entry) -> None:
        """One more choice (a ModelEntry), unless its spec is listed already."""
        box = self.model_selector
        if box.findData(entry.spec) >= 0:
            return
        box.blockSignals(True)
        box.addItem(entry.label, entry.spec)
        i = box.count() - 1
        box.setItemData(i, entry.run_dir, RUN_ROLE)
        box.setItemData(i, entry.system_prompt, SYSTEM_ROLE)
        box.setItemData(i, entry.spec, Qt.ItemDataRole.ToolTipRole)
        box.blockSignals(False)
        self._update_send_enabled()

    def select_model(self, spec: str) -> bool:
        i = self.model_selector.findData(spec)
        if i >= 0:
            self.model_selector.setCurrentIndex(i)
        return i >= 0

    def current_spec(self) -> str | None:
        return self.model_selector.currentData()

    def current_run_dir(self) -> str:
        return self.model_selector.currentData(RUN_ROLE) or ""

    def _model_changed(self) -> None:
        spec = self.current_spec()
        if spec:  # load it now, so the first reply does not wait for loading (errors show then)
            start_job(self.pool, self._preload, spec, name="preload")
        self._update_system_placeholder()
        if self.history:
            self.transcript.add("note", f"now talking to: {self.model_selector.currentText()}")
        self._update_send_enabled()

    def _preload(self, spec: str) -> None:
        try:
            self.cache.get(spec)
        except Exception:  # noqa: BLE001 - the reply that needs the model reports the problem
            pass

    def run_system_prompt(self) -> str:
        """The system prompt the selected run was trained with (most common one in its data;
        read with the run list, not here)."""
        return str(self.model_selector.currentData(SYSTEM_ROLE) or "")

    def effective_system_prompt(self) -> str:
        """What the user typed; else the run's training system prompt (the persona it learned)."""
        typed = self.system_prompt.toPlainText().strip()
        return typed or self.run_system_prompt()

    def _update_system_placeholder(self) -> None:
        rs = self.run_system_prompt()
        self.system_prompt.setPlaceholderText(f"Default from the run's data: {rs}" if rs else
                                              "Optional: instructions the model sees before the chat")

    def _compare_toggled(self, on: bool) -> None:
        self.base_transcript.setVisible(on)
        self.transcript.set_title(self.model_selector.currentText() if on else "")

    # ------------------------------------------------------------------ sending
    def settings(self) -> ChatSettings:
        seed = self.seed.value()
        return ChatSettings(self.system_prompt.toPlainText(), GenerationSettings(
            temperature=self.temperature.value(), top_p=self.top_p.value(), top_k=self.top_k.value(),
            max_new_tokens=self.max_new.value(), repetition_penalty=self.rep_pen.value(),
            seed=None if seed < 0 else seed))

    def is_generating(self) -> bool:
        return self.worker is not None

    def send(self, text: str | None = None) -> bool:
        text = (self.input.toPlainText() if not isinstance(text, str) else text).strip()
        spec = self.current_spec()
        if not text or self.worker is not None:
            return False
        if not spec:
            self.errorOccurred.emit("There is no model to chat with yet. Choose a base model folder first.")
            return False
        self.input.clear()
        self.history.append({"role": "user", "content": text})
        self.transcript.add("user", text)
        self.transcript.add("assistant", "")
        jobs = []
        system = self.effective_system_prompt()
        compare = self.compare_box.isChecked() and self.base_spec and self.base_spec != spec
        if compare:
            self.base_history.append({"role": "user", "content": text})
            self.base_transcript.add("user", text)
            self.base_transcript.add("assistant", "")
            jobs.append(GenerationJob("base", self.base_spec, tuple(self.base_history), system))
        jobs.insert(0, GenerationJob("main", spec, tuple(_only_turns(self.history)), system))
        self._sent_at = time.monotonic()
        self._pending_targets = {j.target for j in jobs}
        w = GenerateWorker(jobs, self.settings(), self.cache)
        w.piece.connect(self._on_piece)
        w.replyDone.connect(self._on_done)
        w.error.connect(self._on_error)
        w.finished.connect(self._on_finished)
        self.worker = w
        self.pool.start(w, "generate")
        self.status.setText("Writing a reply…")
        self._set_generating(True)
        return True

    def stop_generation(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def _on_piece(self, target: str, text: str) -> None:
        (self.transcript if target == "main" else self.base_transcript).update_last(text)

    def _on_done(self, target: str, text: str) -> None:
        secs = time.monotonic() - getattr(self, "_sent_at", time.monotonic())
        tr = self.transcript if target == "main" else self.base_transcript
        tr.update_last(text or "(empty reply)", note=f"{secs:.1f} s")
        hist = self.history if target == "main" else self.base_history
        hist.append({"role": "assistant", "content": text})
        self._pending_targets.discard(target)
        if target == "main":
            self._save_exchange(text)
            self.replyFinished.emit(text)

    def _on_error(self, target: str, message: str) -> None:
        tr = self.transcript if target == "main" else self.base_transcript
        if tr.messages and tr.messages[-1]["role"] == "assistant" and not tr.messages[-1]["content"]:
            tr.remove_last()
        tr.add("error", f"No reply: {message}")
        hist = self.history if target == "main" else self.base_history
        if hist and hist[-1]["role"] == "user":
            hist.pop()
        self.errorOccurred.emit(f"Chat: {message}")

    def _on_finished(self) -> None:
        self.worker = None
        self.status.setText("")
        self._set_generating(False)

    def _set_generating(self, on: bool) -> None:
        self.stop_button.setEnabled(on)
        self.generatingChanged.emit(on)
        self._update_send_enabled()

    def _update_send_enabled(self) -> None:
        self.send_button.setEnabled(self.worker is None and self.current_spec() is not None)

    def new_conversation(self) -> None:
        self.history.clear()
        self.base_history.clear()
        self.transcript.clear_messages()
        self.base_transcript.clear_messages()
        self.conversation_id = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------------ saving
    def log_path(self) -> Path:
        run_dir = self.current_run_dir()
        return Path(run_dir) / "chats.jsonl" if run_dir else chats_dir() / "base.jsonl"

    def _save_exchange(self, reply: str) -> None:
        """Append this exchange to the chat log, one line, on a worker thread."""
        s = self.settings().generation
        rec = {"conversation": self.conversation_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "model": self.model_selector.currentText(), "model_path": self.current_spec(),
               "system": self.effective_system_prompt(), "user": self.history[-2]["content"] if len(self.history) >= 2 else "",
               "assistant": reply,
               "settings": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                            "max_new_tokens": s.max_new_tokens, "repetition_penalty": s.repetition_penalty,
                            "seed": s.seed}}
        target = self.log_path()
        start_job(self.pool, chat_log.append_record, target, rec, name="chat-log",
                  on_error=lambda m: self.errorOccurred.emit(f"Could not save the conversation to {target}: {m}"))

    # ------------------------------------------------------------------ settings
    def save_settings(self, s) -> None:
        s.setValue("chat_settings", json.dumps({
            "temperature": self.temperature.value(), "top_p": self.top_p.value(), "top_k": self.top_k.value(),
            "max_new_tokens": self.max_new.value(), "repetition_penalty": self.rep_pen.value(),
            "system": self.system_prompt.toPlainText()}))

    def restore_settings(self, s) -> None:
        try:
            d = json.loads(s.value("chat_settings", "{}", type=str) or "{}")
            if not isinstance(d, dict):
                return
            self.temperature.setValue(float(d.get("temperature", self.temperature.value())))
            self.top_p.setValue(float(d.get("top_p", self.top_p.value())))
            self.top_k.setValue(int(d.get("top_k", self.top_k.value())))
            self.max_new.setValue(int(d.get("max_new_tokens", self.max_new.value())))
            self.rep_pen.setValue(float(d.get("repetition_penalty", self.rep_pen.value())))
            self.system_prompt.setPlainText(str(d.get("system", "")))
        except (ValueError, TypeError):
            pass


def _only_turns(history: list[dict]) -> list[dict]:
    return [m for m in history if m["role"] in ("user", "assistant")]


def _dspin(lo, hi, step, val, tip) -> QDoubleSpinBox:
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setSingleStep(step)
    s.setDecimals(2)
    s.setValue(val)
    s.setToolTip(tip)
    return s


def _ispin(lo, hi, val, tip) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    s.setValue(val)
    s.setToolTip(tip)
    return s
