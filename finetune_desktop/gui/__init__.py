"""The desktop app (PySide6 + pyqtgraph). Qt is imported only when something here is used.

    from finetune_desktop.gui import MainWindow
    w = MainWindow()                 # the embedded base model
    w = MainWindow(base_model=path)  # any HF folder (tests use a tiny one)
"""
from __future__ import annotations

__all__ = ["MainWindow", "run_app"]


def __getattr__(name):
    if name == "MainWindow":
        from .main_window import MainWindow
        return MainWindow
    if name == "run_app":
        from .app import run_app
        return run_app
    raise AttributeError(name)
