"""Process-wide settings of the numeric runtime, applied once by the program's entry points
(the app and the command line call `configure_process()` at start-up), never from inside the
engine's functions: a library call must not change the whole process behind its caller's back.

What it sets:
- numpy's BLAS runs on one thread (FINETUNE_DESKTOP_BLAS_THREADS=N picks another fixed count,
  0 leaves the library alone). The engine runs batch shards in threads of its own, and one-token
  decoding is matrix-vector work, so BLAS threads only add spinning: on a busy 2-core machine a
  training step went from 2 s to 13 s. The count is set once and never changed back, because
  changing OpenBLAS's thread count while another thread is inside a BLAS call can crash it.
- glibc's malloc keeps freed memory for reuse (arrays up to 32 MB come from the heap, up to
  64 MB of free heap is kept). Every training step allocates and frees a few hundred MB of
  activations; with glibc's defaults most of it went back to the kernel after each free and was
  faulted in again page by page: about a quarter of the step time on one thread (48,000 page
  faults and 0.2 s of system time per reference step). Results and peak memory are unchanged.
  FINETUNE_DESKTOP_MALLOC_TUNING=0 turns it off; glibc on Linux only.

`engine_threads()` is how many batch shards the engine runs in parallel
(FINETUNE_DESKTOP_THREADS, default: the CPUs this process may use, at most 8).
"""
from __future__ import annotations

import os
import sys
import threading

ENV_THREADS = "FINETUNE_DESKTOP_THREADS"
ENV_BLAS = "FINETUNE_DESKTOP_BLAS_THREADS"
ENV_MALLOC = "FINETUNE_DESKTOP_MALLOC_TUNING"

_lock = threading.Lock()
_configured = False


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    return int(v) if v.isdigit() else None


def engine_threads() -> int:
    n = _env_int(ENV_THREADS)
    if n:
        return n
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def blas_threads_wanted() -> int:
    """FINETUNE_DESKTOP_BLAS_THREADS (default 1; 0 = leave the library's own setting)."""
    n = _env_int(ENV_BLAS)
    return 1 if n is None else n


def configure_process() -> None:
    """Apply the settings above, once per process (later calls do nothing). Call it before any
    worker thread starts."""
    global _configured
    with _lock:
        if _configured:
            return
        _configured = True
        _limit_blas(blas_threads_wanted())
        if os.environ.get(ENV_MALLOC, "").strip() != "0":
            _tune_glibc_malloc()


def _limit_blas(n: int) -> None:
    if n <= 0:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # results are the same without it, only speed differs
        return
    threadpool_limits(limits=n, user_api="blas")  # kept for the life of the process


def _tune_glibc_malloc() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has no such tuning)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TOP_PAD, 64 << 20)
