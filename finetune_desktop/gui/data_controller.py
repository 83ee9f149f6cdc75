"""The training file, the validation file and the base model's tokenizer and config.

Every file is read on a worker thread (a drop, Browse, File > Open, a new base model, a click on
an issue); the results come back as signals on the GUI thread. Only the newest request for the
training file counts: the report of a file that was replaced meanwhile is dropped."""
from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from ..engine.errors import UserError
from . import bridge
from .workers import start_job


class UnusableFile(UserError):
    """The chosen file cannot be checked at all (missing, a folder, no tokenizer)."""


class DataController(QObject):
    checkStarted = Signal(str)                 # path
    reportReady = Signal(str, object)          # path, ValidationReport
    unreadable = Signal(str, str)              # path, why (plain words)
    validationChecked = Signal(str, object)    # path, ValidationReport of the validation file
    validationFailed = Signal(str, str)        # path, why
    baseInfoReady = Signal(object)             # bridge.BaseInfo
    lineRead = Signal(object, str)             # issue, the text of its line

    def __init__(self, pool, parent=None):
        super().__init__(parent)
        self.pool = pool
        self.path: str | None = None           # the training file
        self.report = None                     # its ValidationReport once checked
        self.checking = False
        self.base = None                       # bridge.BaseInfo of the current base model
        self._gen = 0
        self._base_wanted: str | None = None
        self._tokenizers: dict[str, object] = {}
        self._tok_lock = threading.Lock()

    # ------------------------------------------------------------------ base model (any thread)
    def tokenizer(self, base_path: str):
        with self._tok_lock:
            tok = self._tokenizers.get(base_path)
        if tok is None:
            tok = bridge.load_tokenizer(base_path)
            with self._tok_lock:
                self._tokenizers[base_path] = tok
        return tok

    def load_base(self, path: str) -> None:
        """Read the base model's config (for its description and the estimate) on a worker."""
        self._base_wanted = path
        self.base = None
        start_job(self.pool, bridge.base_info, path, on_result=self._base_ready, name="base-info")

    def _base_ready(self, info) -> None:
        if info.path == self._base_wanted:
            self.base = info
            self.baseInfoReady.emit(info)

    # ------------------------------------------------------------------ the training file
    def check(self, path: str, base_path: str, max_seq_len: int, tokens_per_second: float | None) -> None:
        """Validate `path` with the base model's tokenizer on a worker: reportReady or unreadable."""
        self._gen += 1
        gen = self._gen
        self.path, self.report, self.checking = str(path), None, True
        self.checkStarted.emit(self.path)
        start_job(self.pool, self._validate, self.path, base_path, max_seq_len, tokens_per_second,
                  on_result=lambda rep: self._checked(gen, rep),
                  on_error=lambda msg: self._failed(gen, msg), name="validate")

    def clear(self, path: str | None = None) -> None:
        """Forget the report (and any check in flight); `path` is kept as the file to check later."""
        self._gen += 1
        self.path, self.report, self.checking = path, None, False

    def _validate(self, path: str, base_path: str, max_seq_len: int, tokens_per_second):
        p = Path(path)
        if not p.is_file():
            raise UnusableFile("the file does not exist" if not p.exists() else "this is a folder, not a file")
        try:
            tok = self.tokenizer(base_path)
        except Exception as e:  # noqa: BLE001
            from .workers import plain_error
            raise UnusableFile(f"the base model's tokenizer cannot be loaded ({plain_error(e)})") from None
        rep = bridge.validate_file(path, tok, max_seq_len, tokens_per_second=tokens_per_second)
        if not rep.readable:
            raise UnusableFile(str(rep.errors[0]) if rep.errors else "the file cannot be read")
        return rep

    def _checked(self, gen: int, rep) -> None:
        if gen != self._gen:
            return
        self.report, self.checking = rep, False
        self.reportReady.emit(self.path, rep)

    def _failed(self, gen: int, message: str) -> None:
        if gen != self._gen:
            return
        self.report, self.checking = None, False
        self.unreadable.emit(self.path, message)

    # ------------------------------------------------------------------ the validation file
    def check_validation_file(self, path: str, base_path: str, max_seq_len: int) -> None:
        start_job(self.pool, self._validate, path, base_path, max_seq_len, None,
                  on_result=lambda rep: self.validationChecked.emit(path, rep),
                  on_error=lambda msg: self.validationFailed.emit(path, msg), name="validate-valid")

    # ------------------------------------------------------------------ issue lines
    def read_issue_line(self, issue) -> None:
        """The file line an issue points at, read on a worker: lineRead(issue, text)."""
        if self.path is None or not issue.line:
            self.lineRead.emit(issue, "")
            return
        start_job(self.pool, bridge.read_file_line, self.path, issue.line,
                  on_result=lambda text: self.lineRead.emit(issue, text), name="read-line")
