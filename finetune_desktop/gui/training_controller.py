"""One training run at a time: start a new run, continue a saved one, pause, resume, stop.

The controller owns the TrainControl (the loop's stop / pause flags) and the TrainWorker (the
loop on its own thread) and re-emits the worker's signals on the GUI thread, so the window only
connects views to this object. `ended` comes once the training thread has finished, with the
run's last event (RunFinished / RunStopped / RunFailed, or None when the run never started);
by then `details` holds the run's run.json as the loop left it (read on the training thread)."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Signal

from . import bridge
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

    # ------------------------------------------------------------------ state
    def is_training(self) -> bool:
        return self.worker is not None

    def is_paused(self) -> bool:
        return self.control is not None and self.control.paused

    # ------------------------------------------------------------------ starting
    def start(self, data_path: str, base_model: str, cfg_kwargs: dict, valid_path: str | None) -> str:
        """Start a new run; returns its folder. Raises (UserError, ValueError) when it cannot."""
        if self.is_training():
            raise RuntimeError("a run is already in progress")
        run_dir = str(bridge.new_run_dir(Path(data_path).stem))
        fn = bridge.make_train_fn(data_path, run_dir, base_model, cfg_kwargs, valid_path)
        self._launch(fn, run_dir, continuing=False)
        return run_dir

    def continue_run(self, run_dir: str, extra_epochs: int) -> None:
        """Resume a stopped run, or add epochs to a finished one, from its newest checkpoint. The
        run's saved metrics are read on the training thread and sent first (historyReady)."""
        if self.is_training():
            raise RuntimeError("a run is already in progress")
        resume = bridge.make_resume_fn(run_dir, int(extra_epochs))

        def fn(on_event, control):
            try:
                rows = bridge.load_metric_rows(run_dir)
            except Exception:  # noqa: BLE001 - the chart starts empty; resuming says what is wrong
                rows = []
            on_event(RunHistory(tuple(rows)))
            resume(on_event, control)

        self._launch(fn, str(run_dir), continuing=True)

    def _launch(self, fn, run_dir: str, continuing: bool) -> None:
        self.control = bridge.make_control()
        self.run_dir = run_dir
        self._last_event = None
        self.details = {}

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
        w.paused.connect(self.paused)
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
            self.control.resume()
            self.pauseRequested.emit(False)

    def toggle_pause(self) -> None:
        if self.is_paused():
            self.resume()
        else:
            self.pause()

    def stop(self) -> bool:
        """Ask the loop to stop after the current step (it keeps a checkpoint). True if asked."""
        if self.is_training():
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

    def _on_details(self, info) -> None:
        self.details = dict(info)

    def _on_run_ended(self, e) -> None:
        self._last_event = e

    def _on_thread_done(self) -> None:
        e = self._last_event
        self.worker = None
        self.control = None
        self.ended.emit(e)
