"""Side-by-side speed and memory of the numpy engine against PyTorch eager (transformers) on
the same checkpoint, in one run. Prints ratios (ours / torch) and GFLOP/s against the measured
float32 matmul peak of this machine. Needs torch + transformers (not needed by CI).

    python bench/engine_speed.py [--steps 5] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_desktop.engine import Model, ModelConfig  # noqa: E402

REF = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
           num_attention_heads=8, num_key_value_heads=8, attention_bias=True, mlp_bias=True,
           tie_word_embeddings=True, max_position_embeddings=2048)


def matmul_peak(n=1024, reps=10):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    a @ b
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def train_flops(cfg: ModelConfig, B, T):
    C, I, V, L, H, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hd
    kv = cfg.n_kv_heads * hd
    per_tok = L * 2 * (C * (H * hd + 2 * kv) + H * hd * C + 3 * C * I) + 2 * C * V
    attn = L * 2 * 2 * B * H * T * T * hd
    return 3 * (per_tok * B * T + attn)


def paired(ours, theirs, reps):
    """Time both functions `reps` times each, interleaved (ABBA order) after one warm-up call
    each, so that a machine that gets slower or faster during the run affects both alike.
    Returns the two lists of seconds and the per-pair ratios."""
    ours()
    theirs()
    to, tt = [], []
    for i in range(reps):
        order = ((ours, to), (theirs, tt)) if i % 2 == 0 else ((theirs, tt), (ours, to))
        for fn, ts in order:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return to, tt, [a / b for a, b in zip(to, tt)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="limit BLAS/torch threads (0 = default)")
    args = ap.parse_args()
    import torch
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, numpy {np.__version__}")
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        peak1 = matmul_peak()
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):
        peak = matmul_peak()
    print(f"measured float32 matmul peak (numpy's BLAS, 1024^3): {peak1:.1f} GFLOP/s on one thread, "
          f"{peak:.1f} GFLOP/s on {torch.get_num_threads()} (the engine's 'peak' below)")
    hf = LlamaForCausalLM(LlamaConfig(**REF)).float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        m = Model.from_pretrained(d)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(0, REF["vocab_size"], (B, T))
    labels = ids.copy()
    flops = train_flops(m.config, B, T)

    def ours():
        m.loss_and_grads(ids, labels)

    tids, tlabels = torch.tensor(ids), torch.tensor(labels)

    def theirs():
        hf.zero_grad(set_to_none=True)
        hf(tids, labels=tlabels).loss.backward()

    to, tt, ratios = paired(ours, theirs, args.steps)
    o_med, t_med = float(np.median(to)), float(np.median(tt))
    print(f"forward+backward {B}x{T}, {args.steps} steps each, interleaved: numpy {o_med*1000:.0f} ms "
          f"({flops/o_med/1e9:.0f} GFLOP/s, {flops/o_med/1e9/peak*100:.0f}% of peak) | torch {t_med*1000:.0f} ms "
          f"({flops/t_med/1e9:.0f} GFLOP/s)")
    print(f"RATIO train step time numpy/torch = {o_med/t_med:.2f} (target <= 1.0; median of the per-pair ratios "
          f"{float(np.median(ratios)):.2f}, best-of {min(to)/min(tt):.2f})")

    # generation: greedy with KV cache, same tokens
    prompt = list(rng.integers(0, REF["vocab_size"], 16))
    n = args.gen_tokens
    t = time.perf_counter()
    ours_toks = list(m.generate(prompt, max_new_tokens=n, temperature=0))
    o_gen = time.perf_counter() - t
    with torch.no_grad():
        t = time.perf_counter()
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          pad_token_id=0, eos_token_id=None)
        t_gen = time.perf_counter() - t
    theirs_toks = out[0, len(prompt):].tolist()
    same = ours_toks == theirs_toks[: len(ours_toks)]
    print(f"greedy generation {n} tokens: numpy {n/o_gen:.0f} tok/s | transformers {n/t_gen:.0f} tok/s | "
          f"RATIO speed numpy/torch = {(n/o_gen)/(n/t_gen):.2f} (target >= 3) | same tokens: {same}")
    del hf
    gc.collect()
    print(f"peak RSS of this process (includes torch): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB"
          " - see bench/engine_memory.py for the numpy-only numbers")


if __name__ == "__main__":
    main()
