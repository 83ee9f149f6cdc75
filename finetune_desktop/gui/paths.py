"""Where the app keeps its runs, chats and settings: $FINETUNE_DESKTOP_HOME, else the
platform's app-data folder."""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings

ORG = "FinetuneDesktop"
APP = "Finetune Desktop"


def app_home() -> Path:
    env = os.environ.get("FINETUNE_DESKTOP_HOME")
    if env:
        return Path(env).expanduser()
    try:
        from ..training import runs
        fn = getattr(runs, "app_home", None) or getattr(runs, "home_dir", None)
        if fn is not None:
            return Path(fn())
    except Exception:  # noqa: BLE001 - the training package may not offer it
        pass
    try:
        import platformdirs
        return Path(platformdirs.user_data_dir("finetune-desktop", appauthor=False))
    except ImportError:
        return Path.home() / ".finetune-desktop"


def runs_dir() -> Path:
    return app_home() / "runs"


def make_settings() -> QSettings:
    """An INI file under the app home (so tests with a temp FINETUNE_DESKTOP_HOME never touch the
    user's settings)."""
    home = app_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return QSettings(str(home / "settings.ini"), QSettings.Format.IniFormat)
