"""One training run at a time: start a new run, continue a saved one, pause, resume, stop, run
one step at a time (step mode), stop keeping the best checkpoint.

The controller owns the TrainControl (the loop's stop / pause flags) and the TrainWorker (the
loop on its own thread) and re-emits the worker's signals on the GUI thread, so the window only
connects views to this object. `ended` comes once the training thread has finished, with the
run's last event (RunFinished / RunStopped / RunFailed, or None when the run never started);
by then `details` holds the run's run.json as the loop left it (read on the training thread).

A new run's model object is known (`live`, live_model.LiveModel). Views may read its current
weights only while the loop waits in a pause or after it ended (`current_weights_readable`), and
as readers (`begin_read` / `end_read`): a resume or a step asked for meanwhile waits until the
last reader is done, so the training thread never writes weights that are being read."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Signal

from . import bridge
from .live_model import LiveModel
from .workers import RunDetails, RunHistory, TrainWorker


class TrainingController(QObject):
    launched = Signal(str, bool)       # run folder, continuing a saved run
    runStarted = Signal(object)        # RunStarted
    historyReady = Signal(object)      # list[dict]: a continued run's saved metrics (before runStarted)
    stepsReady = Signal(object)        # list[StepMetrics]
    evalReady = Signal(object)         # EvalMetrics
    snapshotReady = Signal(object)     # WeightSnapshot
    phaseReady = Signal(object)        # PhaseEvent
    checkpointSaved = Signal(object)   # CheckpointSaved
    paused = Signal(object)            # RunPaused: the loop waits; every step before it was sent
    stepDetail = Signal(object)        # StepDetail of a step-mode step
    alarmRaised = Signal(object)       # RunAlarm
    noticeSent = Signal(str)           # Notice.message
    changesReady = Signal(object)      # live_model.TensorChanges
    pauseRequested = Signal(bool)      # True: pause asked for, False: resumed
    error = Signal(str)                # the loop raised instead of ending with RunFailed
    ended = Signal(object)             # the last run event or None, after the thread ended

    def __init__(self, pool, parent=None):
        super().__init__(parent)
        self.pool = pool
        self.control = None
        self.worker: TrainWorker | None = None
        self.run_dir: str | None = None
        self.last_speed = 0.0              # tokens/s of the latest step
        self.details: dict = {}            # run.json of the last run, read after its loop ended
        self._last_event = None
        self.live: LiveModel | None = None  # the model of the newest run started here (None: continued runs)
        self.waiting = False                # the loop waits in a pause (RunPaused arrived, not resumed since)
        self.readers = 0                    # views reading the current weights now
        self._deferred: str | None = None   # "resume" or "step", asked for while readers were busy
        self.want_changes = False           # a view shows the per-matrix change (live_model.ChangeMeter)

    # ------------------------------------------------------------------ state
    def is_training(self) -> bool:
        return self.worker is not None

    def is_paused(self) -> bool:
        return self.control is not None and self.control.paused

    # ------------------------------------------------------------------ starting
    def start(self, data_path: str, base_model: str, cfg_kwargs: dict, valid_path: str | None,
              one_step: bool = False) -> str:
        """Start a new run; returns its folder. one_step: run exactly one step, then pause (step
        mode from idle). Raises (UserError, ValueError) when it cannot."""
        if self.is_training():
            raise RuntimeError("a run is already in progress")
        run_dir = str(bridge.new_run_dir(Path(data_path).stem))
        old = self.live
        self.live = LiveModel()
        self.live.want_changes = self.want_changes
        if old is not None:
            old.release()
        fn = bridge.make_train_fn(data_path, run_dir, base_model, cfg_kwargs, valid_path, live=self.live)
        self._launch(fn, run_dir, continuing=False, one_step=one_step)
        return run_dir

    def continue_run(self, run_dir: str, extra_epochs: int) -> None:
        """Resume a stopped run, or add epochs to a finished one, from its newest checkpoint. The
        run's saved metrics are read on the training thread and sent first (historyReady)."""
        if self.is_training():
            raise RuntimeError("a run is already in progress")
        resume = bridge.make_resume_fn(run_dir, int(extra_epochs))
        if self.live is not None:
            self.live.release()
        self.live = None

        def fn(on_event, control):
            try:
                rows = bridge.load_metric_rows(run_dir)
            except Exception:  # noqa: BLE001 - the chart starts empty; resuming says what is wrong
                rows = []
            on_event(RunHistory(tuple(rows)))
            resume(on_event, control)

        self._launch(fn, str(run_dir), continuing=True)

    def _launch(self, fn, run_dir: str, continuing: bool, one_step: bool = False) -> None:
        self.control = bridge.make_control()
        if one_step:
            self.control.step_once()
        self.run_dir = run_dir
        self._last_event = None
        self.details = {}
        self.waiting = False
        self._deferred = None

        def run_then_read_details(on_event, control):
            try:
                fn(on_event, control)
            finally:
                try:
                    info = bridge.read_run_info(run_dir)
                except Exception:  # noqa: BLE001 - no run folder (it never started)
                    info = {}
                on_event(RunDetails(info))

        w = TrainWorker(run_then_read_details, self.control)
        w.runStarted.connect(self._on_run_started)
        w.historyReady.connect(self.historyReady)
        w.detailsReady.connect(self._on_details)
        w.stepsReady.connect(self._on_steps)
        w.evalReady.connect(self.evalReady)
        w.snapshotReady.connect(self.snapshotReady)
        w.phaseReady.connect(self.phaseReady)
        w.checkpointSaved.connect(self.checkpointSaved)
        w.paused.connect(self._on_paused)
        w.stepDetail.connect(self.stepDetail)
        w.alarm.connect(self.alarmRaised)
        w.notice.connect(self.noticeSent)
        w.changesReady.connect(self.changesReady)
        w.runEnded.connect(self._on_run_ended)
        w.error.connect(self.error)
        w.finished.connect(self._on_thread_done)
        self.worker = w
        self.launched.emit(run_dir, continuing)
        self.pool.start(w, "train")

    # ------------------------------------------------------------------ requests
    def pause(self) -> None:
        if self.is_training() and not self.control.paused:
            self.control.pause()
            self.pauseRequested.emit(True)

    def resume(self) -> None:
        if self.is_training() and self.control.paused:
            if self.readers:
                self._deferred = "resume"
                return
            self.waiting = False
            self.control.resume()
            self.pauseRequested.emit(False)

    def step_once(self) -> bool:
        """From a pause: run exactly one more step, then pause again. True if asked."""
        if not (self.is_training() and self.control.paused):
            return False
        if self.readers:
            self._deferred = "step"
            return True
        self.waiting = False
        self.control.step_once()
        return True

    def stop_keeping_best(self) -> bool:
        """Stop and make the best checkpoint (lowest validation loss) the run's model."""
        if self.is_training():
            if self.readers:       # it writes the best weights back into the model
                self._deferred = "stop_best"
                return True
            self.waiting = False
            self.control.stop_keeping_best()
            return True
        return False

    # ------------------------------------------------------------------ reading the current weights
    def current_weights_readable(self) -> bool:
        """The newest run's model may be read now: its loop waits in a pause, or has ended."""
        live = self.live
        if live is None or live.model is None:
            return False
        return (self.is_training() and self.waiting and self.control.paused) or not self.is_training()

    def begin_read(self):
        """(model, tokenizer) of the newest run for a reader, or None when it may not be read now.
        Every successful call needs one end_read()."""
        if not self.current_weights_readable():
            return None
        self.readers += 1
        return self.live.model, self.live.tokenizer

    def end_read(self) -> None:
        self.readers = max(0, self.readers - 1)
        if self.readers == 0 and self._deferred is not None:
            what, self._deferred = self._deferred, None
            if what == "resume":
                self.resume()
            elif what == "step":
                self.step_once()
            elif what == "stop_best":
                self.stop_keeping_best()

    def set_want_changes(self, on: bool) -> None:
        """Whether the training thread measures each matrix's change since the start."""
        self.want_changes = bool(on)
        if self.live is not None:
            self.live.want_changes = bool(on)

    def toggle_pause(self) -> None:
        if self.is_paused():
            self.resume()
        else:
            self.pause()

    def stop(self) -> bool:
        """Ask the loop to stop after the current step (it keeps a checkpoint). True if asked."""
        if self.is_training():
            self.waiting = False
            self.control.stop()
            return True
        return False

    def set_focus_matrix(self, name: str | None) -> None:
        """The matrix whose full-resolution histogram the loop's snapshots carry."""
        if self.control is not None and name:
            self.control.focus_matrix = name

    # ------------------------------------------------------------------ from the worker (GUI thread)
    def _on_run_started(self, e) -> None:
        self.run_dir = e.run_dir or self.run_dir
        self.runStarted.emit(e)

    def _on_steps(self, metrics) -> None:
        if metrics:
            self.last_speed = float(metrics[-1].tokens_per_s or 0.0)
        self.stepsReady.emit(metrics)

    def _on_paused(self, e) -> None:
        self.waiting = bool(self.control is not None and self.control.paused)
        self.paused.emit(e)

    def _on_details(self, info) -> None:
        self.details = dict(info)

    def _on_run_ended(self, e) -> None:
        self._last_event = e

    def _on_thread_done(self) -> None:
        e = self._last_event
        self.worker = None
        self.control = None
        self.waiting = False
        self._deferred = None
        self.ended.emit(e)
