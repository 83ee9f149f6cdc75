"""LoRA: low-rank adapters on frozen linear weights.

For a target weight W (out, in):  y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T
with A (r, in) random (Kaiming-uniform like PEFT), B (out, r) zero, scale = alpha / r.
B = 0 means the adapted model starts exactly at the pre-trained one. Only A and B are trained.

Names follow PEFT: "model.layers.0.self_attn.q_proj.lora_A.weight" internally, with the
"base_model.model." prefix added in adapter files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .parallel import matmul, matmul_add

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8                                  # rank of the update; higher = more capacity, more memory
    alpha: float = 16.0                         # scale = alpha / r
    dropout: float = 0.0                        # dropout on the adapter input during training
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": int(self.r),
            "lora_alpha": self.alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path,
        }

    @classmethod
    def from_peft_dict(cls, d: dict, source: str = "adapter_config.json") -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
            if d.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported")
        if d.get("bias", "none") != "none":
            raise ValueError(f"{source}: bias={d['bias']!r} is not supported (only 'none')")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            raise ValueError(f"{source}: rank_pattern / alpha_pattern are not supported")
        tm = d.get("target_modules") or DEFAULT_TARGETS
        if isinstance(tm, str):
            raise ValueError(f"{source}: regex target_modules are not supported")
        return cls(r=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])),
                   dropout=float(d.get("lora_dropout", 0.0)), target_modules=tuple(tm))


def lora_names(weight_name: str) -> tuple[str, str]:
    """'model.layers.0.self_attn.q_proj.weight' -> (..q_proj.lora_A.weight, ..q_proj.lora_B.weight)."""
    stem = weight_name[: -len(".weight")]
    return stem + ".lora_A.weight", stem + ".lora_B.weight"


def init_lora(params: dict, cfg: LoraConfig, num_layers: int, seed: int = 0, dtype=np.float32) -> dict:
    """Create A (random) and B (zero) for every targeted projection. Returns name -> array."""
    rng = np.random.default_rng(seed)
    out = {}
    for l in range(num_layers):
        for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _maybe_add(out, params, f"model.layers.{l}.self_attn.{mod}.weight", mod, cfg, rng, dtype)
        for mod in ("gate_proj", "up_proj", "down_proj"):
            _maybe_add(out, params, f"model.layers.{l}.mlp.{mod}.weight", mod, cfg, rng, dtype)
    return out


def _maybe_add(out, params, wname, mod, cfg, rng, dtype):
    if mod not in cfg.target_modules:
        return
    W = params[wname]
    n_out, n_in = W.shape
    an, bn = lora_names(wname)
    # PEFT's default init: kaiming_uniform(a=sqrt(5)) on A -> U(-1/sqrt(in), 1/sqrt(in)); B = 0
    bound = 1.0 / np.sqrt(n_in)
    out[an] = rng.uniform(-bound, bound, size=(cfg.r, n_in)).astype(dtype)  # (r, in)
    out[bn] = np.zeros((n_out, cfg.r), dtype=dtype)  # (out, r)


def lora_delta(A, B, scale):
    """The full-size update this adapter adds to W: scale * B @ A (out, in)."""
    return (scale * (B @ A)).astype(A.dtype)


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Return a new params dict with W + scale * B @ A for every adapted weight (inputs untouched)."""
    merged = dict(params)
    for name in params:
        if not name.endswith(".weight"):
            continue
        an, bn = lora_names(name)
        if an in lora:
            merged[name] = params[name] + lora_delta(lora[an], lora[bn], scale)
    return merged


def unmerge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Inverse of merge_lora: W - scale * B @ A."""
    out = dict(params)
    for name in params:
        if not name.endswith(".weight"):
            continue
        an, bn = lora_names(name)
        if an in lora:
            out[name] = params[name] - lora_delta(lora[an], lora[bn], scale)
    return out


# ---------------------------------------------------------------- merged weights for a step
MERGE_MAX_WEIGHTS = 16 << 20   # merged copies beyond this many weights (64 MB in float32) are not made


def merging_pays_off(n_tokens: int, groups: list[tuple[int, int, int]]) -> bool:
    """Whether folding scale * B @ A into the weights once per step costs less than running the
    adapters beside the frozen weights for n_tokens tokens. groups: (out, in, rank) of every
    adapted projection group. Making the merged copies costs about out x in x (2r + 8)
    operations per group whatever the batch; the adapter path costs about
    n_tokens x (6 in r + 2 r out + 16 out + 4 in). So short batches on large models keep the
    separate path.

    The copies also cost memory and memory traffic, a second set of every adapted weight, so
    they are made only for small models (at most MERGE_MAX_WEIGHTS weights). Measured on 2
    cores, LoRA r16 on all seven projections, one step: the embedded 4M model at 8 x 100 tokens
    167 ms merged vs 173 ms beside; a SmolLM2-135M shape at 4 x 256, 4.6-4.9 s merged vs
    4.2-4.6 s beside (peak 2.7 vs 2.2 GB); a Qwen2.5-0.5B shape at 1 x 512, 17.8-18.4 s vs
    16.1-16.8 s (peak 5.0 vs 3.5 GB)."""
    if sum(o * i for o, i, _ in groups) > MERGE_MAX_WEIGHTS:
        return False
    merge = sum(o * i * (2 * r + 8) for o, i, r in groups)
    adapter = sum(6 * i * r + 2 * r * o + 16 * o + 4 * i for o, i, r in groups)
    return n_tokens * adapter >= merge


def merged_group_weight(W_fused, stems, out_sizes: dict, lora: dict, scale: float):
    """A copy of a fused group weight (the stems' weights stacked by rows) with each adapted
    stem's scale * B @ A added to its rows."""
    W = W_fused.copy()
    off = 0
    for st in stems:
        n_out = out_sizes[st]
        an, bn = lora_names(st + ".weight")
        if an in lora:
            W[off:off + n_out] += lora_delta(lora[an], lora[bn], scale)
        off += n_out
    return W


# ---------------------------------------------------------------- forward/backward pair
def lora_forward(x, A, B, scale, dropout=0.0, rng=None):
    """x (..., in) -> scale * (drop(x) @ A.T) @ B.T (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    mask = None
    if dropout > 0.0 and rng is not None:
        if isinstance(rng, list):  # one generator per batch row (the model's sharded path)
            draws = np.stack([g.random(x.shape[1:]) for g in rng]).reshape(x2.shape)
        else:
            draws = rng.random(x2.shape)
        mask = (draws >= dropout).astype(x.dtype) / (1.0 - dropout)
        x2 = x2 * mask
    u = x2 @ A.T  # (N, r)
    y = matmul(u * scale, B.T)  # (N, out); the scale on the small factor, not on the (N, out) result
    return y.reshape(*x.shape[:-1], B.shape[0]), (x2, u, A, B, scale, mask, x.shape)


def lora_backward(dy, cache):
    """-> dx (..., in), dA (r, in), dB (out, r)."""
    x2, u, A, B, scale, mask, xshape = cache
    dy2 = dy.reshape(-1, dy.shape[-1]) * scale  # (N, out), contiguous (dy is often a column slice)
    dB = dy2.T @ u  # (out, r)
    du = matmul(dy2, B)  # (N, r)
    dA = du.T @ x2  # (r, in)
    dx = matmul(du, A)
    if mask is not None:
        dx *= mask
    return dx.reshape(xshape), dA, dB


# ---------------------------------------------------------------- several adapters on one input
# q/k/v (and gate/up) share their input. Their adapters' A matrices are stacked so the input is
# read by one product x @ [A_q; A_k; A_v].T instead of three, and the backward's input gradient
# is one product du @ [A_q; A_k; A_v] added once, instead of three products and three additions.
# The skinny products are what makes the adapter path slow at 135M-500M sizes: each one streams a
# whole (tokens, hidden) array for 16 columns of work. The B products stay one per projection
# (a block-diagonal B would triple their work). No dropout here: with dropout each projection
# draws its own mask (as PEFT does), so that case keeps lora_forward per projection.
def group_forward(x, y, parts, scale):
    """x (..., in); y (..., out_total) the group's base output, to which every adapter's
    scale * (x @ A.T) @ B.T is added in its columns. parts: [(column offset, A (r, in), B (out, r))]
    -> cache for group_backward."""
    x2 = x.reshape(-1, x.shape[-1])
    A = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])  # (R, in)
    u = matmul(x2, A.T)  # (N, R)
    us = u * x2.dtype.type(scale)
    y2 = y.reshape(-1, y.shape[-1])
    c = 0
    for off, _, B in parts:
        r, n = B.shape[1], B.shape[0]
        matmul_add(us[:, c:c + r], B.T, y2[:, off:off + n])
        c += r
    return x2, u, A


def group_backward(dy, dx, parts, cache, scale):
    """dy (..., out_total) the group's output gradient; dx (..., in) the input gradient through the
    frozen weights, to which the adapters' share is added in place (None: not needed)
    -> [(dA, dB)] in the order of parts."""
    x2, u, A = cache
    sc = x2.dtype.type(scale)
    dy2 = dy.reshape(-1, dy.shape[-1])
    du = np.empty(u.shape, u.dtype)  # (N, R)
    dBs, c = [], 0
    for off, _, B in parts:
        r, n = B.shape[1], B.shape[0]
        dys = dy2[:, off:off + n]
        dB = dys.T @ u[:, c:c + r]  # (out, r)
        dB *= sc
        dBs.append(dB)
        du[:, c:c + r] = matmul(dys, B)
        c += r
    du *= sc
    dA = du.T @ x2  # (R, in)
    if dx is not None:
        matmul_add(du, A, dx.reshape(-1, dx.shape[-1]))
    out, c = [], 0
    for (_, _, B), dB in zip(parts, dBs):
        r = B.shape[1]
        out.append((dA[c:c + r], dB))
        c += r
    return out


# ---------------------------------------------------------------- a projection group's adapters
def adapters_forward(x, y, adapted, lora: dict, scale: float, dropout: float, rng):
    """Add the adapters of one projection group, beside its frozen weights, to the group's output
    y. adapted: [(stem, column offset in y, A's name, B's name)]. With dropout each adapter draws
    its own mask (lora_forward, one at a time); without, they run together (group_forward).
    -> (mode, saved) for adapters_backward."""
    if dropout > 0:
        each = []
        for _, off, an, bn in adapted:
            B = lora[bn]
            dy, lcache = lora_forward(x, lora[an], B, scale, dropout, rng)
            y[..., off:off + B.shape[0]] += dy
            each.append(lcache)
        return "each", each
    return "group", group_forward(x, y, [(off, lora[an], lora[bn]) for _, off, an, bn in adapted], scale)


def adapters_backward(mode: str, adapted, saved, lora: dict, scale: float, dy, dx, x, grads: dict) -> None:
    """The adapter gradients of one projection group into grads, and the adapters' share of the
    input gradient added to dx (None: not needed). mode "merged": the forward folded the adapters
    into the weights (see merged_group_weight), so dx already includes them and only the adapter
    gradients are computed here, from the group input x."""
    sc = dy.dtype.type(scale)
    if mode == "group":
        parts = [(off, lora[an], lora[bn]) for _, off, an, bn in adapted]
        for (_, _, an, bn), (dA, dB) in zip(adapted, group_backward(dy, dx, parts, saved, sc)):
            grads[an], grads[bn] = dA, dB
        return
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    for i, (_, off, an, bn) in enumerate(adapted):
        A, B = lora[an], lora[bn]
        n_out = B.shape[0]
        if mode == "merged":
            dys = dy2[:, off:off + n_out]
            grads[bn] = (dys.T @ (x2 @ A.T)) * sc
            grads[an] = ((dys @ B).T @ x2) * sc
            continue
        ldx, grads[an], grads[bn] = lora_backward(dy[..., off:off + n_out], saved[i])
        if dx is not None:
            dx += ldx
