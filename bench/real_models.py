"""Real model shapes, side by side: our numpy engine against PyTorch + PEFT (LoRA steps) and
transformers (greedy decoding), on random models shaped like the small models people fine-tune.

    python bench/real_models.py [--shapes smollm135,smollm360,qwen05] [--steps 3] [--no-memory]

Shapes (random weights; tied embeddings; LoRA r16, alpha 32 on all seven projections):
  smollm135   SmolLM2-135M: vocab 49152, hidden 576, 30 layers, 9 heads / 3 KV heads, SwiGLU 1536; batch 4 x 256
  smollm360   SmolLM2-360M: vocab 49152, hidden 960, 32 layers, 15 heads / 5 KV heads, SwiGLU 2560; batch 2 x 256
  qwen05      Qwen2.5-0.5B: vocab 151936, hidden 896, 24 layers, 14 heads / 2 KV heads, q/k/v bias, SwiGLU 4864; batch 1 x 512

For each shape it reports:
  - the LoRA step (forward, loss, backward; both sides), timed interleaved (ABBA) after a warm-up:
    time ratio ours/torch, tokens/s, and the achieved GFLOP/s against the float32 matmul peak
    measured here as our engine uses the cores (one single-threaded 1024^3 product per engine
    thread, all at once);
  - greedy decoding, 128 new tokens after a 32-token prompt: tokens/s ours and transformers,
    and whether the tokens are the same;
  - peak resident memory of a LoRA step (and, for smollm135, of a full fine-tuning step, with and
    without activation checkpointing) in a
    fresh process running only our engine, next to the app's own estimate for that run
    (training.memory.estimate_peak_memory) and the app's time estimate.
Needs torch, transformers and peft (not needed by CI). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "smollm135": dict(cfg=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
                      family="llama", batch=(4, 256)),
    "smollm360": dict(cfg=dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                               num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True),
                      family="llama", batch=(2, 256)),
    "qwen05": dict(cfg=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
                   family="qwen2", batch=(1, 512)),
}


def engine_config(shape: str):
    from finetune_desktop.engine import ModelConfig

    s = SHAPES[shape]
    return ModelConfig(model_type=s["family"], qkv_bias=s["family"] == "qwen2", max_position_embeddings=2048,
                       rms_norm_eps=1e-6, **s["cfg"])


def matmul_peak(n=1024, reps=8) -> float:
    """The float32 matmul peak of these cores as our engine uses them: every engine thread runs a
    single-threaded sgemm (numpy's BLAS, n^3) on its own matrices, all at the same time. (Timing
    one multi-threaded product instead measured one core only, once the process had limited BLAS
    to one thread.)"""
    from finetune_desktop.engine.parallel import run_all
    from finetune_desktop.engine.runtime import engine_threads

    k = engine_threads()
    mats = [np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in range(k)]
    both = lambda: run_all(lambda i: mats[i] @ mats[i], k)  # noqa: E731
    both()
    best = min(_timed(both) for _ in range(reps))
    return k * 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lora_step_flops(cfg, B: int, T: int, r: int = 16) -> float:
    """Forward 2 N P (every projection and the output head), the backward's input gradients as
    much again (frozen weights need no weight gradient), the attention (causal: half of T x T)
    three times, and the small LoRA matmuls."""
    C, I, V, L, H, KV, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers,
                             cfg.num_attention_heads, cfg.n_kv_heads, cfg.hd)
    N = B * T
    proj = L * (C * (H * hd + 2 * KV * hd) + H * hd * C + 3 * C * I)
    head = C * V
    attn = L * 2 * 2 * B * H * T * T * hd / 2
    lora = L * r * (C + H * hd + 2 * (C + KV * hd) + (H * hd + C) + 2 * (C + I) + (I + C))
    return 2 * N * (proj + head) * 2 + 3 * attn + 6 * N * lora


def paired(ours, theirs, reps):
    ours()
    theirs()
    to, tt = [], []
    for i in range(reps):
        order = ((ours, to), (theirs, tt)) if i % 2 == 0 else ((theirs, tt), (ours, to))
        for fn, ts in order:
            ts.append(_timed(fn))
    return to, tt


def build_pair(shape: str, folder: Path):
    """A random HF model of this shape saved as safetensors, loaded by transformers and by us."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from finetune_desktop.engine import Model

    s = SHAPES[shape]
    torch.manual_seed(0)
    if s["family"] == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**s["cfg"], max_position_embeddings=2048, rms_norm_eps=1e-6,
                                          use_sliding_window=False))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**s["cfg"], max_position_embeddings=2048, rms_norm_eps=1e-6))
    hf = hf.float()
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, Model.from_pretrained(folder)


def bench_shape(shape: str, steps: int, peak: float) -> dict:
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model

    from finetune_desktop.engine import LoraConfig

    B, T = SHAPES[shape]["batch"]
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build_pair(shape, Path(d))
    cfg = ours.config
    ours.add_lora(LoraConfig(r=16, alpha=32.0, target_modules=TARGETS), seed=0)
    peft_model = get_peft_model(hf, PeftLora(r=16, lora_alpha=32, target_modules=list(TARGETS), lora_dropout=0.0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    tids = torch.tensor(ids)

    def step_ours():
        ours.loss_and_grads(ids, ids)

    def step_torch():
        peft_model.zero_grad(set_to_none=True)
        peft_model(tids, labels=tids).loss.backward()

    to, tt = paired(step_ours, step_torch, steps)
    o, t = float(np.median(to)), float(np.median(tt))
    flops = lora_step_flops(cfg, B, T)
    out = {"shape": shape, "batch": [B, T], "params": ours.num_parameters(),
           "lora_step_s": {"ours": o, "torch": t}, "ratio": o / t,
           "tokens_per_s": {"ours": B * T / o, "torch": B * T / t},
           "gflops": {"ours": flops / o / 1e9, "torch": flops / t / 1e9}, "peak_gflops": peak,
           "fraction_of_peak": flops / o / 1e9 / peak}
    # greedy decoding, same tokens
    prompt = [int(x) for x in rng.integers(0, cfg.vocab_size, 32)]
    ours.merge_lora()
    hf = peft_model.merge_and_unload()
    n = 128
    t0 = time.perf_counter()
    ours_tok = list(ours.generate(prompt, max_new_tokens=n, temperature=0))
    od = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        g = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
        td = time.perf_counter() - t0
    theirs = g[0, len(prompt):].tolist()
    out["decode_tokens_per_s"] = {"ours": n / od, "transformers": n / td}
    out["decode_ratio"] = td / od
    out["same_tokens"] = ours_tok == theirs[:len(ours_tok)]
    return out


def child_memory(shape: str, method: str, checkpointing: bool = False) -> dict:
    """In a fresh process (only our engine): peak RSS of two training steps, and the app's estimates."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / 'bench')!r})
import numpy as np
from finetune_desktop.engine.runtime import configure_process
configure_process()
from finetune_desktop.engine import LoraConfig, Model
from finetune_desktop.engine.optim import AdamWConfig, adamw_init, adamw_step
from finetune_desktop.training.memory import estimate_peak_memory
import real_models as rm
cfg = rm.engine_config({shape!r})
B, T = rm.SHAPES[{shape!r}]["batch"]
m = Model.from_config(cfg, seed=0)
if {method!r} == "lora":
    m.add_lora(LoraConfig(r=16, alpha=32.0, target_modules=rm.TARGETS), seed=0)
m.activation_checkpointing = {checkpointing!r}
P = m.trainable_params()
opt = adamw_init(P)
# the app also keeps the starting weights of every matrix for its change-since-start view
w0 = {{k: v.copy() for k, v in m.params.items()}} if {method!r} == "full" else None
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
times = []
for _ in range(2):
    t0 = time.perf_counter()
    loss, g = m.loss_and_grads(ids, ids)
    adamw_step(P, g, opt, 1e-4, AdamWConfig())
    del g
    times.append(time.perf_counter() - t0)
est = estimate_peak_memory(cfg, m.num_parameters(), int(sum(v.size for v in P.values())), B, T,
                           full={method!r} == "full", available=None, checkpointing={checkpointing!r})
from finetune_desktop.training.session import estimate_tokens_per_second
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of this (torch-sized)
# parent would report the parent's peak
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"peak_rss_mb": hwm / 1024,
                  "estimate_mb": est.total_bytes / 2**20, "step_s": times[-1],
                  "estimate_tokens_per_s": estimate_tokens_per_second(m, {method!r}),
                  "tokens_per_s": B * T / times[-1]}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm135,smollm360,qwen05")
    ap.add_argument("--steps", type=int, default=3, help="timed LoRA steps per side (interleaved)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    from finetune_desktop.engine.runtime import configure_process

    configure_process()  # our engine: single-threaded BLAS, batch shards in threads
    import torch
    threads = torch.get_num_threads()
    peak = matmul_peak()
    print(f"torch {torch.__version__} on {threads} threads; float32 matmul peak here: {peak:.0f} GFLOP/s")
    results = []
    for shape in args.shapes.split(","):
        r = bench_shape(shape, args.steps, peak)
        if not args.no_memory:
            r["memory_lora"] = child_memory(shape, "lora")
            if shape == "smollm135":
                r["memory_full"] = child_memory(shape, "full")
                r["memory_full-checkpointed"] = child_memory(shape, "full", checkpointing=True)
        results.append(r)
        B, T = r["batch"]
        print(f"\n{shape} ({r['params'] / 1e6:.0f}M parameters), LoRA r16 step at batch {B} x {T}:")
        print(f"  ours {r['lora_step_s']['ours']:.2f} s ({r['tokens_per_s']['ours']:.0f} tokens/s, "
              f"{r['gflops']['ours']:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of peak) | torch+PEFT "
              f"{r['lora_step_s']['torch']:.2f} s ({r['tokens_per_s']['torch']:.0f} tokens/s)")
        print(f"  RATIO step time ours/torch = {r['ratio']:.2f}")
        print(f"  greedy decode, 128 tokens after 32: ours {r['decode_tokens_per_s']['ours']:.1f} tokens/s | "
              f"transformers {r['decode_tokens_per_s']['transformers']:.1f} | {r['decode_ratio']:.2f}x | "
              f"same tokens: {r['same_tokens']}")
        for kind in ("memory_lora", "memory_full", "memory_full-checkpointed"):
            mem = r.get(kind)
            if mem and "error" not in mem:
                print(f"  {kind.split('_')[1]} step in a fresh process: peak {mem['peak_rss_mb']:.0f} MB (app's "
                      f"estimate {mem['estimate_mb']:.0f} MB), {mem['tokens_per_s']:.0f} tokens/s (app's "
                      f"estimate {mem['estimate_tokens_per_s']:.0f})")
            elif mem:
                print(f"  {kind}: {mem['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
