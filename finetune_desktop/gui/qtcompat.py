"""Work-arounds for bugs in the Qt binding that would otherwise crash the app.

PySide6 6.12.0 wheels (abi3) return the singletons None, True and False to Python without
taking a new reference: every call of a void Qt method (`w.update()`, `w.setVisible()`), every
Python override Qt calls (`paintEvent`) and every `Signal.emit()` drops one reference. On
Python 3.12+ these objects are immortal and nothing happens; on 3.11 their reference counts
reach zero after a few thousand calls and the interpreter aborts ("none_dealloc: deallocating
None"). We detect the leak at import and, only when it is there, give those static singletons
a very large reference count so it can never reach zero. They are never freed anyway, so the
extra references cost nothing. (The proper fix is a PySide6 release without the bug, or
Python 3.12+.)"""
from __future__ import annotations

import sys

_checked = False
LEAKS = False


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


def apply() -> None:
    global _checked, LEAKS
    if _checked:
        return
    _checked = True
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    try:
        LEAKS = _binding_leaks()
    except Exception:  # noqa: BLE001 - the probe must never stop the app
        return
    if LEAKS:
        import ctypes
        for obj in (None, True, False, NotImplemented, Ellipsis):
            ref = ctypes.c_ssize_t.from_address(id(obj))   # ob_refcnt: the first field of every PyObject
            ref.value += 1 << 48


apply()
