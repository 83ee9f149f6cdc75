"""Train/validation split and length-bucketed batches. Pure functions; randomness comes only from
the seed (and the epoch), so a run can be reproduced and resumed exactly."""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import numpy as np

from .types import IGNORE_INDEX, Batch, EncodedExample

T = TypeVar("T")

BUCKET_BATCHES = 50   # examples are sorted by length within chunks of this many batches


def _rng(seed: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (2 ** 63), *[int(m) % (2 ** 63) for m in more]])


def split_train_valid(items: Sequence[T], val_split: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out round(val_split * n) items (at least 1 when val_split > 0 and n >= 2, and always
    leaving at least one for training) chosen by seed. Both parts keep the file order.
    Deterministic: the same items, fraction and seed give the same split."""
    n = len(items)
    if not 0.0 <= val_split < 1.0 or math.isnan(val_split):
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    k = int(round(val_split * n))
    if val_split > 0 and n >= 2:
        k = max(k, 1)
    k = min(k, max(n - 1, 0))
    if k == 0:
        return list(items), []
    held = np.zeros(n, dtype=bool)
    held[_rng(seed, 0x5EED).permutation(n)[:k]] = True
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index lists, one per batch: shuffle by (seed, epoch), sort by length (longest first) within
    chunks of BUCKET_BATCHES batches so rows of a batch have similar lengths, then shuffle the
    order of the batches. Every index appears exactly once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(lengths)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    lengths = np.asarray(lengths)
    perm = rng.permutation(n)
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for c in range(0, n, chunk):
        idx = perm[c:c + chunk]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches.extend(idx[b:b + batch_size] for b in range(0, len(idx), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def make_batches(examples: Sequence[EncodedExample], batch_size: int, seed: int, epoch: int,
                 pad_id: int = 0) -> list[Batch]:
    """All examples (those with trained tokens) in length-bucketed, right-padded batches.
    input_ids/labels int64 (B, T) with T the longest row of the batch; labels -100 on padding;
    attention_mask int8 1 on real tokens. num_trained_tokens counts what the loss counts (labels
    are shifted inside the loss, so each row's first position never counts).
    Deterministic given (seed, epoch)."""
    usable = [ex for ex in examples if ex.num_trained_tokens > 0]
    lengths = [len(ex) for ex in usable]
    out = []
    for idx in batch_order(lengths, batch_size, seed, epoch):
        rows = [usable[i] for i in idx]
        t = max(len(r) for r in rows)
        b = len(rows)
        ids = np.full((b, t), pad_id, dtype=np.int64)               # (B, T)
        labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)      # (B, T)
        mask = np.zeros((b, t), dtype=np.int8)                      # (B, T)
        for j, r in enumerate(rows):
            n = len(r)
            ids[j, :n] = r.input_ids
            labels[j, :n] = r.labels
            mask[j, :n] = 1
        trained = int(np.count_nonzero(labels[:, 1:] != IGNORE_INDEX))
        out.append(Batch(ids, labels, mask, trained, tuple(r.line for r in rows)))
    return out


def padded_tokens(lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0) -> int:
    """Tokens processed per epoch including padding, with the same bucketing as make_batches."""
    lengths = np.asarray(lengths)
    return int(sum(len(idx) * int(lengths[idx].max()) for idx in batch_order(lengths, batch_size, seed, epoch)))
