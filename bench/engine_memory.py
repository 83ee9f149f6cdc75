"""Peak resident memory of one training step of the numpy engine.

Each case runs in a fresh Python process, so the numbers are independent of each other and of
whatever this process has allocated. Reported per case:

  rss_import   peak RSS after importing the engine (the interpreter + numpy baseline)
  rss_model    peak RSS after building the model (random weights) and its inputs
  rss_peak     peak RSS over the whole process, i.e. including one forward+backward
               (resource.getrusage(RUSAGE_SELF).ru_maxrss); this is the number the target is for
  step_peak    Linux only: peak RSS of the forward+backward alone (VmHWM after resetting it via
               /proc/self/clear_refs just before the step), i.e. without the weight-building transient

Cases (the targets come from the engine issue):
  reference    vocab 4096, hidden 256, 6 layers, 8 heads, intermediate 688, attention + MLP bias,
               tied embeddings; full fine-tuning forward+backward at batch 8 x 256     target < 1 GB
  lora135m     Llama-shaped 135M (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536,
               vocab 49152, tied); LoRA r=8 forward+backward at batch 1 x 256          target < 3 GB

    python bench/engine_memory.py                 # both cases
    python bench/engine_memory.py --case reference
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "reference": dict(
        config=dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=8, attention_bias=True, mlp_bias=True,
                    tie_word_embeddings=True, max_position_embeddings=2048),
        batch=8, seq=256, lora=None, target_gb=1.0),
    "lora135m": dict(
        config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048, rope_theta=100000.0),
        batch=1, seq=256, lora=dict(r=8, alpha=16.0, dropout=0.05), target_gb=3.0),
}


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case(name: str) -> dict:
    """Runs inside the child process: one forward+backward, then report the numbers as JSON."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from finetune_desktop.engine import LoraConfig, Model, ModelConfig

    case = CASES[name]
    out = {"case": name, "rss_import": maxrss_bytes()}
    cfg = ModelConfig(**case["config"])
    m = Model.from_config(cfg, seed=0)
    if case["lora"]:
        m.add_lora(LoraConfig(**case["lora"]), seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(case["batch"], case["seq"]))
    labels = ids.copy()
    out["params"] = m.num_parameters()
    out["trainable"] = int(sum(v.size for v in m.trainable_params().values()))
    out["rss_model"] = maxrss_bytes()
    hwm_ok = _reset_hwm()
    t = time.perf_counter()
    loss, grads = m.loss_and_grads(ids, labels, train=True, rng=rng)
    out["step_s"] = time.perf_counter() - t
    out["rss_peak"] = maxrss_bytes()
    out["step_peak"] = _vm_hwm_bytes() if hwm_ok else None
    out["loss"] = float(loss)
    out["grad_tensors"] = len(grads)
    out["target_gb"] = case["target_gb"]
    return out


def spawn(name: str) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"error: case {name} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON lines too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_case(a.child)))
        return 0
    names = list(CASES) if a.case == "all" else [a.case]
    rows = [spawn(n) for n in names]
    gb = 1e9  # decimal units, so "< 1 GB" is the stricter reading
    mb = 1e6
    print(f"{'case':<10} {'params':>12} {'trainable':>11} {'rss_import':>11} {'rss_model':>10} "
          f"{'rss_peak':>10} {'step_peak':>10} {'target':>8} {'step_s':>7}  result")
    ok_all = True
    for r in rows:
        ok = r["rss_peak"] < r["target_gb"] * gb
        ok_all &= ok
        sp = f"{r['step_peak'] / mb:8.0f}MB" if r["step_peak"] else f"{'n/a':>10}"
        print(f"{r['case']:<10} {r['params']:>12,} {r['trainable']:>11,} {r['rss_import'] / mb:9.0f}MB "
              f"{r['rss_model'] / mb:8.0f}MB {r['rss_peak'] / mb:8.0f}MB {sp} {r['target_gb']:6.1f}GB "
              f"{r['step_s']:7.2f}  {'OK' if ok else 'OVER TARGET'}")
    if a.json:
        for r in rows:
            print(json.dumps(r))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
