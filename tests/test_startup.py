"""Starting the app on a Linux desktop without Qt's X11 helper libraries: one line naming the
packages, never Qt's abort. Uses the real dynamic linker (ldd) on real files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_desktop.gui.startup import install_hint, missing_libraries, window_system_problem

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("ldd"),
                                reason="the check is for Linux (it uses ldd)")


def test_a_library_linked_against_a_missing_one_is_reported(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the test libraries")
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "main.c").write_text("int dep(void); int f(void) { return dep(); }\n")
    # a library name no system has, so the test does not depend on what this machine installed
    name = "libfinetune-desktop-test-missing.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / "dep.c"),
                    f"-Wl,-soname,{name}"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libplugin.so"), str(tmp_path / "main.c"),
                    str(tmp_path / name)], check=True)
    (tmp_path / name).unlink()
    assert missing_libraries([tmp_path / "libplugin.so"]) == [name]
    hint = install_hint(["libxcb-keysyms.so.1", "libxcb-cursor.so.0"])
    assert "apt-get install libxcb-cursor0 libxcb-keysyms1" in hint
    assert "dnf install xcb-util-cursor xcb-util-keysyms" in hint


def test_offscreen_needs_nothing_more(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert window_system_problem() is None


def test_the_app_says_what_to_install_or_starts(monkeypatch, tmp_path):
    """With the xcb platform: if this machine lacks libraries, `finetune-desktop` prints one line
    and exits 1 at once; if it has them all, the check finds nothing."""
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    problem = window_system_problem()
    if problem is None:
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT), QT_QPA_PLATFORM="xcb", DISPLAY=":987",
               FINETUNE_DESKTOP_HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "finetune_desktop"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=str(ROOT))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Qt cannot open a window") and "apt-get install" in lines[0]


def test_the_installed_qt_binding_is_one_the_app_can_run_on():
    """pyproject.toml keeps PySide6 below 6.12 on Python < 3.12 (its reference-count bug aborts the
    app there); the installed binding must pass the app's own check."""
    from finetune_desktop.gui.qtcompat import _binding_leaks, binding_problem

    assert binding_problem() is None
    if sys.version_info < (3, 12):
        assert not _binding_leaks()
