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
    seen = np.unique(np.asarray(history, dtype=np.int64))
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


def sample_next(logits: np.ndarray, history: Sequence[int], rng: np.random.Generator,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0) -> int:
    """logits (V,) -> one token id."""
    lg = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, repetition_penalty)
    if temperature is None or temperature <= 0.0:
        return int(np.argmax(lg))
    lg = lg / temperature
    lg = filter_top_k(lg, top_k)
    lg = filter_top_p(lg, top_p)
    probs = softmax(lg)
    return int(rng.choice(lg.shape[-1], p=probs))
