"""The training loss over a sharded batch: cross-entropy (ops.cross_entropy_*) per batch-row
shard in parallel, combined into the mean over every counted token."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .parallel import run_all


@dataclass
class LossCache:
    """What loss_forward keeps for loss_backward: per-shard softmax caches and the token counts."""
    shards: list
    caches: list
    counted: int        # positions that count towards the loss
    correct: int        # of those, how many the model's top guess got right
    buffer: np.ndarray | None = None  # the logits array, reused for the gradient


def loss_forward(logits, labels, shards: list[slice], overwrite_logits: bool = False) -> tuple[float, LossCache]:
    """Cross-entropy of logits (B, T, V) against labels (B, T) with HF semantics (shifted inside,
    -100 ignored, mean over counted tokens), one shard per thread. With overwrite_logits=True the
    logits array is used as scratch memory (softmax, then the gradient): pass it only when it is
    not needed afterwards."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[None]
    inplace = overwrite_logits and logits.flags.c_contiguous
    parts = run_all(lambda i: ops.cross_entropy_forward(logits[shards[i]], labels[shards[i]], inplace=inplace),
                    len(shards))
    counted = sum(c[5] for _, c in parts)
    loss = sum(l * c[5] for l, c in parts) / counted if counted else 0.0
    return float(loss), LossCache(list(shards), [c for _, c in parts], counted, sum(c[6] for _, c in parts),
                                  logits if inplace else None)


def loss_backward(lc: LossCache, dtype=np.float32) -> np.ndarray:
    """-> dlogits (B, T, V), the gradient of loss_forward's mean loss (spends the cache)."""
    shape = (sum(c[0][0] for c in lc.caches),) + tuple(lc.caches[0][0][1:])
    out = lc.buffer if lc.buffer is not None else np.empty(shape, dtype)
    denom = max(lc.counted, 1)
    run_all(lambda i: ops.cross_entropy_backward(lc.caches[i], dtype=dtype, denom=denom, out=out[lc.shards[i]]),
            len(lc.shards))
    lc.caches = []
    return out


def head_chunk_rows(vocab_size: int) -> int:
    """Rows of logits made at a time by head_loss: about 32 MB, but at least 256 rows, because
    every chunk reads the whole output matrix (545 MB for a 152k vocabulary) from memory."""
    return max(256, min(1024, (8 << 20) // max(vocab_size, 1)))


@dataclass
class HeadLoss:
    """Model.head_loss's result: the mean loss and counts, and the gradient to go on backward with."""
    loss: float
    counted: int                 # positions whose next token counts
    correct: int                 # of those, how many the model's top guess got right
    dh: list                     # per shard: gradient of the final hidden states (B, T, C), or None
    dW_out: np.ndarray | None    # the output layer's gradient (full fine-tuning), else None
    row_losses: np.ndarray | None = None  # (T,) loss of each counted token of batch row 0, NaN elsewhere
