""""Did it learn?": after a run the app asks the tuned and the base model the same questions
(greedy, as `chat --temperature 0` answers), one at a time on a worker so the table fills as it
goes, and judges each reply with training.quiz's rules.

The questions come from the training file itself (is the trained answer reproduced? at most
MAX_TRAINING_QUESTIONS of them, evenly spread) or from a quiz file the person chooses
(JSONL {"question", "expected": [...]}: is one of the expected strings in the reply?). A quiz
file chosen before a run is also handed to the run (TrainConfig.quiz_file), which scores it at
every evaluation; the loss chart draws that score. The base model's replies never change, so
they are remembered per base model and question."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QButtonGroup, QFileDialog, QHBoxLayout, QHeaderView, QLabel,
                               QPushButton, QRadioButton, QSizePolicy, QTableWidget, QTableWidgetItem, QVBoxLayout,
                               QWidget)

from .workers import clean_reply, lower_current_thread_priority, plain_error

MAX_TRAINING_QUESTIONS = 20
QUIZ_FILTER = "Quiz or training file (*.jsonl *.json *.csv *.tsv *.txt);;All files (*)"
RIGHT, WRONG = QColor("#e3f4e6"), QColor("#fbe4e2")


def pick_evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


class QuizWorker(QObject):
    """Loads the questions, then asks the tuned and the base model each question in turn."""

    itemsReady = Signal(object, int)       # the questions asked, how many the file has
    result = Signal(int, str, object)      # question index, "tuned" or "base", QuizResult
    error = Signal(str)
    finished = Signal()

    def __init__(self, path: str, tuned_spec: str, base_spec: str | None, cache, base_memo: dict):
        super().__init__()
        self.path, self.tuned_spec, self.base_spec = path, tuned_spec, base_spec
        self.cache, self.base_memo = cache, base_memo
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    @Slot()
    def run(self) -> None:
        lower_current_thread_priority()
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - shown in the view
            self.error.emit(plain_error(e))
        finally:
            self.finished.emit()

    def _run(self) -> None:
        from ..training.chat import ChatModel
        from ..training.quiz import ask, load_questions, quiz_settings
        items = load_questions(self.path)
        asked = items if items[0].kind == "keys" else pick_evenly(items, MAX_TRAINING_QUESTIONS)
        self.itemsReady.emit(asked, len(items))
        settings = quiz_settings()
        tuned = ChatModel(*self.cache.get(self.tuned_spec), Path(self.tuned_spec))
        base = ChatModel(*self.cache.get(self.base_spec), Path(self.base_spec)) if self.base_spec else None
        for i, item in enumerate(asked):
            if self._stop.is_set():
                return
            self.result.emit(i, "tuned", next(ask(tuned, [item], settings)))
            if base is None or self._stop.is_set():
                continue
            key = (self.base_spec, json.dumps([item.messages, item.expected, item.kind], sort_keys=True,
                                              ensure_ascii=False))
            got = self.base_memo.get(key)
            if got is None:
                got = self.base_memo[key] = next(ask(base, [item], settings))
            self.result.emit(i, "base", got)


class QuizView(QWidget):
    """objectName `quizView`."""

    quizFinished = Signal(object, object)   # QuizScore of the tuned model, of the base model (or None)

    def __init__(self, pool, cache, parent=None):
        super().__init__(parent)
        self.setObjectName("quizView")
        self.pool, self.cache = pool, cache
        self.quiz_path: str | None = None
        self.results: dict[str, dict[int, object]] = {"tuned": {}, "base": {}}
        self.items: list = []
        self.worker: QuizWorker | None = None
        self._base_memo: dict = {}
        self._last = None                       # (training file, tuned spec, base spec) of the latest quiz
        self._build()

    def _build(self) -> None:
        self.from_training = QRadioButton("the training file")
        self.from_training.setChecked(True)
        self.from_training.setToolTip("Ask the training questions: right when the reply reproduces the trained "
                                      f"answer (at most {MAX_TRAINING_QUESTIONS}, evenly spread over the file).")
        self.from_quiz = QRadioButton("a quiz file")
        self.from_quiz.setToolTip("JSONL lines {\"question\": …, \"expected\": [\"…\"]}: right when the reply contains "
                                  "one of the expected strings. Chosen before Run, it is also scored at every "
                                  "evaluation and drawn on the loss chart.")
        g = QButtonGroup(self)
        g.addButton(self.from_training)
        g.addButton(self.from_quiz)
        self.choose = QPushButton("Choose…")
        self.choose.clicked.connect(self.choose_quiz_file)
        self.file_label = QLabel("")
        self.file_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.ask_button = QPushButton("Ask again")
        self.ask_button.setToolTip("Ask both models every question again.")
        self.ask_button.clicked.connect(self.ask_again)
        self.ask_button.setEnabled(False)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Questions from"))
        row.addWidget(self.from_training)
        row.addWidget(self.from_quiz)
        row.addWidget(self.choose)
        row.addWidget(self.file_label, 1)
        row.addWidget(self.ask_button)
        row.addWidget(self.stop_button)
        for b in (self.choose, self.ask_button, self.stop_button):
            b.setMinimumWidth(40)
        self.score = QLabel("After a run, the tuned and the base model answer the same questions here.")
        self.score.setObjectName("quizScore")
        self.score.setWordWrap(True)
        self.table = QTableWidget(0, 5)
        self.table.setObjectName("quizTable")
        self.table.setHorizontalHeaderLabels(["question", "base model", "", "tuned model", ""])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(True)
        hh = self.table.horizontalHeader()
        for c, mode in ((0, QHeaderView.ResizeMode.Stretch), (1, QHeaderView.ResizeMode.Stretch),
                        (2, QHeaderView.ResizeMode.ResizeToContents), (3, QHeaderView.ResizeMode.Stretch),
                        (4, QHeaderView.ResizeMode.ResizeToContents)):
            hh.setSectionResizeMode(c, mode)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(3)
        lay.addLayout(row)
        lay.addWidget(self.score)
        lay.addWidget(self.table, 1)

    # ------------------------------------------------------------------ the questions
    def choose_quiz_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a quiz file", "", QUIZ_FILTER)
        if path:
            self.set_quiz_file(path)

    def set_quiz_file(self, path: str | None) -> None:
        self.quiz_path = path
        self.file_label.setText(Path(path).name if path else "")
        self.file_label.setToolTip(path or "")
        (self.from_quiz if path else self.from_training).setChecked(True)

    def quiz_file(self) -> str | None:
        """The quiz file to score during a run (None: questions from the training file)."""
        return self.quiz_path if (self.from_quiz.isChecked() and self.quiz_path) else None

    # ------------------------------------------------------------------ asking
    def ask(self, training_file: str, tuned_spec: str, base_spec: str | None) -> None:
        """Ask the tuned (and the base) model the chosen questions; the table fills as replies come."""
        self.stop()
        self._last = (training_file, tuned_spec, base_spec)
        path = self.quiz_file() or training_file
        self.items, self.results = [], {"tuned": {}, "base": {}}
        self.table.setRowCount(0)
        self.score.setText(f"Asking the questions of {Path(path).name}…")
        w = QuizWorker(path, tuned_spec, base_spec, self.cache, self._base_memo)
        w.itemsReady.connect(self._items_ready)
        w.result.connect(self._result)
        w.error.connect(self._error)
        w.finished.connect(self._finished)
        self.worker = w
        self.ask_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.pool.start(w, "quiz")

    def ask_again(self) -> None:
        if self._last is not None:
            self.ask(*self._last)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def is_asking(self) -> bool:
        return self.worker is not None

    def _current(self) -> bool:
        """The signal comes from the quiz asked last (a stopped one may still send a reply)."""
        return self.sender() is self.worker

    def _items_ready(self, items, total: int) -> None:
        if not self._current():
            return
        self.items = list(items)
        self.table.setRowCount(len(items))
        for r, item in enumerate(items):
            q = QTableWidgetItem(item.question)
            want = item.expected[0] if item.kind == "answer" else " / ".join(item.expected)
            q.setToolTip(f"line {item.line}\n{item.question}\n\n"
                         + ("trained answer: " if item.kind == "answer" else "right when the reply contains: ") + want)
            self.table.setItem(r, 0, q)
            for c in (1, 3):
                self.table.setItem(r, c, QTableWidgetItem("…"))
        kind = "the trained answers" if items and items[0].kind == "answer" else "an expected string"
        some = f"{len(items)} of {total}" if len(items) < total else f"{len(items)}"
        self._source_note = f"{some} questions; a reply is right when it contains {kind}."
        self._show_score()

    def _result(self, i: int, which: str, res) -> None:
        if not self._current():
            return
        self.results[which][i] = res
        col = 3 if which == "tuned" else 1
        reply = clean_reply(res.reply)
        item = QTableWidgetItem(reply or "(no reply)")
        item.setToolTip(reply)
        mark = QTableWidgetItem("✓" if res.correct else "✗")
        mark.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
        for it in (item, mark):
            it.setBackground(QBrush(RIGHT if res.correct else WRONG))
        self.table.setItem(i, col, item)
        self.table.setItem(i, col + 1, mark)
        self._show_score()

    def scores(self):
        from ..training.quiz import score
        tuned = score(list(self.results["tuned"].values()))
        base = score(list(self.results["base"].values())) if self.results["base"] else None
        return tuned, base

    def _show_score(self) -> None:
        tuned, base = self.scores()
        done = len(self.results["tuned"])
        head = f"<b>Tuned model {tuned}</b>" + (f" · base model {base}" if base is not None else "")
        busy = f" · asking {done + 1} of {len(self.items)}…" if self.worker is not None and done < len(self.items) else ""
        self.score.setText(head + busy + "<br>" + getattr(self, "_source_note", ""))

    def _error(self, message: str) -> None:
        if not self._current():
            return
        import html
        self._source_note = f"<span style='color:#a3261b'>The quiz stopped: {html.escape(message)}</span>"
        self.score.setText(self._source_note)

    def _finished(self) -> None:
        if not self._current():
            return
        self.worker = None
        self.ask_button.setEnabled(self._last is not None)
        self.stop_button.setEnabled(False)
        if self.items:
            self._show_score()
        self.quizFinished.emit(*self.scores())
