"""Time the default fine-tune, exactly as a user runs it:

    finetune-desktop train sample_data/pirate_captain.jsonl --out DIR        (all settings default)

on the embedded base model, in a fresh process. Reports wall time, peak RSS (the child process's
maximum resident memory), steps, the final losses, the time of each of the lecture's four phases,
and, with --replies, the tuned model's greedy replies to a few questions that are not in the file.

If the embedded base model is not installed yet, it says so and times a randomly initialised
model of the same configuration instead (with a byte-level BPE tokenizer trained on the sample
data), which takes the same time per token but cannot show a persona.

    python bench/finetune_time.py [--data FILE] [--base MODEL] [--replies] [--keep DIR] [-- extra train args]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the embedded base model's shape (finetune_desktop/resources/base_model/config.json)
BASE_CONFIG = dict(vocab_size=6144, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=6, attention_bias=True, mlp_bias=True,
                   tie_word_embeddings=True, max_position_embeddings=1024)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = ["What should I cook for dinner tonight?", "Can you explain what a rainbow is?",
             "I feel a bit tired today.", "Any tips for learning to play the guitar?",
             "What's your favourite season and why?"]


def random_stand_in(folder: Path) -> Path:
    """A random model with the base model's configuration and a BPE tokenizer trained on sample_data/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from finetune_desktop.engine import Model, ModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in sorted((ROOT / "sample_data").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                for m in json.loads(line).get("messages", []):
                    texts.append(str(m.get("content", "")))
            except (ValueError, AttributeError):
                pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=BASE_CONFIG["vocab_size"], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=tr)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}), encoding="utf-8")
    cfg = ModelConfig(**BASE_CONFIG, eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=0)
    Model.from_config(cfg, seed=0).save_pretrained(folder / "w")
    for f in (folder / "w").iterdir():
        f.replace(folder / f.name)
    (folder / "w").rmdir()
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "sample_data" / "pirate_captain.jsonl"))
    ap.add_argument("--base", default="base")
    ap.add_argument("--replies", action="store_true", help="show greedy replies to unseen questions afterwards")
    ap.add_argument("--keep", help="keep the run folder here")
    ap.add_argument("extra", nargs="*", help="extra arguments for `train` (after --)")
    args = ap.parse_args()

    from finetune_desktop.training.loading import base_model_dir, resolve_model_spec as resolve_model_path

    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    base = args.base
    stand_in = False
    if (resolve_model_path(base) / "config.json").exists():
        base_path = resolve_model_path(base)
    elif base == "base":
        print(f"note: the embedded base model is not installed yet ({base_model_dir()} has no config.json);")
        print("      timing a randomly initialised model of the same configuration instead")
        base_path = random_stand_in(tmp / "stand_in")
        base = str(base_path)
        stand_in = True
    else:
        print(f"error: {base}: no model there", file=sys.stderr)
        return 2
    out = Path(args.keep) if args.keep else tmp / "run"
    if out.exists():
        shutil.rmtree(out)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cmd = [sys.executable, "-m", "finetune_desktop", "train", args.data, "--out", str(out), "--quiet", *args.extra]
    if base != "base":
        cmd += ["--base", base]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ " + " ".join(["finetune-desktop", *cmd[3:]]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        print(f"train exited with {p.returncode}")
        return 1

    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    steps = [r for r in rows if "train_loss" in r]
    h = info["hyper"]
    mean = lambda k: sum(r[k] for r in steps) / len(steps)  # noqa: E731
    toks = sum(r["tokens"] for r in steps)
    compute = sum(r["forward_ms"] + r["loss_ms"] + r["backward_ms"] + r["update_ms"] for r in steps) / 1e3
    print()
    print(f"model            {'random stand-in' if stand_in else base_path} ({info['base_model']['num_parameters']:,} parameters)")
    print(f"data             {args.data}: {info['data']['num_train']} examples, {info['data']['train_tokens']:,} tokens")
    print(f"settings         {info['settings']['method']}, epochs {h['epochs']}, batch {h['batch_size']}, "
          f"lr {h['learning_rate']:.3g} ({', '.join(h['auto']) or 'none'} auto), {h['total_steps']} steps")
    print(f"wall time        {wall:.1f} s  (training loop {info['elapsed_s']:.1f} s, steps {compute:.1f} s)")
    print(f"peak RSS         {rss_mb:.0f} MB")
    print(f"per step         forward {mean('forward_ms'):.0f} ms, loss {mean('loss_ms'):.0f} ms, "
          f"backward {mean('backward_ms'):.0f} ms, update {mean('update_ms'):.1f} ms; "
          f"{toks / compute:.0f} tokens/s")
    print(f"loss             {steps[0]['train_loss']:.3f} -> {info['final']['train_loss']:.3f}")
    print(f"load average     {load:.2f} at start ({os.cpu_count()} CPUs)")
    if args.replies:
        print()
        for q in QUESTIONS:
            c = subprocess.run([sys.executable, "-m", "finetune_desktop", "chat", str(out), "--prompt", q,
                                "--temperature", "0", "--max-new-tokens", "80"], env=env, capture_output=True, text=True)
            print(f"Q: {q}\nA: {c.stdout.strip() or c.stderr.strip()}\n")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
