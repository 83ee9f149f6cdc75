"""AdamW, learning-rate schedules and gradient clipping as small pure functions.

Weight decay is decoupled (AdamW) and applied to matrices only: never to biases, norm
weights or other vectors (as nanoGPT's configure_optimizers does)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def adamw_init(params: dict[str, np.ndarray]) -> dict:
    """Optimizer state: first/second moments per tensor and the step count."""
    return {"step": 0,
            "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}}


def adamw_step(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], state: dict,
               lr: float, cfg: AdamWConfig) -> dict[str, float]:
    """Update params in place. Returns per-tensor relative update size ||dW|| / ||W||."""
    state["step"] += 1
    t = state["step"]
    b1, b2 = cfg.beta1, cfg.beta2
    bc1 = 1.0 - b1 ** t
    bc2 = 1.0 - b2 ** t
    rel = {}
    for name, g in grads.items():
        p = params[name]
        m, v = state["m"][name], state["v"][name]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        upd = (m / bc1) / (np.sqrt(v / bc2) + cfg.eps)
        if cfg.weight_decay and p.ndim >= 2:
            upd += cfg.weight_decay * p
        upd *= lr
        pn = float(np.sqrt(np.vdot(p, p)))
        rel[name] = float(np.sqrt(np.vdot(upd, upd))) / (pn + 1e-12)
        p -= upd
    return rel


def global_grad_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_grads(grads: dict[str, np.ndarray], max_norm: float | None) -> float:
    """Scale all grads in place so their global L2 norm is at most max_norm. Returns the norm before."""
    norm = global_grad_norm(grads)
    if max_norm and max_norm > 0 and norm > max_norm:
        s = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= s
    return norm


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str = "linear",
          warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for 0-based `step` of `total_steps`: linear warmup, then constant, linear
    decay or cosine decay down to base_lr * min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, max(0.0, (step - warmup_steps) / span))
    lo = base_lr * min_lr_ratio
    if schedule == "linear":
        return lo + (base_lr - lo) * (1.0 - frac)
    if schedule == "cosine":
        return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r} (constant, linear or cosine)")
