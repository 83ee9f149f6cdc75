"""Shared setup of the GUI tests: the real MainWindow on a model folder, shut down afterwards and
checked for worker threads left running."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def main_window(qtbot, base_model, size: tuple[int, int] | None = None, timeout_s: float = 30):
    """A shown MainWindow on base_model (no close confirmation); on leaving, every worker must end
    within timeout_s."""
    from finetune_desktop.gui import MainWindow

    w = MainWindow(base_model=base_model)
    w.confirm_close = False
    qtbot.addWidget(w)
    if size is not None:
        w.resize(*size)
    w.show()
    yield w
    assert w.shutdown(timeout_s=timeout_s), "a worker thread did not end"
    assert not w.running_threads(), "a test left a thread running"
    w.close()
