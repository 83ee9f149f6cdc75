"""Shared test setup: Qt offscreen, app data in a temp dir, small model fixtures."""
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).parent))  # tinymodel.py, gui_helpers.py, test_training_helpers.py

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _app_home(tmp_path, monkeypatch):
    """Every test gets its own FINETUNE_DESKTOP_HOME so nothing touches the user's runs."""
    monkeypatch.setenv("FINETUNE_DESKTOP_HOME", str(tmp_path / "home"))
    yield


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny but real model folder (tests/tinymodel.py), one per test module."""
    from tinymodel import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def pytest_configure(config):
    """What the app and the command line do at start-up: one BLAS thread, malloc tuning."""
    from finetune_desktop.engine.runtime import configure_process

    configure_process()
