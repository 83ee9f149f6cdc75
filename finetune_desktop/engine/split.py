"""Work inside one batch shard split over spare threads (see parallel.spare_threads): with a
one-row batch, the attention's KV heads (each with the query heads that share it) run in
parallel, since they do not interact. The matrix products split in parallel.matmul."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .parallel import run_all, spare


@dataclass
class HeadSplit:
    """The attention cache of a batch shard whose KV heads were split over spare threads."""
    parts: list      # slices of the KV-head axis
    caches: list     # ops.attention_forward's cache of each part


def attention_forward_split(q, k, v, mask_bias):
    """ops.attention_forward; when this thread has spare threads (a one-row batch), the KV heads
    (each with its query heads) run in parallel, since they do not interact."""
    KVH = q.shape[1]
    n = min(spare(), KVH)
    if n <= 1:
        return ops.attention_forward(q, k, v, mask_bias)
    parts = [slice(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(KVH), n)]
    res = run_all(lambda i: ops.attention_forward(q[:, parts[i]], k[:, parts[i]], v[:, parts[i]], mask_bias), n)
    return np.concatenate([r[0] for r in res], axis=1), HeadSplit(parts, [r[1] for r in res])


def attention_backward_split(da, cache):
    if not isinstance(cache, HeadSplit):
        return ops.attention_backward(da, cache)
    res = run_all(lambda i: ops.attention_backward(np.ascontiguousarray(da[:, cache.parts[i]]), cache.caches[i]),
                  len(cache.parts))
    return tuple(np.concatenate([r[j] for r in res], axis=1) for j in range(3))
