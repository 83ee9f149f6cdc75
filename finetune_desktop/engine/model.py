"""The decoder-only transformer of the HF Llama family (Llama, Qwen2, Mistral), in numpy.

Parameters live in a flat dict keyed by HF tensor names ("model.layers.0.self_attn.q_proj.weight").
`forward` returns logits and an explicit cache; `backward` walks the same calls in reverse and
returns gradients keyed by the same names. With LoRA attached, the base weights are frozen:
only the adapter matrices get gradients, and no full-size weight gradient is ever computed.

Shape legend: B batch, T tokens, S keys (cache + T), C hidden, V vocab, I SwiGLU width,
H query heads, KVH key/value heads, G = H // KVH, hd head dim.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import ops
from .checkpoint import (atomic_write_json, load_peft_adapter, load_weights, make_temp_dir_beside,
                         model_folder,
                         replace_dir_atomically, save_peft_adapter, write_safetensors,
                         write_safetensors_bf16)
from .config import ModelConfig, ModelFormatError
from .lora import LoraConfig, init_lora, lora_backward, lora_delta, lora_forward, lora_names, merge_lora

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the config implies, with its shape."""
    C, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.hd
    q, kv = cfg.num_attention_heads * hd, cfg.n_kv_heads * hd
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, C)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        s[p + "input_layernorm.weight"] = (C,)
        s[p + "post_attention_layernorm.weight"] = (C,)
        s[p + "self_attn.q_proj.weight"] = (q, C)
        s[p + "self_attn.k_proj.weight"] = (kv, C)
        s[p + "self_attn.v_proj.weight"] = (kv, C)
        s[p + "self_attn.o_proj.weight"] = (C, q)
        if cfg.has_qkv_bias:
            s[p + "self_attn.q_proj.bias"] = (q,)
            s[p + "self_attn.k_proj.bias"] = (kv,)
            s[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.has_o_bias:
            s[p + "self_attn.o_proj.bias"] = (C,)
        s[p + "mlp.gate_proj.weight"] = (I, C)
        s[p + "mlp.up_proj.weight"] = (I, C)
        s[p + "mlp.down_proj.weight"] = (C, I)
        if cfg.mlp_bias:
            s[p + "mlp.gate_proj.bias"] = (I,)
            s[p + "mlp.up_proj.bias"] = (I,)
            s[p + "mlp.down_proj.bias"] = (C,)
    return s


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random initial weights (for pretraining from scratch and for tests). Norms start at 1,
    biases at 0, output projections scaled down by sqrt(2 L) as in GPT-2."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype)
        elif name.endswith(".bias"):
            out[name] = np.zeros(shape, dtype)
        else:
            s = std / np.sqrt(2 * cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = (rng.standard_normal(shape) * s).astype(dtype)
    return out


def _row_generators(rng, batch: int):
    """One child generator per batch row, drawn in row order, so dropout masks do not depend on
    how the batch is split over threads."""
    if rng is None:
        return None
    return [np.random.default_rng(int(s)) for s in rng.integers(2**63, size=batch)]


def default_threads() -> int:
    env = os.environ.get("FINETUNE_DESKTOP_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="engine")
        return _POOLS[n]


_BLAS_DONE = False
_BLAS_LOCK = threading.Lock()


def ensure_single_threaded_blas() -> None:
    """Switch numpy's BLAS to one thread, once per process, and never back.

    The engine runs batch shards in its own threads, and one-token decoding is matrix-vector
    work, so BLAS threads only add spinning (on a busy 2-core machine a training step went from
    2 s to 13 s). The switch is made once and never undone because changing OpenBLAS's thread
    count while another thread is inside a BLAS call can crash the process; the app calls this at
    start-up, before any worker thread exists. FINETUNE_DESKTOP_BLAS_THREADS=N (N >= 1) picks
    another fixed count; 0 leaves the library alone."""
    global _BLAS_DONE
    with _BLAS_LOCK:
        if _BLAS_DONE:
            return
        _BLAS_DONE = True
        env = os.environ.get("FINETUNE_DESKTOP_BLAS_THREADS", "").strip()
        n = int(env) if env.isdigit() else 1
        if n <= 0:
            return
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional at run time: results are the same, only speed differs
            return
        threadpool_limits(limits=n, user_api="blas")  # kept for the life of the process


_MALLOC_DONE = False


def tune_allocator() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Every training step allocates and frees a few hundred MB of activations. With glibc's
    defaults most of that memory is returned to the kernel after each free and faulted back in,
    page by page, on the next allocation: on one thread that was about a quarter of the step
    time (48,000 page faults and 0.2 s of system time per reference step). Arrays up to 32 MB
    now come from the heap, and up to 64 MB of free heap is kept. This changes no results and
    not the peak memory, only the time. Once per process; glibc on Linux only;
    FINETUNE_DESKTOP_MALLOC_TUNING=0 turns it off."""
    global _MALLOC_DONE
    if _MALLOC_DONE:
        return
    _MALLOC_DONE = True
    if not sys.platform.startswith("linux") or os.environ.get("FINETUNE_DESKTOP_MALLOC_TUNING", "").strip() == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has no such tuning)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TOP_PAD, 64 << 20)


@dataclass
class LossCache:
    """What loss_forward keeps for loss_backward: per-shard softmax caches and the token counts."""
    shards: list
    caches: list
    counted: int        # positions that count towards the loss
    correct: int        # of those, how many the model's top guess got right
    buffer: np.ndarray | None = None  # the logits array, reused for the gradient


@dataclass
class KVCache:
    """Per-layer keys/values after RoPE: k, v (B, KVH, S_max, hd); `length` positions filled."""
    k: list
    v: list
    length: int = 0


class Model:
    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], check: bool = True):
        config.validate()
        self.config = config
        self.params = params
        if check:
            self._check_params()
        self.dtype = params["model.embed_tokens.weight"].dtype
        self.lora: dict[str, np.ndarray] | None = None
        self.lora_config: LoraConfig | None = None
        self.source: str | None = None
        self._rope_cache: dict = {}
        self._fuse_cache: dict = {}
        self._cache_fused = False   # set while generating (weights cannot change meanwhile)
        self.threads = default_threads()  # batch shards run in parallel (see forward)

    # ------------------------------------------------------------------ construction
    def _check_params(self, source: str = "weights") -> None:
        exp = expected_shapes(self.config)
        if self.config.tie_word_embeddings:
            self.params.pop("lm_head.weight", None)
        for name, shape in exp.items():
            if name not in self.params:
                raise ModelFormatError(f"{source}: tensor {name!r} is missing")
            if tuple(self.params[name].shape) != shape:
                raise ModelFormatError(
                    f"{source}: tensor {name!r} has shape {tuple(self.params[name].shape)}, "
                    f"config.json implies {shape}")
        extra = [k for k in self.params if k not in exp and not k.endswith("rotary_emb.inv_freq")]
        if extra:
            raise ModelFormatError(f"{source}: unexpected tensor {extra[0]!r} (not part of this architecture)")
        for k in [k for k in self.params if k.endswith("rotary_emb.inv_freq")]:
            del self.params[k]

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, dtype=np.float32) -> "Model":
        return cls(config, init_params(config, seed=seed, dtype=dtype))

    @classmethod
    def from_pretrained(cls, folder) -> "Model":
        """Load an HF folder (config.json + safetensors). Given a run folder, its `model/` is loaded."""
        folder = model_folder(folder)
        if not folder.exists():
            raise ModelFormatError(f"{folder}: no such folder")
        cfg = ModelConfig.from_json_file(folder / "config.json")
        params = load_weights(folder)
        m = cls.__new__(cls)
        Model.__init__(m, cfg, params, check=False)
        m._check_params(source=str(folder))
        m.source = str(folder)
        return m

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, lora_config: LoraConfig, seed: int = 0) -> None:
        self._fuse_cache.clear()
        self.lora_config = lora_config
        self.lora = init_lora(self.params, lora_config, self.config.num_hidden_layers, seed=seed, dtype=self.dtype)

    def load_adapter(self, folder) -> None:
        cfg, lora = load_peft_adapter(folder)
        ref = init_lora(self.params, cfg, self.config.num_hidden_layers, seed=0, dtype=self.dtype)
        for k, v in ref.items():
            if k not in lora:
                raise ModelFormatError(f"{folder}: adapter tensor {k!r} is missing")
            if lora[k].shape != v.shape:
                raise ModelFormatError(f"{folder}: adapter tensor {k!r} has shape {lora[k].shape}, expected {v.shape}")
        self._fuse_cache.clear()
        self.lora_config = cfg
        self.lora = {k: lora[k].astype(self.dtype) for k in ref}

    def merged_params(self) -> dict[str, np.ndarray]:
        """Weights with the LoRA update folded in (a new dict; the model is unchanged)."""
        if self.lora is None:
            return dict(self.params)
        return merge_lora(self.params, self.lora, self.lora_config.scale)

    def merge_lora(self) -> None:
        """Fold the adapters into the weights and drop them."""
        self.params = self.merged_params()
        self.lora, self.lora_config = None, None
        self._fuse_cache.clear()

    def trainable_params(self) -> dict[str, np.ndarray]:
        """The live arrays an optimizer updates in place: the adapters with LoRA, else everything."""
        return self.lora if self.lora is not None else self.params

    # ------------------------------------------------------------------ helpers
    def _rope(self, positions: np.ndarray):
        key = (int(positions[0]), len(positions))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = ops.rope_tables(self.config.inv_freq(), positions, self.dtype)
        return self._rope_cache[key]

    def _fused(self, stems: tuple[str, ...]):
        """Weight (sum out, in) and bias of one or more projections that share an input, so
        q/k/v and gate/up each run as one larger matmul. Cached while the weights are unchanged."""
        p = self.params
        if len(stems) == 1:
            return p[stems[0] + ".weight"], p.get(stems[0] + ".bias")
        ent = self._fuse_cache.get(stems)
        Ws = [p[s + ".weight"] for s in stems]
        if ent is not None and all(a is b for a, b in zip(ent[2], Ws)):
            return ent[0], ent[1]
        W = np.concatenate(Ws, axis=0)
        bs = [p.get(s + ".bias") for s in stems]
        b = np.concatenate(bs) if all(x is not None for x in bs) else None
        # Frozen base weights (LoRA training, generation) never change in place, so the fused
        # copy can be kept; full fine-tuning updates them in place every step, so it cannot.
        if self.lora is not None or self._cache_fused:
            self._fuse_cache[stems] = (W, b, Ws)
        return W, b

    def _layer_groups(self, l: int) -> tuple[tuple[str, ...], ...]:
        """The projection groups of layer l that share an input: q/k/v, o, gate/up, down."""
        pre = f"model.layers.{l}."
        return ((pre + "self_attn.q_proj", pre + "self_attn.k_proj", pre + "self_attn.v_proj"),
                (pre + "self_attn.o_proj",), (pre + "mlp.gate_proj", pre + "mlp.up_proj"), (pre + "mlp.down_proj",))

    def _lora_effective_weights(self, n_tokens: int, train: bool):
        """With LoRA and no dropout, W + scale * B @ A for every adapted projection group, made once
        per forward (shared by the batch shards), or None when that would cost more than it saves.

        Then the forward is one matmul per group instead of the base matmul plus the adapter's
        two skinny ones and an add over the whole output, and the backward's input gradient is
        one matmul too. Making the merged copies costs about out x in x (2r + 8) operations per
        group whatever the batch, while the adapter path costs about n_tokens x (6 in r + 2 r out
        + 16 out + 4 in): so short batches on large models keep the separate path. The adapter
        gradients are the same either way (computed in _proj_backward)."""
        if self.lora is None or (train and self.lora_config.dropout > 0):
            return None
        groups, merge_cost, lora_cost = [], 0, 0
        for l in range(self.config.num_hidden_layers):
            for stems in self._layer_groups(l):
                ranks = [self.lora[lora_names(st + ".weight")[0]].shape[0] for st in stems
                         if lora_names(st + ".weight")[0] in self.lora]
                if not ranks:
                    continue
                out = sum(self.params[st + ".weight"].shape[0] for st in stems)
                inp = self.params[stems[0] + ".weight"].shape[1]
                r = max(ranks)
                groups.append(stems)
                merge_cost += out * inp * (2 * r + 8)
                lora_cost += 6 * inp * r + 2 * r * out + 16 * out + 4 * inp
        if not groups or n_tokens * lora_cost < merge_cost:
            return None
        scale = self.lora_config.scale

        def merged(stems):
            W, _ = self._fused(stems)
            W = W.copy()
            off = 0
            for st in stems:
                n_out = self.params[st + ".weight"].shape[0]
                an, bn = lora_names(st + ".weight")
                if an in self.lora:
                    W[off:off + n_out] += lora_delta(self.lora[an], self.lora[bn], scale)
                off += n_out
            return W

        for stems in groups:  # fill the fused-weight cache first (it is not thread-safe)
            self._fused(stems)
        n = max(1, min(self.threads, len(groups)))
        Ws = list(_pool(n).map(merged, groups)) if n > 1 else [merged(g) for g in groups]
        return dict(zip(groups, Ws))

    def _proj_forward(self, stems: tuple[str, ...], x, train: bool, rng, eff=None):
        """x (..., in) -> y (..., sum of the projections' out sizes), with LoRA added per projection
        (folded into the weight when `eff`, from _lora_effective_weights, has this group)."""
        W, b = self._fused(stems)
        if eff is not None and stems in eff:
            y, lc = ops.linear_forward(x, eff[stems], b)
            lcaches, off = [], 0
            for stem in stems:
                n_out = self.params[stem + ".weight"].shape[0]
                if lora_names(stem + ".weight")[0] in self.lora:
                    lcaches.append((stem, off, n_out, None))  # None: merged into the weight
                off += n_out
            return y, (stems, lc, lcaches)
        y, lc = ops.linear_forward(x, W, b)
        lcaches = []
        if self.lora is not None:
            off = 0
            for stem in stems:
                n_out = self.params[stem + ".weight"].shape[0]
                an, bn = lora_names(stem + ".weight")
                if an in self.lora:
                    dy, lcache = lora_forward(x, self.lora[an], self.lora[bn], self.lora_config.scale,
                                              self.lora_config.dropout if train else 0.0, rng)
                    y[..., off:off + n_out] += dy
                    lcaches.append((stem, off, n_out, lcache))
                off += n_out
        return y, (stems, lc, lcaches)

    def _proj_backward(self, dy, cache, grads, need_dx=True):
        stems, lc, lcaches = cache
        frozen = self.lora is not None
        dx, dW, db = ops.linear_backward(dy, lc, need_dW=not frozen, need_dx=need_dx)
        if not frozen:
            off = 0
            for stem in stems:
                n_out = self.params[stem + ".weight"].shape[0]
                grads[stem + ".weight"] = dW[off:off + n_out] if len(stems) > 1 else dW
                if db is not None:
                    grads[stem + ".bias"] = db[off:off + n_out] if len(stems) > 1 else db
                off += n_out
        for stem, off, n_out, lcache in lcaches:
            an, bn = lora_names(stem + ".weight")
            if lcache is None:  # merged: dx above already went through W + scale * B @ A
                x2 = lc[0].reshape(-1, lc[0].shape[-1])
                dys = dy.reshape(-1, dy.shape[-1])[:, off:off + n_out]
                A, B = self.lora[an], self.lora[bn]
                sc = self.dtype.type(self.lora_config.scale)
                grads[bn] = (dys.T @ (x2 @ A.T)) * sc
                grads[an] = ((dys @ B).T @ x2) * sc
                continue
            ldx, dA, dB = lora_backward(dy[..., off:off + n_out], lcache)
            grads[an] = dA
            grads[bn] = dB
            if need_dx:
                dx += ldx
        return dx

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None,
                train: bool = False, rng=None, last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V) [or (B, 1, V) with last_only], cache for backward.

        With kv_cache, the new tokens are appended at positions cache.length.. and attend to
        everything before them. attention_mask (B, S) marks real (1) and padding (0) keys.

        A batch of several sequences is split into `self.threads` shards that run in parallel
        threads, each with single-threaded BLAS (numpy releases the GIL in matmuls and large
        ufuncs). On a small CPU this beats one multi-threaded BLAS: the elementwise work runs in
        parallel too, and there is no BLAS thread spinning when the machine is busy."""
        tune_allocator()
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        n = min(self.threads, ids.shape[0])
        if train and rng is None and self.lora is not None and self.lora_config.dropout > 0:
            raise ValueError("LoRA dropout needs a random generator: pass rng=np.random.default_rng(seed)")
        eff = self._lora_effective_weights(ids.size, train) if kv_cache is None else None
        if kv_cache is not None or n <= 1:
            return self._forward_one(ids, attention_mask, kv_cache, train,
                                     _row_generators(rng, ids.shape[0]) if train else None, last_only, eff=eff)
        shards = self._row_shards(ids.shape[0])
        rows = _row_generators(rng, ids.shape[0])
        rngs = [None if rows is None else rows[s] for s in shards]
        masks = [None if attention_mask is None else np.asarray(attention_mask)[s] for s in shards]
        ensure_single_threaded_blas()
        # each shard writes its logits straight into its rows of one array (no concatenation)
        logits = np.empty((ids.shape[0], 1 if last_only else ids.shape[1], self.config.vocab_size), self.dtype)
        outs = list(_pool(n).map(lambda i: self._forward_one(ids[shards[i]], masks[i], None, train, rngs[i],
                                                             last_only, logits_out=logits[shards[i]], eff=eff),
                                 range(n)))
        return logits, ("sharded", shards, [o[1] for o in outs])

    def _forward_one(self, ids, attention_mask=None, kv_cache: KVCache | None = None,
                     train: bool = False, rng=None, last_only: bool = False, logits_out=None, eff=None):
        cfg = self.config
        p = self.params
        B, T = ids.shape
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
        KVH, hd, H = cfg.n_kv_heads, cfg.hd, cfg.num_attention_heads
        G = H // KVH
        pos0 = kv_cache.length if kv_cache is not None else 0
        S = pos0 + T
        cos, sin = self._rope(np.arange(pos0, S))
        mask_bias = ops.attention_mask_bias(T, S, self.dtype, key_mask=attention_mask, window=cfg.sliding_window)

        x, c_emb = ops.embedding_forward(ids, p["model.embed_tokens.weight"])  # (B, T, C)
        layer_caches = []
        for l in range(cfg.num_hidden_layers):
            pre = f"model.layers.{l}."
            # --- attention block
            h, c_ln1 = ops.rmsnorm_forward(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
            g_qkv, g_o, g_gu, g_d = self._layer_groups(l)
            qkv, c_qkv = self._proj_forward(g_qkv, h, train, rng, eff)  # (B, T, (H+2KVH)*hd)
            nq, nkv = H * hd, KVH * hd
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
            q = q.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KVH, G, T, hd)
            k = k.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3)  # (B, KVH, T, hd)
            v = v.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3)
            q, c_rq = ops.rope_forward(q, cos, sin)
            k, c_rk = ops.rope_forward(k, cos, sin)
            if kv_cache is not None:
                kv_cache.k[l][:, :, pos0:S] = k
                kv_cache.v[l][:, :, pos0:S] = v
                k_all, v_all = kv_cache.k[l][:, :, :S], kv_cache.v[l][:, :, :S]
            else:
                k_all, v_all = k, np.ascontiguousarray(v)
            a, c_att = ops.attention_forward(q, k_all, v_all, mask_bias)  # (B, KVH, G, T, hd)
            a = a.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
            o, c_o = self._proj_forward(g_o, a, train, rng, eff)  # (B, T, C)
            x = x + o
            # --- MLP block
            h2, c_ln2 = ops.rmsnorm_forward(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            gu, c_gu = self._proj_forward(g_gu, h2, train, rng, eff)  # (B, T, 2I)
            I = gu.shape[-1] // 2
            act, c_act = ops.swiglu_forward(gu[..., :I], gu[..., I:])
            del gu
            d, c_d = self._proj_forward(g_d, act, train, rng, eff)  # (B, T, C)
            x = x + d
            if kv_cache is None:
                layer_caches.append((c_ln1, c_qkv, c_rq, c_rk, c_att, c_o, c_ln2, c_gu, c_act, c_d))
        if kv_cache is not None:
            kv_cache.length = S
        if last_only:
            x = x[:, -1:]
        hN, c_lnf = ops.rmsnorm_forward(x, p["model.norm.weight"], cfg.rms_norm_eps)
        W_out = p["model.embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
        logits, c_head = ops.linear_forward(hN, W_out, out=logits_out)  # (B, T, V)
        cache = (c_emb, layer_caches, c_lnf, c_head, (B, T, KVH, G, hd))
        return logits, cache

    # ------------------------------------------------------------------ backward
    def backward(self, dlogits, cache) -> dict[str, np.ndarray]:
        """Mirror of forward, call by call in reverse. Returns grads keyed by HF names (for
        trainable tensors only); a tied lm_head's gradient is folded into embed_tokens.
        Sharded batches run their shards in parallel and the gradients are summed in shard order
        (deterministic)."""
        if cache[0] == "sharded":
            _, shards, caches = cache
            n = len(shards)
            parts = list(_pool(n).map(lambda i: self._backward_one(dlogits[shards[i]], caches[i]), range(n)))
            grads = parts[0]
            if n > 1:
                # sum the shards' gradients in shard order (deterministic), the keys split over
                # the threads; every array in parts[0] is freshly made by this backward, so the
                # sums go into it in place
                keys = list(grads)

                def add_into(j):
                    for k in keys[j::n]:
                        acc = grads[k]
                        for part in parts[1:]:
                            np.add(acc, part[k], out=acc)

                list(_pool(n).map(add_into, range(n)))
            return grads
        return self._backward_one(dlogits, cache)

    def _backward_one(self, dlogits, cache) -> dict[str, np.ndarray]:
        cfg = self.config
        c_emb, layer_caches, c_lnf, c_head, (B, T, KVH, G, hd) = cache
        H = KVH * G
        frozen = self.lora is not None
        grads: dict[str, np.ndarray] = {}
        dhN, dW_out, _ = ops.linear_backward(dlogits, c_head, need_dW=not frozen)
        dx, dnorm = ops.rmsnorm_backward(dhN, c_lnf, need_dw=not frozen)
        if not frozen:
            grads["model.norm.weight"] = dnorm
        for l in reversed(range(cfg.num_hidden_layers)):
            pre = f"model.layers.{l}."
            (c_ln1, c_qkv, c_rq, c_rk, c_att, c_o, c_ln2, c_gu, c_act, c_d) = layer_caches[l]
            # --- MLP block
            dact = self._proj_backward(dx, c_d, grads)
            dg, du = ops.swiglu_backward(dact, c_act)
            dh2 = self._proj_backward(np.concatenate([dg, du], axis=-1), c_gu, grads)
            dres, dw = ops.rmsnorm_backward(dh2, c_ln2, need_dw=not frozen)
            if not frozen:
                grads[pre + "post_attention_layernorm.weight"] = dw
            dx = dx + dres
            # --- attention block
            da = self._proj_backward(dx, c_o, grads)  # (B, T, H*hd)
            da = da.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KVH, G, T, hd)
            dq, dk, dv = ops.attention_backward(da, c_att)
            dq = ops.rope_backward(dq, c_rq)
            dk = ops.rope_backward(dk, c_rk)
            dqkv = np.empty((B, T, (H + 2 * KVH) * hd), dtype=dq.dtype)  # (B, T, (H+2KVH)*hd)
            nq, nkv = H * hd, KVH * hd
            dqkv[..., :nq] = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, nq)
            dqkv[..., nq:nq + nkv] = dk.transpose(0, 2, 1, 3).reshape(B, T, nkv)
            dqkv[..., nq + nkv:] = dv.transpose(0, 2, 1, 3).reshape(B, T, nkv)
            dh = self._proj_backward(dqkv, c_qkv, grads)
            dres, dw = ops.rmsnorm_backward(dh, c_ln1, need_dw=not frozen)
            if not frozen:
                grads[pre + "input_layernorm.weight"] = dw
            dx = dx + dres
        if not frozen:
            dE = ops.embedding_backward(dx, c_emb)
            if cfg.tie_word_embeddings:
                dE += dW_out
            else:
                grads["lm_head.weight"] = dW_out
            grads["model.embed_tokens.weight"] = dE
        return grads

    # ------------------------------------------------------------------ public API
    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """int array (B, T) -> logits (B, T, V) in the model dtype (float32)."""
        lg, _ = self.forward(input_ids, attention_mask=attention_mask)
        return lg

    def _row_shards(self, batch: int) -> list[slice]:
        """The batch-row shards of forward() (same split, so each shard's rows stay on one thread)."""
        n = max(1, min(self.threads, batch))
        bounds = np.linspace(0, batch, n + 1).astype(int)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def loss_forward(self, logits, labels, overwrite_logits: bool = False) -> tuple[float, "LossCache"]:
        """Cross-entropy of logits (B, T, V) against labels (B, T) with HF semantics (shifted inside,
        -100 ignored, mean over counted tokens), split over the batch-row shards in parallel.
        With overwrite_logits=True the logits array is used as scratch memory (softmax, then the
        gradient): pass it only when it is not needed afterwards."""
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[None]
        shards = self._row_shards(logits.shape[0])
        inplace = overwrite_logits and logits.flags.c_contiguous
        run = lambda s: ops.cross_entropy_forward(logits[s], labels[s], inplace=inplace)
        parts = [run(shards[0])] if len(shards) == 1 else list(_pool(len(shards)).map(run, shards))
        counted = sum(c[5] for _, c in parts)
        loss = sum(l * c[5] for l, c in parts) / counted if counted else 0.0
        return float(loss), LossCache(shards, [c for _, c in parts], counted, sum(c[6] for _, c in parts),
                                      logits if inplace else None)

    def loss_backward(self, lc: "LossCache") -> np.ndarray:
        """-> dlogits (B, T, V), the gradient of loss_forward's mean loss (spends the cache)."""
        shape = (sum(c[0][0] for c in lc.caches),) + tuple(lc.caches[0][0][1:])
        out = lc.buffer if lc.buffer is not None else np.empty(shape, self.dtype)
        denom = max(lc.counted, 1)
        run = lambda i: ops.cross_entropy_backward(lc.caches[i], dtype=self.dtype, denom=denom, out=out[lc.shards[i]])
        if len(lc.shards) == 1:
            run(0)
        else:
            list(_pool(len(lc.shards)).map(run, range(len(lc.shards))))
        lc.caches = []
        return out

    def loss_and_grads(self, input_ids, labels, attention_mask=None, train: bool = False, rng=None):
        """HF semantics: labels aligned with input_ids, shifted inside, -100 ignored, mean over
        counted tokens. Returns (loss: float, grads: name -> array)."""
        ids = np.asarray(input_ids)
        labels = np.asarray(labels)
        if ids.ndim == 1:
            ids, labels = ids[None], labels[None]
        logits, cache = self.forward(ids, attention_mask=attention_mask, train=train, rng=rng)
        loss, lc = self.loss_forward(logits, labels, overwrite_logits=True)
        del logits
        dlogits = self.loss_backward(lc)
        return loss, self.backward(dlogits, cache)

    def loss(self, input_ids, labels, attention_mask=None) -> tuple[float, int, int]:
        """Evaluation: (mean loss, counted tokens, correctly predicted tokens)."""
        ids = np.asarray(input_ids)
        labels = np.asarray(labels)
        if ids.ndim == 1:
            ids, labels = ids[None], labels[None]
        logits, _ = self.forward(ids, attention_mask=attention_mask)
        loss, lc = self.loss_forward(logits, labels, overwrite_logits=True)
        return loss, lc.counted, lc.correct

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        shape = (batch, cfg.n_kv_heads, max_len, cfg.hd)
        L = cfg.num_hidden_layers
        return KVCache([np.zeros(shape, self.dtype) for _ in range(L)],
                       [np.zeros(shape, self.dtype) for _ in range(L)], 0)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Stream new token ids one by one (KV cache). temperature 0 = greedy. Stops after
        max_new_tokens or when a stop id is produced (the stop id itself is not yielded)."""
        from .sampling import sample_next

        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("generate needs at least one prompt token")
        rng = np.random.default_rng(seed)
        gen_params = self.merged_params() if self.lora is not None else self.params
        saved, saved_lora = self.params, self.lora
        self.params, self.lora = gen_params, None
        self._fuse_cache.clear()
        self._cache_fused = True
        # small matrix products (prefill of a short prompt, then one-token steps): BLAS threads
        # only add waiting, so generation runs single-threaded BLAS
        ensure_single_threaded_blas()
        try:
            total = len(prompt) + max_new_tokens
            cache = self.new_kv_cache(1, total)
            logits, _ = self.forward(np.array([prompt]), kv_cache=cache, last_only=True)
            last = logits[0, -1]
            packed = self._decode_pack()
            cos_all, sin_all = ops.rope_tables(self.config.inv_freq(), np.arange(total), self.dtype)
            history = list(prompt)
            stops = set(int(s) for s in stop_ids)
            bufs = self._decode_buffers()
            for _ in range(max_new_tokens):
                nxt = sample_next(last, history, rng, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty)
                if nxt in stops:
                    return
                yield nxt
                history.append(nxt)
                if len(history) >= total:
                    return  # max_new_tokens reached: no need to run the model once more
                last = self._decode_one(nxt, cache, packed, cos_all[cache.length], sin_all[cache.length], bufs)
        finally:
            self.params, self.lora = saved, saved_lora
            self._fuse_cache.clear()
            self._cache_fused = False

    def _decode_pack(self):
        """The decode weights, reused across generate calls while the weights are unchanged: same
        arrays (identity) and the same values at a strided sample (in-place optimizer updates
        change every element, so a sample sees them)."""
        p = self.params
        names = sorted(p)
        key = tuple(id(p[k]) for k in names)
        fp = np.array([float(p[k].reshape(-1)[::97].sum(dtype=np.float64)) for k in names])
        cached = getattr(self, "_pack_cache", None)
        if cached is not None and cached[0] == key and np.array_equal(cached[1], fp):
            return cached[2]
        packed = self._pack_for_decoding()
        self._pack_cache = (key, fp, packed)
        return packed

    def _pack_for_decoding(self):
        """Weights for the one-token decode path, built once and reused while the weights are
        unchanged. Every matrix is transposed for x @ W and gets its bias as one extra row (the
        input vectors end in a constant 1), so a projection with its bias is one call. Folded in:
        each RMSNorm weight into the rows of the matrix that follows it (a norm costs one scalar),
        the attention scale 1/sqrt(hd) into the query columns, and a factor 1/2 into the gate
        columns (SiLU is computed as g/2 * (1 + tanh(g/2)), which cannot overflow)."""
        p, cfg = self.params, self.config
        C, dt = cfg.hidden_size, self.dtype
        nq = cfg.num_attention_heads * cfg.hd

        def with_bias(Wt, b):  # Wt (in, out), b (out,) or None -> (in + 1, out)
            out = np.empty((Wt.shape[0] + 1, Wt.shape[1]), dt)
            out[:-1] = Wt
            out[-1] = 0.0 if b is None else b
            return out

        layers = []
        for l in range(cfg.num_hidden_layers):
            pre = f"model.layers.{l}."
            g_qkv, _, g_gu, _ = self._layer_groups(l)
            Wqkv, bqkv = self._fused(g_qkv)
            Wgu, bgu = self._fused(g_gu)
            wn1 = p[pre + "input_layernorm.weight"][:, None]
            wn2 = p[pre + "post_attention_layernorm.weight"][:, None]
            A = with_bias(Wqkv.T * wn1, bqkv)
            A[:, :nq] *= 1.0 / np.sqrt(cfg.hd)
            GU = with_bias(Wgu.T * wn2, bgu)
            GU[:, :Wgu.shape[0] // 2] *= 0.5
            layers.append((A, with_bias(p[pre + "self_attn.o_proj.weight"].T, p.get(pre + "self_attn.o_proj.bias")),
                           GU, with_bias(p[pre + "mlp.down_proj.weight"].T, p.get(pre + "mlp.down_proj.bias"))))
        W_out = p["model.embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
        W_out = np.ascontiguousarray((W_out * p["model.norm.weight"][None, :]).T)  # (C, V): x @ W streams rows
        hd = cfg.hd
        half = hd // 2
        perm = np.concatenate([np.arange(half, hd), np.arange(half)])
        sign = np.concatenate([-np.ones(half), np.ones(half)]).astype(dt)
        return layers, W_out, perm, sign, np.arange(hd)

    def _decode_buffers(self):
        """Input vectors of the decode path's projections, each ending in the constant 1 that
        multiplies the bias row: normed hidden (C+1), attention output (H*hd+1), SwiGLU (I+1)."""
        cfg = self.config
        bufs = []
        for n in (cfg.hidden_size, cfg.num_attention_heads * cfg.hd, cfg.intermediate_size):
            b = np.empty(n + 1, self.dtype)
            b[n] = 1.0
            bufs.append(b)
        return bufs

    def _decode_one(self, token: int, cache: KVCache, packed, cos, sin, bufs=None):
        """One new token through all layers with the KV cache -> next-token logits (V,).
        A lean path of the same maths as forward() (tests check they agree): about 25 numpy
        calls per layer, because at one token per step the call overhead is what is left
        besides reading the weights."""
        cfg = self.config
        layers, W_out, perm, sign, idx = packed
        h, ao, act = bufs if bufs is not None else self._decode_buffers()
        C, I = cfg.hidden_size, cfg.intermediate_size
        eps, inv_c = cfg.rms_norm_eps, 1.0 / cfg.hidden_size
        KVH, hd, H = cfg.n_kv_heads, cfg.hd, cfg.num_attention_heads
        G = H // KVH
        nq, nkv = H * hd, KVH * hd
        hC, aoq, actI = h[:C], ao[:nq].reshape(KVH, G, hd), act[:I]
        pos = cache.length
        S = pos + 1
        s0 = 0 if cfg.sliding_window is None else max(0, S - cfg.sliding_window)
        # RoPE at this position as one (hd, hd) matrix, shared by every layer and head:
        # x * cos + rotate_half(x) * sin == x @ R, with rotate_half(x) == x[perm] * sign
        R = np.zeros((hd, hd), self.dtype)
        R[idx, idx] = cos
        R[perm, idx] = sign * sin
        x = self.params["model.embed_tokens.weight"][token].copy()  # (C,)
        for l, (A, O, GU, D) in enumerate(layers):
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
        return x @ W_out  # (V,)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder, dtype: str = "F32", extra_files: dict[str, bytes] | None = None) -> None:
        """Write config.json + model.safetensors (LoRA merged) atomically as an HF folder."""
        folder = Path(folder)
        params = self.merged_params()
        tmp = make_temp_dir_beside(folder)
        try:
            tensors = {k: v for k, v in params.items()}
            if dtype == "BF16":
                write_safetensors_bf16(tmp / "model.safetensors", tensors)
            else:
                write_safetensors(tmp / "model.safetensors", tensors, dtype=dtype)
            cfgd = self.config.to_hf_dict()
            cfgd["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
            atomic_write_json(tmp / "config.json", cfgd)
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            replace_dir_atomically(tmp, folder)
        except BaseException:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save_adapter(self, folder, base_model_name_or_path: str | None = None) -> None:
        if self.lora is None:
            raise ValueError("this model has no LoRA adapter to save")
        save_peft_adapter(folder, self.lora, self.lora_config, base_model_name_or_path)

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}/{c.n_kv_heads}, vocab={c.vocab_size}, "
                f"params={self.num_parameters():,}{', lora' if self.lora is not None else ''})")
