"""Batch sharding: the rows of a batch split into contiguous shards that run in parallel threads
(numpy releases the GIL inside matmuls and large ufuncs), with single-threaded BLAS each.

On a small CPU this beats one multi-threaded BLAS: the elementwise work runs in parallel too,
and nothing spins when the machine is busy. The same split is used by the forward, the loss
and the backward, so each row stays on one thread for the whole step."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n worker threads (one per size, made on first use)."""
    with _POOL_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="engine")
        return _POOLS[n]


def row_shards(batch: int, threads: int) -> list[slice]:
    """Contiguous row ranges, as equal as possible, at most `threads` of them."""
    n = max(1, min(threads, batch))
    bounds = np.linspace(0, batch, n + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def run_all(fn: Callable[[int], T], n: int, threads: int | None = None) -> list[T]:
    """[fn(0), ..., fn(n-1)], on up to `threads` threads (default n), results in index order."""
    t = n if threads is None else min(threads, n)
    # inside one of the pool's own threads, work runs serially: waiting on the pool from within
    # it could leave no thread free to do the work
    if t <= 1 or threading.current_thread().name.startswith("engine"):
        return [fn(i) for i in range(n)]
    return list(pool(t).map(fn, range(n)))


def row_generators(rng, batch: int):
    """One child generator per batch row, drawn in row order, so random draws (LoRA dropout) do
    not depend on how the batch is split over threads."""
    if rng is None:
        return None
    return [np.random.default_rng(int(s)) for s in rng.integers(2**63, size=batch)]


def sum_into_first(parts: Sequence[dict]) -> dict:
    """Sum dicts of arrays key by key into parts[0] (in part order, so deterministic), the keys
    split over threads. parts[0]'s arrays must be owned by the caller (they are written)."""
    acc = parts[0]
    n = len(parts)
    if n == 1:
        return acc
    keys = list(acc)

    def add_into(j):
        for k in keys[j::n]:
            a = acc[k]
            for part in parts[1:]:
                np.add(a, part[k], out=a)

    run_all(add_into, n)
    return acc


# ----------------------------------------------------------------------------- one row, several threads
# A batch of fewer rows than threads (one long sequence, as a 0.5B model's batch of 1 x 512 often
# is) would leave threads idle. Inside `spare_threads(k)` the big matrix products of the calling
# thread split their rows (tokens) into k blocks that run in parallel, each on single-threaded
# BLAS: the same result, computed by k cores. The SwiGLU and RMSNorm passes split by rows the same
# way (rowwise below); the attention splits its KV heads instead (engine/split.py).
_local = threading.local()
MIN_SPLIT_ROWS = 16        # fewer rows per block than this: not worth a thread hand-off


class spare_threads:
    """Context manager: matmul() in this thread splits over k threads (k <= 1: no split)."""

    def __init__(self, k: int):
        self.k = k

    def __enter__(self):
        self.prev = getattr(_local, "k", 1)
        # never from one of the pool's own threads: it would wait on the pool it is part of
        _local.k = 1 if threading.current_thread().name.startswith("engine") else self.k
        return self

    def __exit__(self, *exc):
        _local.k = self.prev
        return False


def spare() -> int:
    """How many threads this thread's work may split over right now (1: no split)."""
    return getattr(_local, "k", 1)


def _row_blocks(M: int) -> list[slice] | None:
    """The blocks of rows that M rows split into over this thread's spare threads, or None when
    they stay on this thread (no spare threads, or too few rows to be worth a hand-off)."""
    k = spare()
    if k <= 1 or M < 2 * MIN_SPLIT_ROWS:
        return None
    b = np.linspace(0, M, min(k, M // MIN_SPLIT_ROWS) + 1).astype(int)
    return [slice(lo, hi) for lo, hi in zip(b[:-1], b[1:])]


def matmul(a, b, out=None):
    """a (M, K) @ b (K, N), split by rows of a over the spare threads when there are any."""
    blocks = _row_blocks(a.shape[0]) if a.ndim == 2 else None
    if blocks is None:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    run_all(lambda i: np.matmul(a[blocks[i]], b, out=out[blocks[i]]), len(blocks))
    return out


def matmul_add(a, b, out) -> None:
    """out += a (M, K) @ b (K, N), by blocks of rows over the spare threads when there are any
    (the product and the addition of each block on the same thread)."""
    def block(a, out):
        out += np.matmul(a, b)

    rowwise(block, (a,), (out,))


def rowwise(fn, ins, outs) -> None:
    """fn(*ins, *outs) on 2-D (rows, features) views of the arrays (..., features), writing outs
    in place; over this thread's spare threads by blocks of rows when there are any (a one-row
    batch's elementwise passes), else in one call."""
    ins2 = [a.reshape(-1, a.shape[-1]) for a in ins]
    outs2 = [a.reshape(-1, a.shape[-1]) for a in outs]
    if not all(np.may_share_memory(o, a) for o, a in zip(outs2, outs)):  # a caller's bug: writes would be lost
        raise ValueError("rowwise outputs must reshape to 2-D without a copy")
    blocks = _row_blocks(outs2[0].shape[0])
    if blocks is None:
        fn(*ins2, *outs2)
        return
    run_all(lambda i: fn(*[a[blocks[i]] for a in ins2 + outs2]), len(blocks))
