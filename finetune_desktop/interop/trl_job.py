"""A self-contained TRL + PEFT + accelerate job folder, for fine-tuning on machines with GPUs:

    DIR/job.json             every setting, resolved with the same rules as our trainer (auto.resolve)
    DIR/data/train.jsonl     the training conversations (OpenAI messages format, "weight": 0 kept)
    DIR/data/valid.jsonl     the validation conversations (--validation-file, or --val-split with our split)
    DIR/base_model/          a copy of the built-in model (other bases: path + Hub repo id in job.json)
    DIR/train.py             TRL's SFTTrainer; does not import Finetune Desktop
    DIR/accelerate/*.yaml    one GPU, several GPUs (DDP), several machines, DeepSpeed ZeRO-2 and ZeRO-3
    DIR/README.md            the commands
    DIR/output/              filled in by train.py; `finetune-desktop import DIR` reads it

The examples and the split are the ones our `train` would use: the file is validated and encoded
by our data pipeline, the examples with no trained token left are dropped, and the validation
split is data.split_train_valid with the run's seed. train.py renders and masks each
conversation the way data/encode.py does (assistant replies with their end-of-turn token)."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..engine.checkpoint import atomic_write_json, atomic_write_text, make_temp_dir_beside, replace_dir_atomically
from ..training.config import TrainConfig
from .errors import InteropError

JOB_FORMAT = 1
ACCELERATE_CONFIGS = ("single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2", "deepspeed_zero3")
_SNAPSHOT_RE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}$")


@dataclass(frozen=True)
class JobInfo:
    folder: Path
    num_train: int
    num_valid: int
    hyper: dict
    settings: dict


def template_text() -> str:
    return files("finetune_desktop.interop").joinpath("job_template", "train.py").read_text(encoding="utf-8")


def repo_id_of(spec: str, folder: Path) -> str | None:
    """The Hub repo id of a base model: the spec itself when it named one, or the one its
    Hugging Face cache path shows."""
    from ..training.hf_cache import looks_like_repo_id

    if looks_like_repo_id(spec) and not Path(spec).exists():
        return spec
    m = _SNAPSHOT_RE.search(str(Path(folder).resolve()))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _conv_json(conv) -> str:
    msgs = []
    for m in conv.messages:
        d = {"role": m.role, "content": m.content}
        if m.role == "assistant" and not m.weight:
            d["weight"] = 0
        if m.name is not None:
            d["name"] = m.name
        msgs.append(d)
    return json.dumps({"messages": msgs}, ensure_ascii=False)


def _pick(convs, examples) -> list:
    """The conversations behind encoded examples (matched by source line), in file order."""
    lines = {e.line for e in examples}
    return [c for c in convs if c.line in lines]


def _accelerate_yaml(kind: str) -> str:
    common = "compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\ndowncast_bf16: 'no'\nuse_cpu: false\n"
    if kind == "single_gpu":
        return common + "distributed_type: 'NO'\nnum_machines: 1\nnum_processes: 1\nmachine_rank: 0\n"
    if kind == "multi_gpu":
        return (common + "distributed_type: MULTI_GPU\nnum_machines: 1\n"
                "num_processes: 8  # the number of GPUs; or pass --num_processes N\nmachine_rank: 0\n"
                "gpu_ids: all\nmain_training_function: main\n")
    if kind == "multi_node":
        return (common + "distributed_type: MULTI_GPU\n"
                "num_machines: 2  # machines\nnum_processes: 16  # GPUs on all machines together\n"
                "machine_rank: 0  # 0 on the main machine, 1, 2, ... on the others (--machine_rank)\n"
                "main_process_ip: 127.0.0.1  # the main machine's address (--main_process_ip)\n"
                "main_process_port: 29500\nrdzv_backend: static\nsame_network: true\ngpu_ids: all\n"
                "main_training_function: main\n")
    stage = 2 if kind == "deepspeed_zero2" else 3
    ds = ("distributed_type: DEEPSPEED\ndeepspeed_config:\n"
          f"  zero_stage: {stage}\n  offload_optimizer_device: none\n  offload_param_device: none\n"
          "  gradient_accumulation_steps: 1\n")
    if stage == 3:
        ds += "  zero3_init_flag: true\n  zero3_save_16bit_model: true\n"
    else:
        ds += "  zero3_init_flag: false\n"
    return (common + ds + "num_machines: 1\nnum_processes: 8  # the number of GPUs; or pass --num_processes N\n"
            "machine_rank: 0\nmain_training_function: main\n")


def _readme(job: dict) -> str:
    h, s = job["hyper"], job["settings"]
    base = job["base_model"]
    where = ("base_model/ (a copy of Finetune Desktop's built-in model)" if base.get("copy") else
             f"{base.get('path')}" + (f" (Hub: {base['repo_id']})" if base.get("repo_id") else ""))
    return f"""# Fine-tuning job

Written by Finetune Desktop from `{Path(job['data']['path']).name}`: {job['data']['num_train']} training and
{job['data']['num_valid']} validation conversations, base model {where}.
Method {s['method']}{f" (LoRA rank {s['lora_rank']}, alpha {s['lora_alpha']:g})" if s['method'] == 'lora' else ''},
{h['epochs']} epochs x {h['steps_per_epoch']} steps of {h['batch_size']} examples, learning rate
{h['learning_rate']:.3g} ({s['schedule']} after {h['warmup_steps']} warmup steps), sequences up to
{s['max_seq_len']} tokens, seed {s['seed']}. Every setting is in `job.json`.

## Install

    pip install "torch>=2.4" "transformers>=5,<6" "peft>=0.17,<1" "trl>=1.16,<2" "accelerate>=1.0,<2" "datasets>=3,<6"
    pip install "deepspeed>=0.15"    # only for the DeepSpeed configs

## Run

Run the commands from this folder.

| where | command |
|---|---|
| any machine, one process (a CPU works for small jobs) | `python train.py` |
| one GPU | `accelerate launch --config_file accelerate/single_gpu.yaml train.py` |
| N GPUs on one machine (DDP) | `accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes N train.py` |
| several machines | on each: `accelerate launch --config_file accelerate/multi_node.yaml --num_machines M --num_processes TOTAL_GPUS --machine_rank R --main_process_ip MAIN_IP train.py` |
| DeepSpeed ZeRO-2 | `accelerate launch --config_file accelerate/deepspeed_zero2.yaml --num_processes N train.py` |
| DeepSpeed ZeRO-3 | `accelerate launch --config_file accelerate/deepspeed_zero3.yaml --num_processes N train.py` |

The configs use bf16 mixed precision (A100, H100, L4, RTX 30xx and newer); on older GPUs change
`mixed_precision: bf16` to `fp16` in the config and add `--precision fp16`. The batch of
{h['batch_size']} examples is split over the processes (`--per-device-batch-size` overrides it).
`python train.py --help` lists the options (`--max-steps 2` for a quick test, `--gradient-checkpointing`,
`--precision`).

## Result

`output/` gets {'`adapter/` (the PEFT LoRA adapter)' if s['method'] == 'lora' else '`model/` (the tuned model)'},
`trainer_state.json` (the loss curves), `result.json` and the last checkpoint in `checkpoints/`.
Copy the whole folder back and turn it into a Finetune Desktop run:

    finetune-desktop import JOB_FOLDER
"""


def write_job(data_path, out_dir, config: TrainConfig = TrainConfig(), base: str = "base",
              validation_path=None) -> JobInfo:
    """Write the job folder (atomically: a temp folder renamed into place). Raises data.DataError
    for a training file with errors, InteropError / TrainingSetupError for the rest."""
    from ..training.auto import resolve
    from ..training.loading import base_model_dir
    from ..training.runs import sha256_file, versions
    from ..training.session import (_steps_per_epoch, check_config, check_run_dir_free, fit_config_to_model,
                                    load_base_model, prepare_data)

    check_config(config)
    out = Path(out_dir).expanduser()
    try:
        check_run_dir_free(out)
    except Exception as e:  # noqa: BLE001 - RunFolderInUse words it for runs; say it for jobs
        raise InteropError(str(e).replace("already holds a run", "already holds a run, not a job")) from None
    model, tok, base_dir = load_base_model(base)
    config = fit_config_to_model(config, model)
    data = prepare_data(data_path, tok, config, validation_path)
    longest = max(len(e) for e in data.train)
    tokens = int(sum(len(e) for e in data.train))
    bs = resolve(config, len(data.train), longest, train_tokens=tokens).batch_size
    spe = _steps_per_epoch(data.train, bs, config.seed, tok.pad_token_id)
    hyper = resolve(config, len(data.train), longest, steps_per_epoch=spe, train_tokens=tokens)

    train_convs = _pick(data.conversations, data.train)
    valid_convs = _pick(data.valid_conversations if validation_path else data.conversations, data.valid)
    embedded = Path(base_dir).resolve() == base_model_dir().resolve()
    base_info = {"spec": base, "path": str(Path(base_dir).resolve()), "repo_id": None if embedded else
                 repo_id_of(base, Path(base_dir)), "copy": "base_model" if embedded else None,
                 "model_type": model.config.model_type, "num_parameters": model.num_parameters()}
    job = {
        "format": JOB_FORMAT,
        "kind": "finetune-desktop-trl-job",
        "base_model": base_info,
        "data": {"path": str(Path(data_path).resolve()), "sha256": sha256_file(data_path),
                 "validation_path": str(Path(validation_path).resolve()) if validation_path else None,
                 "validation_sha256": sha256_file(validation_path) if validation_path else None,
                 "num_examples": len(data.conversations), "num_train": len(train_convs),
                 "num_valid": len(valid_convs), "train_file": "data/train.jsonl", "valid_file": "data/valid.jsonl",
                 "trained_tokens": int(sum(e.num_trained_tokens for e in data.train))},
        "settings": config.to_dict(),
        "hyper": hyper.to_dict(),
        "tokenizer": {"end_of_turn_ids": sorted(int(i) for i in tok.end_of_turn_ids),
                      "pad_token_id": int(tok.pad_token_id)},
        "chat_template": tok.chat_template,
        "system_prompt": data.system_prompt,
        "precision": "auto",
        "gradient_checkpointing": False,
        "versions": versions(),
    }
    tmp = make_temp_dir_beside(out)
    try:
        (tmp / "data").mkdir()
        atomic_write_text(tmp / "data" / "train.jsonl", "".join(_conv_json(c) + "\n" for c in train_convs))
        atomic_write_text(tmp / "data" / "valid.jsonl", "".join(_conv_json(c) + "\n" for c in valid_convs))
        if embedded:
            (tmp / "base_model").mkdir()
            for p in Path(base_dir).iterdir():
                if p.is_file() and not p.name.startswith("."):
                    shutil.copyfile(p, tmp / "base_model" / p.name)
        atomic_write_text(tmp / "train.py", template_text())
        (tmp / "accelerate").mkdir()
        for kind in ACCELERATE_CONFIGS:
            atomic_write_text(tmp / "accelerate" / f"{kind}.yaml", _accelerate_yaml(kind))
        atomic_write_text(tmp / "README.md", _readme(job))
        atomic_write_json(tmp / "job.json", job)
        if out.exists():
            out.rmdir()  # empty (checked above)
        replace_dir_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return JobInfo(out, len(train_convs), len(valid_convs), hyper.to_dict(), config.to_dict())
