"""Stop / pause control for a running training loop.

The loop checks the control between steps, so every request takes effect within one step.
Any thread may call `stop()`, `pause()` and `resume()`; the loop thread calls `checkpoint()`.
"""
from __future__ import annotations

import threading


class TrainControl:
    def __init__(self):
        self._stop = threading.Event()
        self._running = threading.Event()  # set = not paused
        self._running.set()
        self._single_step = threading.Event()
        self._keep_best = threading.Event()
        self.focus_matrix: str | None = None  # the matrix whose histogram snapshots carry (set by the UI)

    # ------------------------------------------------------------------ requests (any thread)
    def stop(self) -> None:
        """Ask the loop to stop after the current step (it saves a checkpoint first)."""
        self._stop.set()
        self._running.set()  # a paused loop wakes up to stop

    def pause(self) -> None:
        if not self._stop.is_set():
            self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def step_once(self) -> None:
        """Run exactly one more step, then pause (step mode). The loop sends that step's
        StepDetail (what each phase computed)."""
        if not self._stop.is_set():
            self._single_step.set()
            self._running.set()

    def stop_keeping_best(self) -> None:
        """Stop, and make the best checkpoint (lowest validation loss) the run's model."""
        self._keep_best.set()
        self.stop()

    @property
    def keep_best(self) -> bool:
        return self._keep_best.is_set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    # ------------------------------------------------------------------ the loop's side
    def detail_wanted(self) -> bool:
        """True for the one step that step mode asked for (the loop sends its details)."""
        return self._single_step.is_set()

    def after_step(self) -> None:
        """The loop calls this after every step: a single step pauses right here."""
        if self._single_step.is_set():
            self._single_step.clear()
            if not self._stop.is_set():
                self._running.clear()

    def wait_while_paused(self, on_pause=None, on_resume=None) -> bool:
        """Block while paused. Returns True if the loop should stop. `on_pause`/`on_resume` are
        called once when a pause starts/ends (so the loop can report it)."""
        if self._stop.is_set():
            return True
        if not self._running.is_set():
            if on_pause:
                on_pause()
            while not self._running.wait(0.1):
                pass
            if on_resume and not self._stop.is_set():
                on_resume()
        return self._stop.is_set()
