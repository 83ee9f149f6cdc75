"""Where the app keeps its runs, chats and settings: training.runs decides
($FINETUNE_DESKTOP_HOME, else the platform's app-data folder); the GUI only adds its settings file."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings

from ..training.runs import app_home, runs_home

ORG = "FinetuneDesktop"
APP = "Finetune Desktop"

__all__ = ["APP", "ORG", "app_home", "runs_dir", "chats_dir", "make_settings"]


def runs_dir() -> Path:
    return runs_home()


def chats_dir() -> Path:
    """Chats with models that are not a run (the base model, a model folder)."""
    return app_home() / "chats"


def make_settings() -> QSettings:
    """An INI file under the app home (so tests with a temp FINETUNE_DESKTOP_HOME never touch the
    user's settings)."""
    home = app_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return QSettings(str(home / "settings.ini"), QSettings.Format.IniFormat)
