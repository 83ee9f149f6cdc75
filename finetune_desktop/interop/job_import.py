"""Import a finished TRL job (written by trl_job.write_job, run by its train.py) as a normal run
folder: run.json (status finished, settings, base model, data + sha256, versions, trained by TRL),
metrics.jsonl from trainer_state.json's log_history, model/ (the base with the LoRA merged by our
engine, plus the base's tokenizer files) and adapter/.

Only JSON and safetensors files are read from the job: adapter_config.json,
adapter_model.safetensors (or the full model's config.json + safetensors), trainer_state.json,
result.json, job.json. The pickles TRL writes beside them (training_args.bin, optimizer.pt, ...)
are never opened."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.checkpoint import atomic_write_text, make_temp_dir_beside, replace_dir_atomically
from .errors import InteropError, read_json_object


@dataclass(frozen=True)
class ImportResult:
    run_dir: Path
    steps: int
    final_train_loss: float | None
    final_valid_loss: float | None


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def metrics_from_log_history(history: list, source: str = "trainer_state.json") -> list[dict]:
    """trainer_state.json's log_history -> metrics.jsonl lines in our run format: train lines
    (step, epoch, train_loss, lr, grad_norm, train_token_accuracy, tokens) and eval lines
    (step, epoch, valid_loss, valid_token_accuracy), in step order."""
    if not isinstance(history, list):
        raise InteropError(f"{source}: log_history is not a list")
    out = []
    for k, e in enumerate(history):
        if not isinstance(e, dict) or not isinstance(e.get("step"), int):
            continue
        step, epoch = int(e["step"]), _num(e.get("epoch"))
        if _num(e.get("loss")) is not None:
            line = {"step": step, "epoch": epoch, "train_loss": _num(e["loss"])}
            for src, dst in (("learning_rate", "lr"), ("grad_norm", "grad_norm"),
                             ("mean_token_accuracy", "train_token_accuracy"), ("num_tokens", "tokens")):
                if _num(e.get(src)) is not None:
                    line[dst] = _num(e[src])
            out.append(line)
        elif _num(e.get("eval_loss")) is not None:
            line = {"step": step, "epoch": epoch, "valid_loss": _num(e["eval_loss"])}
            if _num(e.get("eval_mean_token_accuracy")) is not None:
                line["valid_token_accuracy"] = _num(e["eval_mean_token_accuracy"])
            out.append(line)
    out.sort(key=lambda d: (d["step"], "valid_loss" in d))
    return out


def _base_spec(job: dict, job_dir: Path) -> str:
    """The base model to merge into: the job's own copy (recorded as the built-in model when it
    is byte-identical to it), the recorded folder, or its Hub repo id in the local cache."""
    from ..training.hf_cache import cached_snapshot
    from ..training.loading import base_model_dir
    from ..training.runs import sha256_file

    b = job.get("base_model") or {}
    if b.get("copy"):
        copy = job_dir / str(b["copy"])
        if not (copy / "config.json").is_file():
            raise InteropError(f"{copy}: the job's copy of its base model is missing (base_model.copy in job.json)")
        emb = base_model_dir()
        w1, w2 = copy / "model.safetensors", emb / "model.safetensors"
        if w1.is_file() and w2.is_file() and sha256_file(w1) == sha256_file(w2):
            return "base"
        return str(copy)
    path = b.get("path")
    if path and Path(path).is_dir():
        return str(path)
    if b.get("repo_id"):
        snap = cached_snapshot(str(b["repo_id"]))
        if snap is not None:
            return str(snap)
    raise InteropError(f"{job_dir / 'job.json'}: base_model.path {path!r} does not exist here"
                       + (f" and {b['repo_id']} is not in the local Hugging Face cache" if b.get("repo_id") else ""))


def import_job(job_dir, out=None) -> ImportResult:
    from ..engine import Model
    from ..training.loading import open_model, resolve_model_spec
    from ..training.runs import new_run_dir, now_iso, save_run_model, sha256_file, versions, write_run_json
    from ..training.session import check_run_dir_free

    job_dir = Path(job_dir).expanduser()
    if not job_dir.is_dir():
        raise InteropError(f"{job_dir}: no such job folder")
    job = read_json_object(job_dir / "job.json", "job.json")
    if job.get("kind") != "finetune-desktop-trl-job":
        raise InteropError(f"{job_dir / 'job.json'}: kind is {job.get('kind')!r}, not a Finetune Desktop job")
    try:
        settings, hyper, method = dict(job["settings"]), dict(job["hyper"]), job["settings"]["method"]
    except (KeyError, TypeError):
        raise InteropError(f"{job_dir / 'job.json'}: settings or hyper is missing") from None
    output = job_dir / "output"
    state = read_json_object(output / "trainer_state.json", "trainer_state.json (has the job run to the end?)")
    result = read_json_object(output / "result.json", "result.json") if (output / "result.json").exists() else {}
    metrics = metrics_from_log_history(state.get("log_history"), str(output / "trainer_state.json"))

    spec = _base_spec(job, job_dir)
    model, tok, base_dir, _ = open_model(spec, InteropError)
    if method == "lora":
        adapter = output / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise InteropError(f"{adapter}: adapter_config.json is missing (has the job run to the end?)")
        try:
            model.load_adapter(adapter)
        except InteropError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine's ModelFormatError names the file
            raise InteropError(str(e)) from None
    elif method == "full":
        mdir = output / "model"
        if not (mdir / "config.json").is_file():
            raise InteropError(f"{mdir}: config.json is missing (has the job run to the end?)")
        try:
            tuned = Model.from_pretrained(mdir)
        except Exception as e:  # noqa: BLE001
            raise InteropError(str(e)) from None
        if tuned.config.model_type != model.config.model_type or tuned.config.vocab_size != model.config.vocab_size:
            raise InteropError(f"{mdir / 'config.json'}: model_type/vocab_size do not match the base model {base_dir}")
        model = tuned
    else:
        raise InteropError(f"{job_dir / 'job.json'}: settings.method {method!r} is not lora or full")

    if out is None:
        out = new_run_dir(Path((job.get("data") or {}).get("path") or job_dir.name).stem)
    try:
        out = check_run_dir_free(out)
    except Exception as e:  # noqa: BLE001 - say it in the import's words
        raise InteropError(str(e)) from None

    train_lines = [m for m in metrics if "train_loss" in m]
    eval_lines = [m for m in metrics if "valid_loss" in m]
    steps = int(state.get("global_step") or (train_lines[-1]["step"] if train_lines else 0))
    last_train = train_lines[-1]["train_loss"] if train_lines else None
    last_valid = eval_lines[-1]["valid_loss"] if eval_lines else None
    best = min((m["valid_loss"] for m in eval_lines), default=None)
    data = dict(job.get("data") or {})
    base_path = resolve_model_spec(spec)
    wf = base_path / "model.safetensors"
    info = {
        "format": 1,
        "status": "finished",
        "created": result.get("started") or now_iso(),
        "finished": result.get("finished") or now_iso(),
        "elapsed_s": result.get("seconds"),
        "trained_by": "trl",
        "note": "trained by TRL's SFTTrainer (PEFT, accelerate) from a Finetune Desktop job, then imported",
        "job": {"path": str(job_dir.resolve()), "world_size": result.get("world_size"),
                "versions": result.get("versions")},
        "base_model": {"spec": spec, "path": str(Path(base_path).resolve()),
                       "weights_sha256": sha256_file(wf) if wf.is_file() else None,
                       "repo_id": (job.get("base_model") or {}).get("repo_id"),
                       "model_type": model.config.model_type, "num_parameters": model.num_parameters()},
        "data": {"path": data.get("path"), "sha256": data.get("sha256"),
                 "validation_path": data.get("validation_path"), "validation_sha256": data.get("validation_sha256"),
                 "num_examples": data.get("num_examples"), "num_train": data.get("num_train"),
                 "num_valid": data.get("num_valid"), "trained_tokens": data.get("trained_tokens")},
        "settings": settings,
        "hyper": hyper,
        "system_prompt": job.get("system_prompt"),
        "versions": versions(),
        "step": steps,
        "final": {"train_loss": last_train, "valid_loss": last_valid, "steps": steps,
                  "elapsed_s": result.get("seconds"), "best_valid_loss": best},
        "model": "model",
        "adapter": "adapter" if method == "lora" else None,
    }
    tmp = make_temp_dir_beside(out)
    try:
        write_run_json(tmp, info)
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in metrics))
        save_run_model(model, tmp, Path(base_dir), job.get("system_prompt"))
        if out.exists():
            out.rmdir()  # empty (checked above)
        replace_dir_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out, steps, last_train, last_valid)
