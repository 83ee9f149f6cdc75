"""A check for one bug of the Qt binding that would crash the app.

PySide6 6.12.0 wheels (abi3) return the singletons None, True and False to Python without
taking a new reference: every void Qt call and every `Signal.emit()` drops one reference. On
Python 3.12+ these objects are immortal and nothing happens; on 3.11 their reference counts
reach zero after a few thousand calls and the interpreter aborts ("none_dealloc: deallocating
None"). The remedy is the version pin in pyproject.toml (PySide6-Essentials < 6.12 on Python
< 3.12); `binding_problem()` tells a person who installed that release anyway what to do,
instead of letting the app crash minutes later."""
from __future__ import annotations

import sys


def _binding_leaks() -> bool:
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    p = _Probe()
    n0, t0 = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(32):
        p.setObjectName("probe")   # a void method: returns None
        p.ping.emit()              # returns True
    return sys.getrefcount(None) < n0 - 16 or sys.getrefcount(True) < t0 - 16


def binding_problem() -> str | None:
    """One line saying how to fix the installation when the binding has the bug, else None."""
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return None
    try:
        leaks = _binding_leaks()
    except Exception:  # noqa: BLE001 - the probe itself must never stop the app
        return None
    if not leaks:
        return None
    import PySide6

    return (f"PySide6 {PySide6.__version__} has a bug on Python {sys.version_info.major}.{sys.version_info.minor} "
            "that crashes the app after a few minutes; install an earlier release with "
            "pip install 'PySide6-Essentials<6.12' (or use Python 3.12 or later)")
