"""How many threads the BLAS library (OpenBLAS under numpy) may use while training or chatting.

The matrices of a few-million-parameter model are small: splitting each multiply over threads
gains little when the machine is idle and loses a lot when other programs (or the app's own UI
thread) want the cores, because OpenBLAS threads spin while they wait for each other. So training
and chat default to one BLAS thread (the engine runs batch shards in its own threads instead).
Set FINETUNE_DESKTOP_BLAS_THREADS=N to choose another number (0 = leave the library's setting).
"""
from __future__ import annotations

import contextlib
import os

from ..engine.model import ensure_single_threaded_blas

ENV = "FINETUNE_DESKTOP_BLAS_THREADS"
DEFAULT_THREADS = 1


def wanted_threads() -> int:
    v = os.environ.get(ENV, "").strip()
    if v:
        try:
            return max(0, int(v))
        except ValueError:
            pass
    return DEFAULT_THREADS


@contextlib.contextmanager
def blas_threads(n: int | None = None):
    """Mark a training or chat block: BLAS is switched once per process to the wanted number of
    threads (FINETUNE_DESKTOP_BLAS_THREADS, default 1) and never changed back, because changing it
    while another thread is inside a BLAS call can crash OpenBLAS. `n` is accepted for
    compatibility; the process-wide setting wins."""
    ensure_single_threaded_blas()
    yield
