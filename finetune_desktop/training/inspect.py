"""Looking inside: the loss of every token of an example, for the per-token loss view and for
step mode. Plain numpy on the model's own forward pass, so the numbers are the engine's."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.ops import IGNORE_INDEX

TOP_K = 3


@dataclass(frozen=True)
class TokenLosses:
    ids: tuple[int, ...]
    tokens: tuple[str, ...]                  # each token's text, as it appears
    losses: tuple[float | None, ...]         # -log p(token | the tokens before it); None where the loss does not count
    probs: tuple[float | None, ...]          # p(token | the tokens before it); None for the first token
    top: tuple[tuple[tuple[str, float], ...], ...]   # the model's TOP_K guesses for each position (text, p)

    @property
    def mean_loss(self) -> float:
        v = [x for x in self.losses if x is not None]
        return float(np.mean(v)) if v else float("nan")


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_losses(model, tokenizer, input_ids, labels) -> TokenLosses:
    """Every token of one example with its loss under `model` (grey where the loss does not
    count), its probability and the model's top guesses there."""
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    with np.errstate(over="ignore"):
        logits = model.logits(ids[None])[0]  # (T, V)
    lp = log_softmax_rows(logits)
    T = len(ids)
    losses, probs, top = [], [], []
    for t in range(T):
        if t == 0:
            losses.append(None)
            probs.append(None)
            top.append(())
            continue
        row = lp[t - 1]
        p = float(np.exp(row[ids[t]]))
        probs.append(p)
        losses.append(float(-row[ids[t]]) if labels[t] != IGNORE_INDEX else None)
        best = np.argpartition(-row, TOP_K)[:TOP_K]
        best = best[np.argsort(-row[best])]
        top.append(tuple((tokenizer.decode([int(b)]), float(np.exp(row[b]))) for b in best))
    tokens = tuple(tokenizer.decode([int(i)]) for i in ids)
    return TokenLosses(tuple(int(i) for i in ids), tokens, tuple(losses), tuple(probs), tuple(top))
