"""Worker objects that run slow work off the GUI thread:

    worker.moveToThread(thread); thread.started -> worker.run; worker.finished -> thread.quit;
    the ThreadPool keeps both until the thread has ended (see ThreadPool). start_job(pool, fn,
    *args, on_result=..., on_error=...) runs one function on a worker with callbacks on the GUI
    thread: the way the controllers read and write files.

The training worker adapts the plain training loop's callbacks to Qt signals. The loop calls
`on_event` on the training thread; the worker keeps step metrics in a list and only the
latest weight snapshot / phase, and emits them at most ~10 times a second (one signal per
kind per flush), so the GUI thread never drowns in events. Every other event (the run
started, an evaluation, a checkpoint, a pause, the end) first flushes what is buffered, so the
chart shows every step up to a pause or the end. Events are frozen copies, so sending them
across threads is safe. Cancellation is a flag (TrainControl / threading.Event) checked
between steps or tokens."""
from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from ..training.chat import ChatModel, GenerationSettings, stream_reply

FLUSH_INTERVAL_S = 0.1  # <= 10 UI updates per second


class ThreadPool(QObject):
    """Keeps every (thread, worker) pair alive until its thread has finished, and joins them all.
    Lives on the GUI thread, so `_thread_finished` runs there (a queued call).

    Python owns both objects; nothing is deleted with deleteLater. A worker deleted by its own
    thread's deferred-delete while the GUI thread dropped the last Python reference to it is a
    race that crashed PySide (a destructor reading a freed Python wrapper). Here the pair is
    released on the GUI thread only after QThread.wait(), when the thread no longer runs."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._pairs: list[tuple[QThread, QObject]] = []

    def start(self, worker: QObject, name: str = "worker") -> QThread:
        thread = QThread()
        thread.setObjectName(name)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        # quit is thread-safe; a direct connection lets `join` work while the GUI thread waits
        worker.finished.connect(thread.quit, Qt.ConnectionType.DirectConnection)
        thread.finished.connect(self._thread_finished)
        self._pairs.append((thread, worker))
        thread.start()
        return thread

    @Slot()
    def _thread_finished(self) -> None:
        t = self.sender()
        if t is None:
            return
        t.wait()     # finished is sent just before the thread ends: let it end, then let go
        self._pairs = [p for p in self._pairs if p[0] is not t]

    def running(self) -> list[QThread]:
        out = []
        for t, _ in list(self._pairs):
            try:
                if t.isRunning():
                    out.append(t)
            except RuntimeError:  # already deleted
                pass
        return out

    def cancel_all(self) -> None:
        for _, w in list(self._pairs):
            try:
                w.cancel()
            except (RuntimeError, AttributeError):
                pass

    def join(self, timeout_s: float = 30.0) -> bool:
        """Cancel everything and wait for the threads to end. True when all ended."""
        self.cancel_all()
        deadline = time.monotonic() + timeout_s
        ok = True
        for t, _ in list(self._pairs):
            try:
                left = max(0, int((deadline - time.monotonic()) * 1000))
                if t.isRunning() and not t.wait(left):
                    ok = False
            except RuntimeError:
                pass
        return ok


def lower_current_thread_priority(nice: int | None = None) -> None:
    """Let the GUI thread win the CPU over this worker (training / generation). On Linux a thread
    has its own nice value (and threads it starts inherit it); elsewhere QThread's priority works.
    FINETUNE_DESKTOP_WORKER_NICE sets the value (default 5; 0 = leave the priority alone)."""
    import os
    if nice is None:
        try:
            nice = int(os.environ.get("FINETUNE_DESKTOP_WORKER_NICE", "5"))
        except ValueError:
            nice = 5
    if nice <= 0:
        return
    try:
        if hasattr(os, "setpriority") and sys.platform.startswith("linux"):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
            return
    except OSError:
        pass
    t = QThread.currentThread()
    if t is not None:
        try:
            t.setPriority(QThread.Priority.LowPriority)
        except RuntimeError:
            pass


def plain_error(exc: BaseException) -> str:
    """One line a user can read: never a traceback."""
    from ..engine.errors import UserError
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a smaller batch size, a shorter max sequence length, or LoRA instead of full."
    if isinstance(exc, UserError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".strip(": ")
    return f"Something went wrong ({type(exc).__name__}: {exc}). The app is still running; please report this."


class FunctionWorker(QObject):
    """Run fn(*args) on a thread; emit `result(object)` or `error(str)`, then `finished`."""

    result = Signal(object)
    error = Signal(str)
    finished = Signal()

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def cancel(self) -> None:
        pass

    @Slot()
    def run(self) -> None:
        try:
            self.result.emit(self.fn(*self.args, **self.kwargs))
        except BaseException as e:  # noqa: BLE001 - every error goes to the window
            self.error.emit(plain_error(e))
            _log_exception()
        finally:
            self.finished.emit()


class _Callbacks(QObject):
    """Lives on the thread that started the job (the GUI thread), so the worker's signals reach
    these slots there, queued: the callbacks may touch widgets."""

    def __init__(self, on_result, on_error, on_done, parent):
        super().__init__(parent)
        self.on_result, self.on_error, self.on_done = on_result, on_error, on_done

    @Slot(object)
    def result(self, value) -> None:
        if self.on_result is not None:
            self.on_result(value)

    @Slot(str)
    def error(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)

    @Slot()
    def finished(self) -> None:
        try:
            if self.on_done is not None:
                self.on_done()
        finally:
            self.on_result = self.on_error = self.on_done = None
            self.deleteLater()


def start_job(pool: ThreadPool, fn, *args, on_result=None, on_error=None, on_done=None,
              name: str = "job") -> FunctionWorker:
    """Run fn(*args) on a worker thread; the callbacks run on the calling (GUI) thread:
    on_result(value) or on_error(message), then on_done()."""
    w = FunctionWorker(fn, *args)
    cb = _Callbacks(on_result, on_error, on_done, pool)
    w.result.connect(cb.result)
    w.error.connect(cb.error)
    w.finished.connect(cb.finished)
    pool.start(w, name)
    return w


@dataclass(frozen=True)
class RunHistory:
    """Not a loop event: the saved metrics of a run about to be resumed, sent through the same
    queue so they reach the window before the loop's RunStarted."""
    rows: tuple


@dataclass(frozen=True)
class RunDetails:
    """Not a loop event: the run's run.json, read on the training thread after the loop ended."""
    info: dict


class TrainWorker(QObject):
    """Runs the training loop (a plain function) and turns its events into throttled signals."""

    runStarted = Signal(object)        # RunStarted
    stepsReady = Signal(object)        # list[StepMetrics], coalesced
    evalReady = Signal(object)         # EvalMetrics
    snapshotReady = Signal(object)     # WeightSnapshot (latest only)
    phaseReady = Signal(object)        # PhaseEvent (latest only)
    checkpointSaved = Signal(object)   # CheckpointSaved
    paused = Signal(object)            # RunPaused: the loop waits (every step before it is flushed)
    historyReady = Signal(object)      # list[dict]: a resumed run's saved metrics (before runStarted)
    stepDetail = Signal(object)        # StepDetail: what a step-mode step computed
    alarm = Signal(object)             # RunAlarm: overfitting or forgetting
    notice = Signal(str)               # Notice.message: something the person should know
    changesReady = Signal(object)      # live_model.TensorChanges (latest only)
    detailsReady = Signal(object)      # dict: the run's run.json after the loop ended (before finished)
    runEnded = Signal(object)          # RunFinished | RunStopped | RunFailed
    error = Signal(str)                # an exception the loop did not turn into RunFailed
    finished = Signal()

    def __init__(self, start_fn, control, flush_interval_s: float = FLUSH_INTERVAL_S):
        """start_fn(on_event, control) runs the whole loop and returns when it ends."""
        super().__init__()
        self.start_fn = start_fn
        self.control = control
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._steps: list = []
        self._snapshot = None
        self._phase = None
        self._changes = None
        self._last_flush = 0.0
        self.ended = None

    def cancel(self) -> None:
        self.control.stop()

    @Slot()
    def run(self) -> None:
        lower_current_thread_priority()
        try:
            self.start_fn(self._on_event, self.control)
        except BaseException as e:  # noqa: BLE001
            self._flush(force=True)
            if self.ended is None:
                self.error.emit(plain_error(e))
            _log_exception()
        else:
            self._flush(force=True)
        finally:
            self.finished.emit()

    # called on the training thread
    def _on_event(self, e) -> None:
        from ..training import events as ev
        from .live_model import TensorChanges
        if isinstance(e, ev.StepMetrics):
            self._steps.append(e)
        elif isinstance(e, ev.WeightSnapshot):
            self._snapshot = e
        elif isinstance(e, ev.PhaseEvent):
            self._phase = e
        elif isinstance(e, TensorChanges):
            self._changes = e
        else:
            self._flush(force=True)
            if isinstance(e, ev.RunStarted):
                self.runStarted.emit(e)
            elif isinstance(e, ev.EvalMetrics):
                self.evalReady.emit(e)
            elif isinstance(e, ev.CheckpointSaved):
                self.checkpointSaved.emit(e)
            elif isinstance(e, ev.RunPaused):
                self.paused.emit(e)
            elif isinstance(e, ev.StepDetail):
                self.stepDetail.emit(e)
            elif isinstance(e, ev.RunAlarm):
                self.alarm.emit(e)
            elif isinstance(e, ev.Notice):
                self.notice.emit(e.message)
            elif isinstance(e, RunHistory):
                self.historyReady.emit(e.rows)
            elif isinstance(e, RunDetails):
                self.detailsReady.emit(e.info)
            elif isinstance(e, (ev.RunFinished, ev.RunStopped, ev.RunFailed)):
                self.ended = e
                self.runEnded.emit(e)
            return
        self._flush()

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = now
        steps, self._steps = self._steps, []
        snap, self._snapshot = self._snapshot, None
        phase, self._phase = self._phase, None
        changes, self._changes = self._changes, None
        if steps:
            self.stepsReady.emit(steps)
        if snap is not None:
            self.snapshotReady.emit(snap)
        if phase is not None:
            self.phaseReady.emit(phase)
        if changes is not None:
            self.changesReady.emit(changes)


@dataclass(frozen=True)
class ChatSettings:
    """What the chat panel asks for: a system prompt and the sampling settings."""
    system_prompt: str = ""
    generation: GenerationSettings = GenerationSettings()


@dataclass(frozen=True)
class GenerationJob:
    target: str                      # which transcript gets the tokens ("main" or "base")
    model_spec: str                  # a model folder, or a "kind::path::path" spec (model_cache.py)
    messages: tuple = field(default_factory=tuple)   # ({"role", "content"}, ...) including the new user turn
    system: str | None = None        # overrides the settings' system prompt (e.g. the run's own)


class GenerateWorker(QObject):
    """Streams replies for one or more jobs, one after the other (so two CPU-heavy generations
    never fight over the cores). Text pieces are coalesced to ~30 updates per second."""

    piece = Signal(str, str)          # target, text so far (the whole reply)
    replyDone = Signal(str, str)      # target, final reply
    error = Signal(str, str)          # target, message
    finished = Signal()

    def __init__(self, jobs: list[GenerationJob], settings: GenerationSettings, cache):
        super().__init__()
        self.jobs = list(jobs)
        self.settings = settings
        self.cache = cache
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    @Slot()
    def run(self) -> None:
        lower_current_thread_priority()
        try:
            for job in self.jobs:
                if self._stop.is_set():
                    break
                try:
                    self._run_job(job)
                except BaseException as e:  # noqa: BLE001
                    self.error.emit(job.target, plain_error(e))
                    _log_exception()
        finally:
            self.finished.emit()

    def _run_job(self, job: GenerationJob) -> None:
        model, tok = self.cache.get(job.model_spec)
        msgs = []
        system = (job.system if job.system is not None else self.settings.system_prompt).strip()
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.extend(dict(m) for m in job.messages)
        text, last = "", 0.0
        for piece in stream_reply(ChatModel(model, tok, Path(job.model_spec)), msgs, self.settings.generation,
                                  should_stop=self._stop.is_set):
            text += piece
            now = time.monotonic()
            if now - last >= 0.033:
                last = now
                self.piece.emit(job.target, clean_reply(text, final=False))
        text = clean_reply(text)
        self.piece.emit(job.target, text)
        self.replyDone.emit(job.target, text)


def _stray(ch: str) -> bool:
    """A replacement character (a byte that is not a whole character) or a control character
    (what a lone byte token such as 0x13 decodes to)."""
    import unicodedata
    return ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and not ch.isspace())


def clean_reply(text: str, final: bool = True) -> str:
    """A reply as shown: without the stray replacement (or control) characters a small model can
    produce at the very start or end (a lone byte token that is not a whole character), and
    without outer whitespace. Those inside the text are kept. final=False: a streamed reply so far
    (its end may still become a character)."""
    t = text.lstrip()
    while t and _stray(t[0]):
        t = t[1:].lstrip()
    if final:
        t = t.rstrip()
        while t and _stray(t[-1]):
            t = t[:-1].rstrip()
    return t


def _log_exception() -> None:
    """Details for developers go to a log file under the app home, never to the user."""
    try:
        from .paths import app_home
        p = app_home() / "logs"
        p.mkdir(parents=True, exist_ok=True)
        with open(p / "gui-errors.log", "a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + traceback.format_exc() + "\n")
    except Exception:  # noqa: BLE001
        pass
