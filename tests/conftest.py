"""Shared test setup: Qt offscreen, app data in a temp dir, small model fixtures."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _app_home(tmp_path, monkeypatch):
    """Every test gets its own FINETUNE_DESKTOP_HOME so nothing touches the user's runs."""
    monkeypatch.setenv("FINETUNE_DESKTOP_HOME", str(tmp_path / "home"))
    yield


def pytest_configure(config):
    """What the app and the command line do at start-up: one BLAS thread, malloc tuning."""
    from finetune_desktop.engine.runtime import configure_process

    configure_process()
