"""Generation: the transformer's forward pass for one sequence with a KV cache, on weights packed
once for decoding. The same maths as Model.forward (tests check the logits agree), arranged for
one token at a time, where numpy's per-call overhead and reading the weights are all that is left.

    dw = pack(params, config)                 # explicit weights (LoRA already merged by the caller)
    for tok in generate(dw, prompt_ids, max_new_tokens=50, temperature=0.0, stop_ids=(2,)): ...

Packing: every matrix is transposed for x @ W and gets its bias as one extra row (the input
vectors end in a constant 1), so a projection with its bias is one call. Folded in: each RMSNorm
weight into the rows of the matrix after it (a norm costs one scalar), the attention scale
1/sqrt(hd) into the query columns, and a factor 1/2 into the gate columns (SiLU is computed as
g/2 * (1 + tanh(g/2)), which cannot overflow). The output head is stored (C, V) so the last
matrix-vector product streams rows. RoPE at one position is one (hd, hd) rotation matrix shared
by every layer and head.

Shape legend: T new tokens, S keys (cache + T), C hidden, V vocab, I SwiGLU width,
H query heads, KVH key/value heads, G = H // KVH, hd head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import ops
from .config import ModelConfig
from .parallel import run_all
from .runtime import engine_threads
from .sampling import sample_next


@dataclass
class KVCache:
    """Per-layer keys (after RoPE) and values, each (B, KVH, S_max, hd); `length` positions filled."""
    k: list
    v: list
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=np.float32) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.hd)
        L = cfg.num_hidden_layers
        return cls([np.zeros(shape, dtype) for _ in range(L)], [np.zeros(shape, dtype) for _ in range(L)], 0)


@dataclass(frozen=True)
class DecodeWeights:
    config: ModelConfig
    layers: tuple            # per layer (A (C+1, nq+2nkv), O (nq+1, C), GU (C+1, 2I), D (I+1, C))
    embed: np.ndarray        # (V, C) token embeddings (unscaled)
    W_out: np.ndarray        # (C, V) output head with the final norm folded in
    dtype: type


def _with_bias(Wt, b, dt):
    """Wt (in, out), b (out,) or None -> (in + 1, out)."""
    out = np.empty((Wt.shape[0] + 1, Wt.shape[1]), dt)
    out[:-1] = Wt
    out[-1] = 0.0 if b is None else b
    return out


def pack(params: dict[str, np.ndarray], cfg: ModelConfig) -> DecodeWeights:
    """The decode weights of `params` (HF names; any LoRA must already be merged in)."""
    p = params
    dt = p["model.embed_tokens.weight"].dtype
    nq = cfg.num_attention_heads * cfg.hd

    def one(l: int):
        pre = f"model.layers.{l}."
        a, m = pre + "self_attn.", pre + "mlp."
        Wqkv = np.concatenate([p[a + "q_proj.weight"], p[a + "k_proj.weight"], p[a + "v_proj.weight"]])
        bqkv = (np.concatenate([p[a + "q_proj.bias"], p[a + "k_proj.bias"], p[a + "v_proj.bias"]])
                if a + "q_proj.bias" in p else None)
        Wgu = np.concatenate([p[m + "gate_proj.weight"], p[m + "up_proj.weight"]])
        bgu = np.concatenate([p[m + "gate_proj.bias"], p[m + "up_proj.bias"]]) if m + "gate_proj.bias" in p else None
        wn1 = p[pre + "input_layernorm.weight"][:, None]
        wn2 = p[pre + "post_attention_layernorm.weight"][:, None]
        A = _with_bias(Wqkv.T * wn1, bqkv, dt)
        A[:, :nq] *= 1.0 / np.sqrt(cfg.hd)
        GU = _with_bias(Wgu.T * wn2, bgu, dt)
        GU[:, :Wgu.shape[0] // 2] *= 0.5
        return (A, _with_bias(p[a + "o_proj.weight"].T, p.get(a + "o_proj.bias"), dt), GU,
                _with_bias(p[m + "down_proj.weight"].T, p.get(m + "down_proj.bias"), dt))

    # the layers are packed in parallel (the copies are memory-bound numpy work that releases the
    # GIL): on a 135M model this is what the first chat token waits for
    layers = run_all(one, cfg.num_hidden_layers, engine_threads())
    W_out = p["model.embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    W_out = np.ascontiguousarray((W_out * p["model.norm.weight"][None, :]).T)  # (C, V)
    return DecodeWeights(cfg, tuple(layers), p["model.embed_tokens.weight"], W_out, dt)


def _rms(x, eps: float, inv_c: float):
    """x (..., C) / rms(x): the norm's weight is folded into the next matrix."""
    return x * (1.0 / np.sqrt(np.einsum("...c,...c->...", x, x)[..., None] * inv_c + eps))


def prefill(dw: DecodeWeights, ids: Sequence[int], cache: KVCache) -> np.ndarray:
    """Run the T tokens `ids` (one sequence) at positions cache.length.. through every layer,
    filling the cache -> the next-token logits after the last of them (V,)."""
    cfg = dw.config
    dt = dw.dtype
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
    C, I, H, KVH, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.n_kv_heads, cfg.hd
    G, nq, nkv = H // KVH, H * hd, KVH * hd
    eps, inv_c = cfg.rms_norm_eps, 1.0 / C
    pos0 = cache.length
    S = pos0 + T
    cos, sin = ops.rope_tables(cfg.inv_freq(), np.arange(pos0, S), dt)  # (T, hd)
    bias = ops.attention_mask_bias(T, S, dt, window=cfg.sliding_window)[0, 0]  # (T, S)
    ones = np.ones((T, 1), dt)
    x = dw.embed[ids].astype(dt)  # (T, C)
    for l, (A, O, GU, D) in enumerate(dw.layers):
        qkv = np.concatenate([_rms(x, eps, inv_c), ones], axis=1) @ A  # (T, nq + 2 nkv), q pre-scaled
        q = qkv[:, :nq].reshape(T, H, hd).transpose(1, 0, 2)  # (H, T, hd)
        k = qkv[:, nq:nq + nkv].reshape(T, KVH, hd).transpose(1, 0, 2)  # (KVH, T, hd)
        q, _ = ops.rope_forward(q, cos, sin)
        k, _ = ops.rope_forward(k, cos, sin)
        cache.k[l][0, :, pos0:S] = k
        cache.v[l][0, :, pos0:S] = qkv[:, nq + nkv:].reshape(T, KVH, hd).transpose(1, 0, 2)
        kc, vc = cache.k[l][0, :, :S], cache.v[l][0, :, :S]  # (KVH, S, hd)
        att = q.reshape(KVH, G * T, hd) @ kc.swapaxes(-1, -2)  # (KVH, G*T, S)
        att = att.reshape(KVH, G, T, S) + bias
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        ao = (att.reshape(KVH, G * T, S) @ vc).reshape(H, T, hd).transpose(1, 0, 2).reshape(T, nq)
        x = x + np.concatenate([ao, ones], axis=1) @ O
        gu = np.concatenate([_rms(x, eps, inv_c), ones], axis=1) @ GU  # gate/2 and up, with biases
        g2 = gu[:, :I]
        act = g2 * (1.0 + np.tanh(g2)) * gu[:, I:]
        x = x + np.concatenate([act, ones], axis=1) @ D
    cache.length = S
    return _rms(x[-1], eps, inv_c) @ dw.W_out


class _Buffers:
    """Input vectors of the one-token path's projections, each ending in the constant 1 that
    multiplies the bias row: normed hidden (C+1), attention output (H*hd+1), SwiGLU (I+1)."""

    def __init__(self, cfg: ModelConfig, dt):
        self.h, self.ao, self.act = (np.empty(n + 1, dt) for n in
                                     (cfg.hidden_size, cfg.num_attention_heads * cfg.hd, cfg.intermediate_size))
        for b in (self.h, self.ao, self.act):
            b[-1] = 1.0
        hd = cfg.hd
        half = hd // 2
        self.perm = np.concatenate([np.arange(half, hd), np.arange(half)])
        self.sign = np.concatenate([-np.ones(half), np.ones(half)]).astype(dt)
        self.idx = np.arange(hd)


def step(dw: DecodeWeights, token: int, cache: KVCache, cos, sin, bufs: _Buffers) -> np.ndarray:
    """One new token through all layers with the KV cache -> next-token logits (V,). About 25
    numpy calls per layer: at one token per step, call overhead is what is left besides reading
    the weights."""
    cfg = dw.config
    C, I = cfg.hidden_size, cfg.intermediate_size
    eps, inv_c = cfg.rms_norm_eps, 1.0 / C
    KVH, hd, H = cfg.n_kv_heads, cfg.hd, cfg.num_attention_heads
    G = H // KVH
    nq, nkv = H * hd, KVH * hd
    h, ao, act = bufs.h, bufs.ao, bufs.act
    hC, aoq, actI = h[:C], ao[:nq].reshape(KVH, G, hd), act[:I]
    pos = cache.length
    S = pos + 1
    s0 = 0 if cfg.sliding_window is None else max(0, S - cfg.sliding_window)
    # RoPE at this position as one (hd, hd) matrix, shared by every layer and head:
    # x * cos + rotate_half(x) * sin == x @ R, with rotate_half(x) == x[perm] * sign
    R = np.zeros((hd, hd), dw.dtype)
    R[bufs.idx, bufs.idx] = cos
    R[bufs.perm, bufs.idx] = bufs.sign * sin
    x = dw.embed[token].copy()  # (C,)
    for l, (A, O, GU, D) in enumerate(dw.layers):
        np.multiply(x, 1.0 / math.sqrt(float(x @ x) * inv_c + eps), out=hC)  # RMSNorm (weight in A)
        qkv = h @ A  # q (pre-scaled), k, v with biases
        qk = qkv[:nq + nkv].reshape(H + KVH, hd) @ R  # RoPE on all query and key heads at once
        kc, vc = cache.k[l][0], cache.v[l][0]  # (KVH, S_max, hd)
        kc[:, pos] = qk[H:]
        vc[:, pos] = qkv[nq + nkv:].reshape(KVH, hd)
        att = qk[:H].reshape(KVH, G, hd) @ kc[:, s0:S].swapaxes(-1, -2)  # (KVH, G, S)
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        np.matmul(att, vc[:, s0:S], out=aoq)
        x += ao @ O
        np.multiply(x, 1.0 / math.sqrt(float(x @ x) * inv_c + eps), out=hC)
        gu = h @ GU  # gate/2 and up, with biases
        g2 = gu[:I]
        np.tanh(g2, out=actI)  # silu(g) = g/2 * (1 + tanh(g/2))
        actI += 1.0
        actI *= g2
        actI *= gu[I:]
        x += act @ D
    cache.length = S
    x *= 1.0 / math.sqrt(float(x @ x) * inv_c + eps)
    return x @ dw.W_out  # (V,)


def generate(dw: DecodeWeights, prompt_ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             seed: int | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Stream new token ids one by one. temperature 0 = greedy. Stops after max_new_tokens or when
    a stop id is produced (the stop id itself is not yielded)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("generate needs at least one prompt token")
    return _generate(dw, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_ids)


def _generate(dw, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_ids):
    cfg = dw.config
    rng = np.random.default_rng(seed)
    total = len(prompt) + max_new_tokens
    cache = KVCache.empty(cfg, 1, total, dw.dtype)
    with np.errstate(over="ignore"):
        last = prefill(dw, prompt, cache)
    cos_all, sin_all = ops.rope_tables(cfg.inv_freq(), np.arange(total), dw.dtype)
    history = list(prompt)
    stops = set(int(s) for s in stop_ids)
    bufs = _Buffers(cfg, dw.dtype)
    for _ in range(max_new_tokens):
        nxt = sample_next(last, history, rng, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty)
        if nxt in stops:
            return
        yield nxt
        history.append(nxt)
        if len(history) >= total:
            return  # max_new_tokens reached: no need to run the model once more
        last = step(dw, nxt, cache, cos_all[cache.length], sin_all[cache.length], bufs)
