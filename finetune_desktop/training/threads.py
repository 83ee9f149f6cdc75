"""How many threads the BLAS library (OpenBLAS under numpy) may use while training or chatting.

The matrices of a few-million-parameter model are small: splitting each multiply over threads
gains little when the machine is idle and loses a lot when other programs (or the app's own UI
thread) want the cores, because OpenBLAS threads spin while they wait for each other. So training
and chat default to one BLAS thread. Set FINETUNE_DESKTOP_BLAS_THREADS=N to choose another number
(0 = leave the library's own setting).

Uses threadpoolctl when it is installed; otherwise calls OpenBLAS directly through ctypes (Linux:
the library is found in /proc/self/maps). Anything else is left alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

ENV = "FINETUNE_DESKTOP_BLAS_THREADS"
DEFAULT_THREADS = 1

_SET = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_")
_GET = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
        "openblas_get_num_threads64_")


def wanted_threads() -> int:
    v = os.environ.get(ENV, "").strip()
    if v:
        try:
            return max(0, int(v))
        except ValueError:
            pass
    return DEFAULT_THREADS


def _openblas_libs():
    paths = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "openblas" in parts[-1].lower():
                    paths.add(parts[-1])
    except OSError:
        return []
    out = []
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SET if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _GET if hasattr(lib, s)), None)
        if setter is not None and getter is not None:
            out.append((setter, getter))
    return out


@contextlib.contextmanager
def blas_threads(n: int | None = None):
    """Limit BLAS threads inside the block (n None: FINETUNE_DESKTOP_BLAS_THREADS or 1; 0: no change)."""
    n = wanted_threads() if n is None else n
    if n <= 0:
        yield
        return
    import numpy  # noqa: F401 - make sure the BLAS library is loaded

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
        return
    libs = _openblas_libs()
    saved = []
    for setter, getter in libs:
        try:
            saved.append((setter, int(getter())))
            setter(ctypes.c_int(n))
        except Exception:  # noqa: BLE001 - an unexpected library: leave it alone
            pass
    try:
        yield
    finally:
        for setter, old in saved:
            try:
                setter(ctypes.c_int(old))
            except Exception:  # noqa: BLE001
                pass
