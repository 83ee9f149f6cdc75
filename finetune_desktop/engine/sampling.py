"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus) and a
repetition penalty (CTRL / HF semantics). Randomness comes in as an explicit numpy Generator."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Seen tokens: positive logits divided by penalty, negative ones multiplied (as HF does)."""
    if penalty == 1.0 or not len(history):
        return logits
    out = logits.copy()
    seen = np.fromiter(set(history), dtype=np.int64)  # each seen token once (order does not matter)
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int | None) -> np.ndarray:
    if not k or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float | None) -> np.ndarray:
    """Keep the smallest set of tokens whose probability mass reaches p (always at least one)."""
    if p is None or p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order].astype(np.float64))
    cum = np.cumsum(probs)
    keep = cum - probs < p  # a token is kept if the mass before it is still below p
    keep[0] = True
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def _nucleus(z: np.ndarray, e: np.ndarray, total: float, top_p: float) -> np.ndarray:
    """Token ids that filter_top_p keeps (the same set), without sorting the whole vocabulary.
    e = exp(z - max z), total = e.sum(). Only tokens with e above a small threshold are sorted;
    every other token has a strictly lower logit, so when the nucleus ends inside the sorted
    ones it is exactly the full sort's nucleus. Otherwise a lower threshold, then the full sort."""
    for threshold in (1e-4, 1e-9):
        cand = np.flatnonzero(e >= threshold)
        if len(cand) == len(z):
            break
        order = cand[np.lexsort((cand, -z[cand]))]  # descending, ties by lower id (a stable sort)
        probs = e[order] / total
        keep = (np.cumsum(probs) - probs) < top_p
        keep[0] = True
        k = int(keep.sum())
        if k < len(cand):
            return order[:k]
    return np.flatnonzero(np.isfinite(filter_top_p(z, top_p)))


def next_token_distribution(logits: np.ndarray, history: Sequence[int], temperature: float,
                            top_k: int | None = None, top_p: float | None = None,
                            repetition_penalty: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The sampling distribution as (token ids ascending, probabilities): the same tokens and
    probabilities as softmax(filter_top_p(filter_top_k(penalised logits / temperature))), but
    only the kept tokens are listed. temperature must be > 0."""
    z = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, repetition_penalty)
    z = z / temperature
    z = filter_top_k(z, top_k)
    e = np.exp(z - z.max())  # 0 for tokens top-k removed
    if top_p is not None and top_p < 1.0:
        ids = np.sort(_nucleus(z, e, float(e.sum()), top_p))
    else:
        ids = np.flatnonzero(e > 0.0)  # all but what top-k removed (and -inf logits)
    e = e[ids]
    return ids, e / e.sum()


def sample_next(logits: np.ndarray, history: Sequence[int], rng: np.random.Generator,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0) -> int:
    """logits (V,) -> one token id.

    The draw is the one numpy's `rng.choice(V, p=probs)` makes over the full vocabulary (one
    uniform number against the cumulative distribution in token order); tokens outside the
    top-k / top-p set have probability 0 there, so listing only the kept ones gives the same
    token for the same generator state, in a fraction of the time."""
    if temperature is None or temperature <= 0.0:
        lg = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, repetition_penalty)
        return int(np.argmax(lg))
    ids, probs = next_token_distribution(logits, history, temperature, top_k, top_p, repetition_penalty)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(ids) - 1)])
