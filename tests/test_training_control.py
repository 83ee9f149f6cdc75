"""Pause, resume and stop from another thread, each taking effect within one step."""
from __future__ import annotations

import threading
import time

import pytest
from test_training_helpers import run_loop, tiny_model_folder

from finetune_desktop.training.config import TrainConfig
from finetune_desktop.training.control import TrainControl
from finetune_desktop.training.events import RunStopped, StepMetrics
from finetune_desktop.training.runs import read_run_json

LONG = TrainConfig(method="lora", epochs=200, batch_size=4, learning_rate=1e-3)  # far more steps than the test waits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


class Runner:
    """Runs the loop on a thread and records the steps it reports."""

    def __init__(self, folder, run_dir, control):
        self.steps = []
        self.events = []
        self.result = None
        self.control = control
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(folder, run_dir), daemon=True)

    def _on_event(self, e):
        self.events.append(e)
        if isinstance(e, StepMetrics):
            with self.cond:
                self.steps.append(e.step)
                self.cond.notify_all()

    def _run(self, folder, run_dir):
        self.result, _ = run_loop(folder, run_dir, LONG, control=self.control, on_event=self._on_event)

    def wait_steps(self, n, timeout=20.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.steps) >= n, timeout)
        assert ok, f"only {len(self.steps)} steps after {timeout}s"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.control.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "training thread still running"


def test_pause_resume_stop(folder, tmp_path):
    control = TrainControl()
    with Runner(folder, tmp_path / "run", control) as r:
        r.wait_steps(3)
        control.pause()
        assert control.paused
        at_pause = len(r.steps)
        time.sleep(0.6)  # many step-times long
        paused_steps = len(r.steps)
        assert paused_steps <= at_pause + 1, "pause took more than one step to take effect"
        time.sleep(0.4)
        assert len(r.steps) == paused_steps, "steps ran while paused"
        control.resume()
        r.wait_steps(paused_steps + 3)
        control.stop()
        at_stop = len(r.steps)
        r.thread.join(30)
        assert not r.thread.is_alive()
    assert r.result.status == "stopped"
    assert r.result.step <= at_stop + 1
    assert isinstance(r.events[-1], RunStopped)
    assert r.steps == list(range(1, len(r.steps) + 1))
    assert read_run_json(tmp_path / "run")["status"] == "stopped"


def test_stop_while_paused(folder, tmp_path):
    control = TrainControl()
    with Runner(folder, tmp_path / "run", control) as r:
        r.wait_steps(2)
        control.pause()
        time.sleep(0.3)
        n = len(r.steps)
        control.stop()
        r.thread.join(30)
        assert not r.thread.is_alive()
        assert len(r.steps) == n
    assert r.result.status == "stopped" and r.result.checkpoint


def test_control_flags():
    c = TrainControl()
    assert not c.paused and not c.stop_requested
    c.pause()
    assert c.paused
    c.resume()
    assert not c.paused
    c.pause()
    c.stop()
    assert c.stop_requested and not c.paused  # a stop wakes a paused loop
    assert c.wait_while_paused() is True
    c2 = TrainControl()
    c2.pause()
    calls = []
    t = threading.Thread(target=lambda: calls.append(c2.wait_while_paused(lambda: calls.append("p"), lambda: calls.append("r"))))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    c2.resume()
    t.join(5)
    assert not t.is_alive() and calls == ["p", "r", False]
