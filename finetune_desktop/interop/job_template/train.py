#!/usr/bin/env python3
"""A fine-tuning job written by Finetune Desktop: TRL's SFTTrainer with a PEFT LoRA adapter (or
full fine-tuning), launched by accelerate on one or many GPUs, or plainly on a CPU.

    python train.py                                                   # any machine, one process
    accelerate launch --config_file accelerate/multi_gpu.yaml train.py  # see README.md

Every setting is in job.json, beside this file; the examples are in data/. Each conversation is
rendered with the model's own chat template and only the assistant replies are trained, each
including its end-of-turn token (the text the template writes after that token is not), exactly
as Finetune Desktop's own trainer does. The result goes to output/: the adapter (adapter/) or
the full model (model/), trainer_state.json with the loss curves, and result.json. Bring it
back with `finetune-desktop import THIS_FOLDER`.

Needs: torch, transformers, peft, trl, accelerate, datasets (and deepspeed for the ZeRO configs).
This file is self-contained: it does not import Finetune Desktop.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from bisect import bisect_left, bisect_right
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- job and data
def load_job(folder: Path = HERE) -> dict:
    with open(folder / "job.json", encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path) -> list[list[dict]]:
    """Conversations (lists of {"role", "content", "weight"?, "name"?}) from an OpenAI-format file."""
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["messages"])
    return out


def template_messages(msgs: list[dict]) -> list[dict]:
    """Messages up to and including the last assistant reply (nothing after it changes the loss)."""
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
    return msgs[: last + 1] if last >= 0 else list(msgs)


def _as_template(m: dict) -> dict:
    d = {"role": m["role"], "content": m["content"]}
    if m.get("name") is not None:
        d["name"] = m["name"]
    return d


def _render(tok, dicts, gen=False):
    try:
        return tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 - some templates refuse partial conversations
        return None


def _find_content(full: str, content: str, base: int, limit: int) -> tuple[int, int]:
    stripped = content.strip()
    for c in (content, stripped):
        if full.startswith(c, base):
            return base, base + len(c)
    for c in (content, stripped):
        j = full.find(c, base, limit)
        if j >= 0:
            return j, j + len(c)
    raise ValueError("the chat template changes the text of an assistant message")


def trained_spans(tok, msgs: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and, for each trained assistant reply, (start of the reply, end
    of its text, end of its turn) in characters, found by rendering prefixes of the conversation."""
    dicts = [_as_template(m) for m in msgs]
    full = tok.apply_chat_template(dicts, tokenize=False)
    spans, prev_end = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        base = prev_end
        before = _render(tok, dicts[:i], gen=True)
        if before is not None and full.startswith(before) and len(before) >= prev_end:
            base = len(before)
        else:
            plain = _render(tok, dicts[:i])
            if plain is not None and full.startswith(plain) and len(plain) >= prev_end:
                base = len(plain)
        after = _render(tok, dicts[: i + 1])
        after_ok = after is not None and full.startswith(after) and len(after) > base
        start, cend = _find_content(full, m["content"], base, len(after) if after_ok else len(full))
        end = len(after) if after_ok and len(after) >= cend else cend
        prev_end = max(cend, end)
        if m.get("weight", 1):
            spans.append((start, cend, end))
    return full, spans


def _stop(ids, kc: int, ke: int, n: int, eot: set) -> int:
    """Trained tokens end after the first end-of-turn token of the turn's trailing text; without
    one, at the turn end, plus an end-of-turn token right after it."""
    for k in range(kc, ke):
        if ids[k] in eot:
            return k + 1
    if ke < n and ids[ke] in eot:
        return ke + 1
    return ke


def encode(tok, msgs: list[dict], max_len: int, eot: set) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels): labels are the ids on trained tokens and -100 elsewhere; the
    first max_len tokens are kept."""
    text, spans = trained_spans(tok, template_messages(msgs))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for start, cend, end in spans:
        k0 = bisect_right(ends, start)
        kc = bisect_left(starts, cend)
        ke = bisect_left(starts, max(end, cend))
        for k in range(k0, _stop(ids, kc, ke, len(ids), eot)):
            labels[k] = ids[k]
    return ids[:max_len], labels[:max_len]


def encode_all(tok, convs, max_len: int, eot: set):
    rows = {"input_ids": [], "labels": []}
    for msgs in convs:
        ids, labels = encode(tok, msgs, max_len, eot)
        if any(l != IGNORE_INDEX for l in labels[1:]):  # the shifted loss never counts position 0
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
    return rows


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The learning rate of 0-based optimizer step `step` as a fraction of the peak: linear warmup
    to the peak, then constant, linear or cosine decay to zero (Finetune Desktop's schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0 - frac


# ----------------------------------------------------------------------------- model
def resolve_base(job: dict, folder: Path = HERE) -> str:
    """A local folder (the job's copy of the base model, or its recorded path), else the Hub repo id."""
    b = job["base_model"]
    if b.get("copy"):
        return str(folder / b["copy"])
    if b.get("path") and Path(b["path"]).is_dir():
        return b["path"]
    if b.get("repo_id"):
        return b["repo_id"]
    sys.exit(f"error: the base model {b.get('path')} is not on this machine and has no Hub repo id; copy the "
             "folder here and set base_model.path in job.json")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_trainer(job: dict, output_dir: Path, folder: Path = HERE, max_steps: int | None = None,
                  per_device_batch_size: int | None = None, gradient_checkpointing: bool | None = None,
                  precision: str | None = None):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    s, h = job["settings"], job["hyper"]
    base = resolve_base(job, folder)
    tok = AutoTokenizer.from_pretrained(base)
    if job.get("chat_template"):
        tok.chat_template = job["chat_template"]
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(job["tokenizer"]["pad_token_id"])
    tok.padding_side = "right"
    eot = set(job["tokenizer"]["end_of_turn_ids"])
    train = encode_all(tok, read_jsonl(folder / "data" / "train.jsonl"), s["max_seq_len"], eot)
    valid = encode_all(tok, read_jsonl(folder / "data" / "valid.jsonl"), s["max_seq_len"], eot)
    if not train["input_ids"]:
        sys.exit("error: no training example has assistant tokens left to train on")

    precision = precision or job.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else (
            "fp16" if torch.cuda.is_available() else "fp32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)

    peft_config = None
    if s["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                                 target_modules=list(s["lora_targets"]), bias="none", task_type="CAUSAL_LM")

    ws = world_size()
    per_device = per_device_batch_size or max(1, h["batch_size"] // ws)
    if per_device * ws != h["batch_size"] and per_device_batch_size is None:
        print(f"note: batch {h['batch_size']} does not split evenly over {ws} processes; "
              f"each takes {per_device} (effective batch {per_device * ws})", file=sys.stderr)
    has_valid = bool(valid["input_ids"])
    gc = job.get("gradient_checkpointing", False) if gradient_checkpointing is None else gradient_checkpointing
    args = SFTConfig(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=h["epochs"],
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=1,
        learning_rate=h["learning_rate"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"] if s["grad_clip"] > 0 else 1e9,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        seed=s["seed"], data_seed=s["seed"],
        max_length=s["max_seq_len"],
        packing=False,
        logging_steps=1, logging_first_step=True,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=h["eval_every"] if has_valid else None,
        save_strategy="epoch", save_total_limit=1,
        report_to="none",
        bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=gc,
        dataloader_drop_last=False,
    )
    total = max_steps or h["total_steps"]

    class _Trainer(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                steps = num_training_steps or total
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda k: lr_factor(k, steps, s["schedule"], h["warmup_steps"]))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class _EvalAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            # also at each epoch end, as Finetune Desktop does (unless this step just evaluated)
            if has_valid and state.global_step % max(1, h["eval_every"]):
                control.should_evaluate = True
            return control

    trainer = _Trainer(model=model, args=args, train_dataset=Dataset.from_dict(train),
                       eval_dataset=Dataset.from_dict(valid) if has_valid else None,
                       processing_class=tok, peft_config=peft_config, callbacks=[_EvalAtEpochEnd()])
    _check_labels(trainer, train)
    return trainer


def _check_labels(trainer, train) -> None:
    """Fail loudly if this TRL version would train other tokens than the ones chosen above."""
    batch = trainer.data_collator([trainer.train_dataset[0]])
    got = [int(x) for x in batch["labels"][0][: len(train["labels"][0])]]
    want = trainer.train_dataset[0]["labels"]
    if got != want:
        sys.exit("error: this TRL version changes the loss mask of pre-tokenized examples; "
                 "install the versions in README.md")


# ----------------------------------------------------------------------------- main
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run this fine-tuning job (settings in job.json).")
    p.add_argument("--output", default=str(HERE / "output"), help="where the result goes (default: output/)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a quick test)")
    p.add_argument("--per-device-batch-size", type=int, default=None,
                   help="examples per GPU per step (default: the job's batch size divided by the GPU count)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass to save GPU memory")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                   help="auto: bf16 on GPUs that have it, else fp16 on GPUs, fp32 on a CPU")
    a = p.parse_args(argv)
    job = load_job()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    t0 = time.time()
    trainer = build_trainer(job, out, max_steps=a.max_steps, per_device_batch_size=a.per_device_batch_size,
                            gradient_checkpointing=a.gradient_checkpointing, precision=a.precision)
    trainer.train()
    if job["settings"]["method"] == "lora":
        trainer.save_model(str(out / "adapter"))
    else:
        trainer.save_model(str(out / "model"))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        _write_json(out / "result.json", {
            "status": "finished", "started": started,
            "finished": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.time() - t0, 1), "global_step": trainer.state.global_step,
            "epoch": trainer.state.epoch, "world_size": world_size(), "method": job["settings"]["method"],
            "trained_by": "trl", "versions": _versions()})
        print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
