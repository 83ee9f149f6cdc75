"""The GUI's only doorway into data/ and training/: validation, estimates, run folders,
checkpoints as chat models, and starting the training loop. Widgets never import those
packages directly, so this file is where their signatures are adapted."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.config import ModelConfig
from ..training.loading import base_model_dir
from .paths import runs_dir


# ----------------------------------------------------------------------------- base models
def embedded_base_model() -> Path:
    return base_model_dir()


def is_model_folder(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file())


def describe_model_folder(path) -> str:
    """'llama · 4 layers · 9.2M parameters' (or a reason it cannot be used)."""
    try:
        cfg = ModelConfig.from_json_file(Path(path) / "config.json")
    except Exception as e:  # noqa: BLE001
        return f"cannot read config.json: {e}"
    n = count_params(cfg)
    return f"{cfg.model_type} · {cfg.num_hidden_layers} layers · {_human_count(n)} parameters"


def count_params(cfg: ModelConfig) -> int:
    from ..engine.model import expected_shapes
    return int(sum(math.prod(s) for s in expected_shapes(cfg).values()))


def count_lora_params(cfg: ModelConfig, rank: int, targets) -> int:
    from ..engine.model import expected_shapes
    n = 0
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".weight") and len(shape) == 2 and ".layers." in name:
            mod = name.split(".")[-2]
            if mod in targets:
                n += rank * (shape[0] + shape[1])
    return n


def _human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------- data
def load_tokenizer(model_dir):
    from ..engine import Tokenizer
    return Tokenizer.from_pretrained(model_dir)


def validate_file(path, tokenizer, max_seq_len: int, batch_size: int | None = None,
                  tokens_per_second: float | None = None):
    """A ValidationReport (data/ owns the rules)."""
    from ..data import validate_file as vf
    kwargs = {}
    import inspect
    params = inspect.signature(vf).parameters
    for k, v in (("max_seq_len", max_seq_len), ("batch_size", batch_size), ("tokens_per_second", tokens_per_second)):
        if k in params and v is not None:
            kwargs[k] = v
    return vf(path, tokenizer, **kwargs)


def report_token_stats(report) -> tuple[int, int, int]:
    """(examples, total tokens, longest example in tokens) from a report."""
    ex = list(getattr(report, "examples", []) or [])
    if ex:
        lens = [len(e) for e in ex]
        return len(ex), int(sum(lens)), int(max(lens))
    st = report.stats or {}
    n = int(st.get("examples", len(report.conversations)) or 0)
    tot = int(st.get("tokens", st.get("total_tokens", 0)) or 0)
    longest = int(st.get("max_tokens", st.get("longest_tokens", 0)) or 0)
    return n, tot, longest


@dataclass(frozen=True)
class Estimate:
    epochs: int
    batch_size: int
    learning_rate: float
    steps: int
    seconds: float
    memory_bytes: int
    memory_fits: bool
    memory_text: str


def estimate_run(model_dir, cfg_kwargs: dict, n_examples: int, total_tokens: int, longest: int,
                 tokens_per_second: float | None) -> Estimate:
    from ..training.auto import resolve
    from ..training.config import TrainConfig
    from ..training.memory import estimate_peak_memory
    tc = TrainConfig(**cfg_kwargs)
    n_train = max(1, int(round(n_examples * (1 - tc.val_split)))) if tc.val_split > 0 else max(1, n_examples)
    longest = max(1, min(longest or 1, tc.max_seq_len))
    hp = resolve(tc, n_train, longest)
    mcfg = ModelConfig.from_json_file(Path(model_dir) / "config.json")
    n_params = count_params(mcfg)
    trainable = n_params if tc.method == "full" else count_lora_params(mcfg, tc.lora_rank, tc.lora_targets)
    mem = estimate_peak_memory(mcfg, n_params, trainable, hp.batch_size, longest, tc.method == "full")
    if not tokens_per_second:
        # a rough CPU guess, replaced by the measured speed of this model after its first run:
        # ~40 GFLOP/s effective (the engine does 55-80 on 2 cores in bench/engine_speed.py; short
        # fine-tuning batches do less), 6 FLOPs per parameter per token for full fine-tuning,
        # 4 for LoRA (frozen weights get no weight gradient)
        flops_per_token = (6.0 if tc.method == "full" else 4.0) * max(1, n_params)
        tokens_per_second = 40e9 / flops_per_token
    train_tokens = total_tokens * (n_train / max(1, n_examples)) * 1.25  # padding inside batches
    seconds = train_tokens * hp.epochs / max(1e-9, tokens_per_second)
    return Estimate(hp.epochs, hp.batch_size, hp.learning_rate, hp.total_steps, seconds, mem.total_bytes,
                    mem.fits, mem.explain())


# ----------------------------------------------------------------------------- runs
def list_runs():
    from ..training.runs import list_runs as lr
    return lr(runs_dir())


def run_title(run_dir) -> str:
    try:
        d = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
        t = d.get("title")
        if isinstance(t, str) and t.strip():
            return t.strip()
    except (OSError, ValueError):
        pass
    return short_run_name(Path(run_dir).name)


def short_run_name(folder_name: str) -> str:
    """'2026-11-27_075353_pirate_captain' -> 'pirate_captain (11-27 07:53)'; other names unchanged."""
    import re
    m = re.match(r"^\d{4}-(\d{2})-(\d{2})_(\d{2})(\d{2})\d{2}_(.+)$", folder_name)
    if not m:
        return folder_name
    mo, d, h, mi, stem = m.groups()
    return f"{stem} ({mo}-{d} {h}:{mi})"


def set_run_title(run_dir, title: str) -> None:
    from ..training.runs import update_run_json
    update_run_json(run_dir, title=title)


def read_run_info(run_dir) -> dict:
    from ..training.runs import read_run_json
    return read_run_json(run_dir)


def load_metric_rows(run_dir) -> list[dict]:
    from ..training.runs import load_run_metrics
    m = load_run_metrics(run_dir)
    return list(m.train) + list(m.eval)


def checkpoints(run_dir) -> list[Path]:
    from ..training.runs import checkpoint_dirs
    return checkpoint_dirs(run_dir)


def checkpoint_step(path) -> int:
    try:
        return int(Path(path).name.split("-")[-1])
    except ValueError:
        return 0


def delete_run(run_dir) -> None:
    p = Path(run_dir)
    if not (p / "run.json").is_file():
        raise OSError(f"{p} is not a run folder")
    trash = p.with_name("." + p.name + ".deleting")
    p.rename(trash)         # atomic: the run disappears from the list at once
    shutil.rmtree(trash, ignore_errors=True)


def copy_folder(src, dst) -> str:
    """Copy a model/adapter folder to dst (atomically: temp folder, then rename)."""
    from ..engine.checkpoint import make_temp_dir_beside, replace_dir_atomically
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise OSError(f"{src} does not exist")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir_beside(dst)
    try:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        replace_dir_atomically(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dst)


def load_checkpoint_model(run_dir, ckpt_dir):
    """(Model, Tokenizer) with a checkpoint's trainable tensors applied to the run's base model."""
    from ..engine import LoraConfig, Model, Tokenizer
    from ..training.config import TrainConfig
    from ..training.runs import load_checkpoint
    info = read_run_info(run_dir)
    base = (info.get("base_model") or {}).get("path")
    if not base or not Path(base).exists():
        raise OSError(f"the base model of this run ({base}) is not available any more")
    tc = TrainConfig.from_dict(info.get("settings") or {})
    model = Model.from_pretrained(base)
    trainable, _opt, _state = load_checkpoint(ckpt_dir)
    if any(".lora_" in k for k in trainable):
        model.add_lora(LoraConfig(r=tc.lora_rank, alpha=tc.lora_alpha, dropout=0.0, target_modules=tc.lora_targets))
        for k, v in trainable.items():
            if k not in model.lora or model.lora[k].shape != v.shape:
                raise OSError(f"{ckpt_dir}: checkpoint tensor {k} does not fit the base model")
            model.lora[k] = v.astype(model.dtype)
    else:
        for k, v in trainable.items():
            if k in model.params and model.params[k].shape == v.shape:
                model.params[k] = v.astype(model.dtype)
    tok_dir = Path(run_dir) / "model" if (Path(run_dir) / "model" / "tokenizer.json").exists() else base
    return model, Tokenizer.from_pretrained(tok_dir)


# ----------------------------------------------------------------------------- training
def new_run_dir(name_hint: str) -> Path:
    from ..training.runs import new_run_dir as nrd
    return nrd(name_hint, home=runs_dir())


def make_control():
    from ..training.control import TrainControl
    return TrainControl()


def make_train_fn(data_path: str, run_dir: str, base_model: str, cfg_kwargs: dict, valid_path: str | None):
    """A function (on_event, control) -> None that runs the whole training loop."""
    from ..training.config import TrainConfig
    config = TrainConfig(**cfg_kwargs)

    def run(on_event, control):
        from ..training.session import start_training
        start_training(data_path, run_dir=run_dir, config=config, base=base_model, validation_path=valid_path,
                       on_event=on_event, control=control)

    return run


def make_resume_fn(run_dir: str, extra_epochs: int):
    """A function (on_event, control) -> None that continues a run from its newest checkpoint,
    adding extra_epochs (0 = just finish a stopped run)."""
    def run(on_event, control):
        from ..training.session import resume_training
        resume_training(run_dir, extra_epochs=extra_epochs, on_event=on_event, control=control)
    return run
