"""`--format hf` and `--format peft` exports: copies of a model folder or a run's PEFT adapter,
written to a temp folder beside the target and renamed into place."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..engine.checkpoint import RUN_MODEL_SUBDIR, make_temp_dir_beside, replace_dir_atomically
from .errors import InteropError


def _check_target(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise InteropError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            raise InteropError(f"{out} exists and is not empty")
    return out


def _copy_files(src: Path, out: Path, names: list[str]) -> Path:
    tmp = make_temp_dir_beside(out)
    try:
        for n in names:
            shutil.copyfile(src / n, tmp / n)
        replace_dir_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf(spec: str, out) -> Path:
    """Copy the HF model folder a spec stands for (a run's merged model/, a model folder, 'base',
    a cached repo id) to `out`: config, safetensors weights and tokenizer files."""
    from ..training.loading import _model_folder_or_raise

    folder, _ = _model_folder_or_raise(spec, InteropError)
    out = _check_target(out)
    names = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".bin", ".pt", ".pth")))
    if not any(n.endswith(".safetensors") for n in names):
        raise InteropError(f"{folder}: no safetensors weights to copy")
    return _copy_files(folder, out, names)


def run_adapter_dir(spec: str) -> Path:
    """The adapter/ folder of a run (given the run folder or its model/ folder)."""
    p = Path(spec).expanduser()
    if p.name == RUN_MODEL_SUBDIR and (p.parent / "run.json").is_file():
        p = p.parent
    if not (p / "run.json").is_file():
        raise InteropError(f"{p} is not a run folder (no run.json); a PEFT adapter comes from a LoRA run")
    a = p / "adapter"
    if not (a / "adapter_config.json").is_file():
        raise InteropError(f"{p}: this run has no adapter (adapter/adapter_config.json is missing; "
                           "full fine-tuning writes no adapter)")
    return a


def export_peft(spec: str, out) -> Path:
    """Copy a run's PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to `out`."""
    a = run_adapter_dir(spec)
    out = _check_target(out)
    names = sorted(p.name for p in a.iterdir() if p.is_file() and not p.name.startswith("."))
    return _copy_files(a, out, names)
