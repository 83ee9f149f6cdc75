"""The decoder-only transformer of the HF Llama family (Llama, Qwen2, Mistral), in numpy.

Parameters live in a flat dict keyed by HF tensor names ("model.layers.0.self_attn.q_proj.weight").
`forward` returns logits and an explicit cache; `backward` walks the same calls in reverse and
returns gradients keyed by the same names. With LoRA attached, the base weights are frozen:
only the adapter matrices get gradients, and no full-size weight gradient is ever computed.

Shape legend: B batch, T tokens, S keys (cache + T), C hidden, V vocab, I SwiGLU width,
H query heads, KVH key/value heads, G = H // KVH, hd head dim.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import decode, loss as loss_mod, ops
from .checkpoint import (atomic_write_json, load_peft_adapter, load_weights, make_temp_dir_beside, model_folder,
                         replace_dir_atomically, save_peft_adapter, write_safetensors, write_safetensors_bf16)
from .config import ModelConfig, ModelFormatError
from .lora import (LoraConfig, adapters_backward, adapters_forward, init_lora, lora_names, merge_lora,
                   merged_group_weight, merging_pays_off)
from .loss import HeadLoss, head_chunk_rows
from .parallel import row_generators, row_shards, run_all, spare_threads, sum_into_first
from .split import attention_backward_split as _attention_backward
from .split import attention_forward_split as _attention_forward
from .recompute import Recompute, rng_from_state, rng_state
from .runtime import engine_threads

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


def _check_finite(params: dict[str, np.ndarray], source) -> None:
    """Refuse weights with NaN or infinite values (a damaged or badly converted file): they would
    load fine and then make every reply empty and every loss NaN."""
    for name, v in params.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
            raise ModelFormatError(f"{source}: tensor {name!r} holds {bad:,} NaN or infinite value"
                                   f"{'s' if bad != 1 else ''}; the weights are damaged")


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
        self.threads = engine_threads()   # batch shards run in parallel (see forward)
        # keep only each layer's input in training and run its forward again in the backward: about
        # a third more compute for a fraction of the activation memory (training.memory)
        self.activation_checkpointing = False
        # `version` changes whenever the weights may have: the optimizer's caller, LoRA changes
        # and checkpoint loads call weights_changed(). Caches of derived weights (decode packing)
        # are keyed on it, so they are exact and never compare values. Stacked q/k/v and gate/up
        # weights are not copies: the parameters are views of them (_fused).
        self.version = 0
        self.base_version = 0   # changes only when the base weights may have (not for an adapter update)
        self._rope_cache: dict = {}
        self._fuse_cache: dict = {}
        self._decode_cache: tuple | None = None

    def weights_changed(self, adapters_only: bool = False) -> None:
        """Call after changing any weight or adapter array in place; adapters_only=True when only
        the LoRA matrices changed (a LoRA optimizer step), which keeps base-weight caches."""
        self.version += 1
        if not adapters_only:
            self.base_version += 1
            self._drop_stale_fused()

    def _drop_stale_fused(self) -> None:
        """Forget stacked weights (see _fused) whose parameters were replaced by new arrays, so
        the old ones can be freed now rather than at the next forward."""
        p = self.params
        for stems, (_, _, views) in list(self._fuse_cache.items()):
            names = [s + ".weight" for s in stems] + [s + ".bias" for s in stems if s + ".bias" in p]
            if len(names) != len(views) or any(p.get(n) is not v for n, v in zip(names, views)):
                del self._fuse_cache[stems]

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
        _check_finite(m.params, folder)
        m.source = str(folder)
        return m

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, lora_config: LoraConfig, seed: int = 0) -> None:
        self.weights_changed()
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
        _check_finite(lora, folder)
        self.weights_changed()
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
        self.weights_changed()

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
        q/k/v and gate/up each run as one larger matmul. The first call stacks the weights into
        one array and points the parameters at row slices of it (views): the model then holds
        each weight once, the optimizer's in-place updates land in the stacked array too, and no
        copy is made per step. Whoever puts a new array into self.params (loading, a script)
        breaks the link; the next call sees that and stacks again."""
        p = self.params
        if len(stems) == 1:
            return p[stems[0] + ".weight"], p.get(stems[0] + ".bias")
        names = [s + ".weight" for s in stems] + [s + ".bias" for s in stems if s + ".bias" in p]
        ent = self._fuse_cache.get(stems)
        if ent is not None and len(ent[2]) == len(names) and all(p[n] is v for n, v in zip(names, ent[2])):
            return ent[0], ent[1]
        W = np.concatenate([p[s + ".weight"] for s in stems], axis=0)
        bs = [p.get(s + ".bias") for s in stems]
        b = np.concatenate(bs) if all(x is not None for x in bs) else None
        off = 0
        for s in stems:
            n = p[s + ".weight"].shape[0]
            p[s + ".weight"] = W[off:off + n]
            if b is not None:
                p[s + ".bias"] = b[off:off + n]
            off += n
        self._fuse_cache[stems] = (W, b, tuple(p[n] for n in names))
        return W, b

    def _fuse_all(self) -> None:
        """Stack every layer's q/k/v and gate/up (see _fused) before the batch shards' threads
        run, which then only read."""
        for l in range(self.config.num_hidden_layers):
            for stems in self._layer_groups(l):
                self._fused(stems)

    def _layer_groups(self, l: int) -> tuple[tuple[str, ...], ...]:
        """The projection groups of layer l that share an input: q/k/v, o, gate/up, down."""
        pre = f"model.layers.{l}."
        return ((pre + "self_attn.q_proj", pre + "self_attn.k_proj", pre + "self_attn.v_proj"),
                (pre + "self_attn.o_proj",), (pre + "mlp.gate_proj", pre + "mlp.up_proj"), (pre + "mlp.down_proj",))

    def _lora_effective_weights(self, n_tokens: int, train: bool):
        """With LoRA and no dropout, W + scale * B @ A for every adapted projection group, made once
        per forward (shared by the batch shards), or None when the batch is too short for that to
        pay off (lora.merging_pays_off). Then the forward is one matmul per group instead of the
        base matmul plus the adapter's two skinny ones, and the input gradient is one matmul too.
        The adapter gradients are the same either way (computed in _proj_backward)."""
        if self.lora is None or (train and self.lora_config.dropout > 0):
            return None
        groups, shapes = [], []
        for l in range(self.config.num_hidden_layers):
            for stems in self._layer_groups(l):
                ranks = [self.lora[lora_names(st + ".weight")[0]].shape[0] for st in stems
                         if lora_names(st + ".weight")[0] in self.lora]
                if ranks:
                    groups.append(stems)
                    shapes.append((sum(self.params[st + ".weight"].shape[0] for st in stems),
                                   self.params[stems[0] + ".weight"].shape[1], max(ranks)))
        if not groups or not merging_pays_off(n_tokens, shapes):
            return None
        sizes = {st: self.params[st + ".weight"].shape[0] for g in groups for st in g}
        merged = lambda i: merged_group_weight(self._fused(groups[i])[0], groups[i], sizes, self.lora,
                                               self.lora_config.scale)
        return dict(zip(groups, run_all(merged, len(groups), self.threads)))

    def _proj_forward(self, stems: tuple[str, ...], x, train: bool, rng, eff=None):
        """x (..., in) -> y (..., sum of the projections' out sizes), with LoRA added per projection:
        folded into the weight when `eff` (from _lora_effective_weights) has this group, else beside
        the frozen weights, the group's adapters together (lora.group_forward), or one by one when
        training with adapter dropout."""
        W, b = self._fused(stems)
        merged = eff is not None and stems in eff
        y, lc = ops.linear_forward(x, eff[stems] if merged else W, b)
        if self.lora is None:
            return y, (stems, lc, None)
        adapted, off = [], 0
        for stem in stems:
            n_out = self.params[stem + ".weight"].shape[0]
            an, bn = lora_names(stem + ".weight")
            if an in self.lora:
                adapted.append((stem, off, an, bn))
            off += n_out
        if merged or not adapted:
            return y, (stems, lc, ("merged", adapted, None))
        dropout = self.lora_config.dropout if train else 0.0
        mode, saved = adapters_forward(x, y, adapted, self.lora, self.lora_config.scale, dropout, rng)
        return y, (stems, lc, (mode, adapted, saved))

    def _proj_backward(self, dy, cache, grads, need_dx=True):
        stems, lc, lora_cache = cache
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
            return dx
        mode, adapted, saved = lora_cache
        adapters_backward(mode, adapted, saved, self.lora, self.lora_config.scale, dy, dx, lc[0], grads)
        return dx

    # ------------------------------------------------------------------ forward
    def shards(self, batch: int) -> list[slice]:
        """The batch-row shards that forward, loss and backward run in parallel."""
        return row_shards(batch, self.threads)

    def forward(self, input_ids, attention_mask=None, train: bool = False, rng=None):
        """input_ids (B, T) -> logits (B, T, V), cache for backward. attention_mask (B, T) marks
        real (1) and padding (0) tokens.

        The batch rows are split into shards that run in parallel threads (engine/parallel.py);
        each shard writes its logits straight into its rows of one array (no concatenation).
        Training does not need the whole logits array: see forward_hidden / head_loss.
        Generation does not come through here: see engine/decode.py."""
        ids, cache = self.forward_hidden(input_ids, attention_mask, train, rng)
        shards, caches = cache
        logits = np.empty((ids.shape[0], ids.shape[1], self.config.vocab_size), self.dtype)
        W_out = self._w_out()
        run_all(lambda i: ops.linear_forward(caches[i][3], W_out, out=logits[shards[i]]), len(shards))
        return logits, cache

    def _w_out(self) -> np.ndarray:
        p = self.params
        return p["model.embed_tokens.weight"] if self.config.tie_word_embeddings else p["lm_head.weight"]

    def forward_hidden(self, input_ids, attention_mask=None, train: bool = False, rng=None):
        """Every layer and the final norm, without the output layer -> (ids (B, T), cache); the
        cache holds each shard's final hidden states (B, T, C) for head_loss."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if train and rng is None and self.lora is not None and self.lora_config.dropout > 0:
            raise ValueError("LoRA dropout needs a random generator: pass rng=np.random.default_rng(seed)")
        self._fuse_all()
        eff = self._lora_effective_weights(ids.size, train)
        shards = self.shards(ids.shape[0])
        rows = row_generators(rng, ids.shape[0]) if train else None
        rngs = [None if rows is None else rows[s] for s in shards]
        masks = [None if attention_mask is None else np.asarray(attention_mask)[s] for s in shards]
        with self._spare(shards):
            caches = run_all(lambda i: self._forward_one(ids[shards[i]], masks[i], train, rngs[i], eff),
                             len(shards))
        return ids, (shards, caches)

    def _spare(self, shards) -> spare_threads:
        """Fewer batch rows than threads: the one shard's matrix products use the idle threads."""
        return spare_threads(self.threads // len(shards) if len(shards) < self.threads else 1)

    def head_loss(self, cache, labels, need_grad: bool = True, row_losses: bool = False) -> HeadLoss:
        """The output layer and the cross-entropy (HF semantics: shifted inside, -100 ignored,
        mean over counted tokens) over forward_hidden's cache, by chunks of counted rows only,
        with the gradient down to the final hidden states (ops.head_xent_forward). With
        row_losses, the loss of every counted token of batch row 0 (NaN elsewhere) comes back."""
        shards, caches = cache
        targets = ops.shifted_targets(np.asarray(labels).reshape(-1, caches[0][3].shape[1]))
        denom = int((targets != ops.IGNORE_INDEX).sum())
        W_out = self._w_out()
        need_dW = need_grad and self.lora is None
        V = self.config.vocab_size
        chunk = head_chunk_rows(V)

        def one(i):
            h = caches[i][3]
            b, T, C = h.shape
            rl = np.full(b * T, np.nan) if row_losses and i == 0 else None
            out = ops.head_xent_forward(h.reshape(-1, C), W_out, targets[shards[i]].reshape(-1), denom,
                                        need_dh=need_grad, need_dW=need_dW, chunk_rows=chunk, row_losses=rl)
            return out + (rl[:T] if rl is not None else None,)

        with self._spare(shards):
            parts = run_all(one, len(shards))
        total = sum(x[0] for x in parts)
        counted = sum(x[1] for x in parts)
        dW = None
        if need_dW:
            dW = parts[0][4]
            for x in parts[1:]:
                dW += x[4]
        dh = [x[3].reshape(caches[i][3].shape) if need_grad else None for i, x in enumerate(parts)]
        return HeadLoss(total / counted if counted else 0.0, counted, sum(x[2] for x in parts), dh, dW,
                        parts[0][5])

    def _forward_one(self, ids, attention_mask, train: bool, rng, eff):
        """One shard's layers and final norm -> the backward's cache (the final hidden states in it).
        With activation_checkpointing, a layer keeps only its input (and the random state its LoRA
        dropout starts from); the backward runs its forward again just before it needs it."""
        cfg = self.config
        p = self.params
        B, T = ids.shape
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
        KVH, hd, H = cfg.n_kv_heads, cfg.hd, cfg.num_attention_heads
        cos, sin = self._rope(np.arange(T))
        mask_bias = ops.attention_mask_bias(T, T, self.dtype, key_mask=attention_mask, window=cfg.sliding_window)
        ctx = (cos, sin, mask_bias, train, eff)

        x, c_emb = ops.embedding_forward(ids, p["model.embed_tokens.weight"])  # (B, T, C)
        layer_caches = []
        for l in range(cfg.num_hidden_layers):
            if self.activation_checkpointing:
                state = None if rng is None else rng_state(rng)
                layer_caches.append(Recompute(x, state, ctx))
                x, _ = self._layer_forward(l, x, ctx, rng)
            else:
                x, lc = self._layer_forward(l, x, ctx, rng)
                layer_caches.append(lc)
        hN, c_lnf = ops.rmsnorm_forward(x, p["model.norm.weight"], cfg.rms_norm_eps)  # (B, T, C)
        return (c_emb, layer_caches, c_lnf, hN, (B, T, KVH, H // KVH, hd))

    def _layer_forward(self, l: int, x, ctx, rng):
        """Layer l on the residual stream x (B, T, C) -> (x after the layer, the layer's cache)."""
        cfg, p = self.config, self.params
        cos, sin, mask_bias, train, eff = ctx
        B, T, _ = x.shape
        KVH, hd, H = cfg.n_kv_heads, cfg.hd, cfg.num_attention_heads
        G = H // KVH
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
        a, c_att = _attention_forward(q, k, np.ascontiguousarray(v), mask_bias)  # (B, KVH, G, T, hd)
        a = a.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        o, c_o = self._proj_forward(g_o, a, train, rng, eff)  # (B, T, C)
        o += x  # the residual, into the fresh output (the layer input x stays as it was)
        x = o
        # --- MLP block
        h2, c_ln2 = ops.rmsnorm_forward(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gu, c_gu = self._proj_forward(g_gu, h2, train, rng, eff)  # (B, T, 2I)
        I = gu.shape[-1] // 2
        act, c_act = ops.swiglu_forward(gu[..., :I], gu[..., I:])
        del gu
        d, c_d = self._proj_forward(g_d, act, train, rng, eff)  # (B, T, C)
        d += x
        x = d
        return x, (c_ln1, c_qkv, c_rq, c_rk, c_att, c_o, c_ln2, c_gu, c_act, c_d)

    def _layer_cache(self, l: int, lc):
        """A layer's backward cache: as stored, or, for a checkpointed layer, made again by running
        its forward from the saved input with the saved random state (the same numbers)."""
        if not isinstance(lc, Recompute):
            return lc
        return self._layer_forward(l, lc.x, lc.ctx, rng_from_state(lc.rng_state))[1]

    # ------------------------------------------------------------------ backward
    def backward(self, dlogits, cache) -> dict[str, np.ndarray]:
        """Mirror of forward, call by call in reverse, from the logits' gradient. Returns grads
        keyed by HF names (for trainable tensors only); a tied lm_head's gradient is folded into
        embed_tokens. The shards run in parallel and their gradients are summed in shard order
        (deterministic)."""
        shards, caches = cache
        W_out = self._w_out()
        frozen = self.lora is not None

        def head(i):
            dl2 = dlogits[shards[i]].reshape(-1, W_out.shape[0])
            h2 = caches[i][3].reshape(-1, W_out.shape[1])
            return (dl2 @ W_out).reshape(caches[i][3].shape), (None if frozen else dl2.T @ h2)

        parts = run_all(head, len(shards))
        dW = None
        if not frozen:
            dW = parts[0][1]
            for x in parts[1:]:
                dW += x[1]
        return self.backward_hidden(HeadLoss(0.0, 0, 0, [x[0] for x in parts], dW, None), cache)

    def backward_hidden(self, hl: HeadLoss, cache) -> dict[str, np.ndarray]:
        """The backward from the final hidden states' gradient (head_loss) down to the embeddings."""
        shards, caches = cache
        with self._spare(shards):
            parts = run_all(lambda i: self._backward_one(hl.dh[i], caches[i]), len(shards))
        grads = sum_into_first(parts)  # every array in parts[0] is fresh from this backward
        if hl.dW_out is not None:
            if self.config.tie_word_embeddings:
                grads["model.embed_tokens.weight"] += hl.dW_out
            else:
                grads["lm_head.weight"] = hl.dW_out
        return grads

    def _backward_one(self, dhN, cache) -> dict[str, np.ndarray]:
        """One shard's backward from the final hidden states' gradient dhN (B, T, C)."""
        cfg = self.config
        c_emb, layer_caches, c_lnf, _, (B, T, KVH, G, hd) = cache
        H = KVH * G
        frozen = self.lora is not None
        grads: dict[str, np.ndarray] = {}
        dx, dnorm = ops.rmsnorm_backward(dhN, c_lnf, need_dw=not frozen)
        if not frozen:
            grads["model.norm.weight"] = dnorm
        for l in reversed(range(cfg.num_hidden_layers)):
            pre = f"model.layers.{l}."
            (c_ln1, c_qkv, c_rq, c_rk, c_att, c_o, c_ln2, c_gu, c_act, c_d) = self._layer_cache(l, layer_caches[l])
            # --- MLP block
            dact = self._proj_backward(dx, c_d, grads)
            dh2 = self._proj_backward(ops.swiglu_backward(dact, c_act, stacked=True), c_gu, grads)
            dres, dw = ops.rmsnorm_backward(dh2, c_ln2, need_dw=not frozen)
            if not frozen:
                grads[pre + "post_attention_layernorm.weight"] = dw
            dx += dres
            # --- attention block
            da = self._proj_backward(dx, c_o, grads)  # (B, T, H*hd)
            da = da.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KVH, G, T, hd)
            dq, dk, dv = _attention_backward(da, c_att)
            dq = ops.rope_backward(dq, c_rq)
            dk = ops.rope_backward(dk, c_rk)
            dqkv = np.empty((B, T, (H + 2 * KVH) * hd), dtype=dq.dtype)  # (B, T, (H+2KVH)*hd)
            nq, nkv = H * hd, KVH * hd
            dqkv[..., :nq] = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, nq)
            dqkv[..., nq:nq + nkv] = dk.transpose(0, 2, 1, 3).reshape(B, T, nkv)
            dqkv[..., nq + nkv:] = dv.transpose(0, 2, 1, 3).reshape(B, T, nkv)
            if frozen and l == 0:  # nothing below the first layer learns: no input gradient needed
                self._proj_backward(dqkv, c_qkv, grads, need_dx=False)
                break
            dh = self._proj_backward(dqkv, c_qkv, grads)
            dres, dw = ops.rmsnorm_backward(dh, c_ln1, need_dw=not frozen)
            if not frozen:
                grads[pre + "input_layernorm.weight"] = dw
            dx += dres
        if not frozen:
            grads["model.embed_tokens.weight"] = ops.embedding_backward(dx, c_emb)
        return grads

    # ------------------------------------------------------------------ public API
    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """int array (B, T) -> logits (B, T, V) in the model dtype (float32)."""
        lg, _ = self.forward(input_ids, attention_mask=attention_mask)
        return lg

    def hidden_states(self, input_ids, attention_mask=None) -> list[np.ndarray]:
        """The residual stream (B, T, C) at the input of every layer and after the last one
        (L + 1 arrays; the first is the token embeddings), read from a forward's cache: each
        layer's first RMSNorm keeps x / rms(x) and 1 / rms(x)."""
        _, (shards, caches) = self.forward(input_ids, attention_mask=attention_mask)
        out = []
        for l in range(self.config.num_hidden_layers + 1):
            parts = []
            for c_emb, layer_caches, c_lnf, _, _ in caches:
                lc = layer_caches[l] if l < self.config.num_hidden_layers else None
                if isinstance(lc, Recompute):
                    parts.append(lc.x)
                    continue
                xhat, _, rstd = lc[0] if lc is not None else c_lnf
                parts.append(xhat / rstd)
            out.append(np.concatenate(parts, axis=0))
        return out

    def residual_rms(self, cache, attention_mask=None) -> list[float]:
        """From a forward's cache: the RMS of the residual stream entering each layer and after the
        last one (L + 1 numbers), averaged over the real (unpadded) tokens. Each RMSNorm keeps
        1 / rms(x) per token, so nothing is recomputed."""
        shards, caches = cache
        out = []
        for l in range(self.config.num_hidden_layers + 1):
            total, count = 0.0, 0
            for s, (_, layer_caches, c_lnf, _, _) in zip(shards, caches):
                lc = layer_caches[l] if l < self.config.num_hidden_layers else None
                if isinstance(lc, Recompute):  # a checkpointed layer kept its input itself
                    rstd = 1.0 / np.sqrt(np.mean(np.square(lc.x, dtype=np.float64), axis=-1)
                                         + self.config.rms_norm_eps)
                else:
                    rstd = (lc[0] if lc is not None else c_lnf)[2][..., 0]  # (B, T)
                rms = 1.0 / rstd
                if attention_mask is not None:
                    m = np.asarray(attention_mask)[s] > 0
                    total += float(rms[m].sum())
                    count += int(m.sum())
                else:
                    total += float(rms.sum())
                    count += rms.size
            out.append(total / max(count, 1))
        return out

    def loss_forward(self, logits, labels, overwrite_logits: bool = False):
        """The mean cross-entropy over the batch, per shard in parallel (engine/loss.py)."""
        return loss_mod.loss_forward(logits, labels, self.shards(logits.shape[0]), overwrite_logits)

    def loss_backward(self, lc) -> np.ndarray:
        return loss_mod.loss_backward(lc, self.dtype)

    def loss_and_grads(self, input_ids, labels, attention_mask=None, train: bool = False, rng=None):
        """HF semantics: labels aligned with input_ids, shifted inside, -100 ignored, mean over
        counted tokens. Returns (loss: float, grads: name -> array)."""
        ids = np.asarray(input_ids)
        labels = np.asarray(labels)
        if ids.ndim == 1:
            ids, labels = ids[None], labels[None]
        _, cache = self.forward_hidden(ids, attention_mask, train, rng)
        hl = self.head_loss(cache, labels)
        return hl.loss, self.backward_hidden(hl, cache)

    def loss(self, input_ids, labels, attention_mask=None) -> tuple[float, int, int]:
        """Evaluation: (mean loss, counted tokens, correctly predicted tokens)."""
        ids = np.asarray(input_ids)
        labels = np.asarray(labels)
        if ids.ndim == 1:
            ids, labels = ids[None], labels[None]
        _, cache = self.forward_hidden(ids, attention_mask)
        hl = self.head_loss(cache, labels, need_grad=False)
        return hl.loss, hl.counted, hl.correct

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Stream new token ids one by one (KV cache). temperature 0 = greedy. Stops after
        max_new_tokens or when a stop id is produced (the stop id itself is not yielded).
        Runs engine/decode.py on this model's decode weights (LoRA merged); the model itself is
        not touched, so several generations may run at once."""
        return decode.generate(self.decode_weights(), prompt_ids, max_new_tokens, temperature, top_k, top_p,
                               repetition_penalty, seed, stop_ids)

    def decode_weights(self) -> decode.DecodeWeights:
        """The weights packed for decoding, made once per weights version."""
        cached = self._decode_cache
        if cached is not None and cached[0] == self.version:
            return cached[1]
        dw = decode.pack(self.merged_params(), self.config)
        self._decode_cache = (self.version, dw)
        return dw

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
