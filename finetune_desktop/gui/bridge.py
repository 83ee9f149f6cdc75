"""The GUI's doorway into data/, training/ and engine/: validation, estimates, run folders,
checkpoints as chat models, and starting the training loop. No Qt here, and nothing here is
called on the GUI thread when it touches files: the controllers run those functions in workers."""
from __future__ import annotations

import itertools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.config import ModelConfig
from ..training.loading import base_model_dir
from ..training.runs import RunError, runs_home


# ----------------------------------------------------------------------------- base models
def embedded_base_model() -> Path:
    return base_model_dir()


def is_model_folder(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file())


def read_model_config(path) -> ModelConfig:
    return ModelConfig.from_json_file(Path(path) / "config.json")


def describe_model_config(cfg: ModelConfig) -> str:
    """'llama · 6 layers · 3.9M parameters'."""
    return f"{cfg.model_type} · {cfg.num_hidden_layers} layers · {human_count(cfg.num_parameters())} parameters"


def count_lora_params(cfg: ModelConfig, rank: int, targets) -> int:
    from ..engine.model import expected_shapes
    n = 0
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".weight") and len(shape) == 2 and ".layers." in name:
            if name.split(".")[-2] in targets:
                n += rank * (shape[0] + shape[1])
    return n


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class BaseInfo:
    """What the window needs to know about a base model folder (read on a worker)."""
    path: str
    ok: bool
    config: ModelConfig | None
    description: str


def base_info(path) -> BaseInfo:
    if not is_model_folder(path):
        return BaseInfo(str(path), False, None, "")
    try:
        cfg = read_model_config(path)
    except Exception as e:  # noqa: BLE001 - shown as the description
        return BaseInfo(str(path), True, None, f"cannot read config.json: {e}")
    return BaseInfo(str(path), True, cfg, describe_model_config(cfg))


# ----------------------------------------------------------------------------- data
def load_tokenizer(model_dir):
    from ..engine import Tokenizer
    return Tokenizer.from_pretrained(model_dir)


def validate_file(path, tokenizer, max_seq_len: int, batch_size: int = 8, tokens_per_second: float | None = None):
    """A ValidationReport (data/ owns the rules)."""
    from ..data import validate_file as vf
    return vf(path, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size, tokens_per_second=tokens_per_second)


@dataclass(frozen=True)
class ReportSizes:
    examples: int      # valid examples in the file
    tokens: int        # tokens of all examples (before truncation)
    longest: int       # the longest example in tokens
    facts: bool = False  # question/answer data whose answers repeat (training.augment.answers_repeat)


def report_sizes(report) -> ReportSizes:
    """From the report's statistics (see data/validate.py: examples, total_tokens, length_max)."""
    from ..training.augment import answers_repeat

    st = report.stats
    longest = st.get("length_max") if st.get("length_unit") == "tokens" else None
    return ReportSizes(int(st.get("examples") or 0), int(st.get("total_tokens") or 0), int(longest or 0),
                       answers_repeat(report.conversations))


def read_file_line(path, line: int, limit: int = 4000) -> str:
    """Line `line` (1-based) of a text file, cut to `limit` characters."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            text = next(itertools.islice(f, line - 1, None), "")
    except OSError as e:
        return f"(cannot read the file: {e.strerror})"
    return text[:limit] + " …" if len(text) > limit else text


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


def estimate_run(mcfg: ModelConfig, cfg_kwargs: dict, sizes: ReportSizes, tokens_per_second: float | None) -> Estimate:
    """Steps, time and memory of a run with these settings on a file of these sizes. Pure
    computation (the model's config is read beforehand)."""
    from ..training.auto import resolve
    from ..training.config import TrainConfig
    from ..training.memory import estimate_peak_memory
    from ..training.session import estimate_tokens_per_second
    tc = TrainConfig(**cfg_kwargs)
    n = max(1, sizes.examples)
    n_train = max(1, int(round(n * (1 - tc.val_split)))) if tc.val_split > 0 else n
    longest = max(1, min(sizes.longest or 1, tc.max_seq_len))
    hp = resolve(tc, n_train, longest, train_tokens=int(sizes.tokens * n_train / n) or None, facts=sizes.facts)
    n_params = mcfg.num_parameters()
    trainable = n_params if tc.method == "full" else count_lora_params(mcfg, tc.lora_rank, tc.lora_targets)
    mem = estimate_peak_memory(mcfg, n_params, trainable, hp.batch_size, longest, tc.method == "full")
    if not tokens_per_second:
        # the session's first-run guess (replaced by the measured speed after the first run);
        # it only asks its argument for num_parameters(), which the config answers
        tokens_per_second = estimate_tokens_per_second(mcfg, tc.method)
    train_tokens = sizes.tokens * (n_train / n) * 1.25  # padding inside batches
    seconds = train_tokens * hp.epochs / max(1e-9, tokens_per_second)
    return Estimate(hp.epochs, hp.batch_size, hp.learning_rate, hp.total_steps, seconds, mem.total_bytes,
                    mem.fits, mem.explain())


# ----------------------------------------------------------------------------- runs
def list_runs():
    from ..training.runs import list_runs as lr
    return lr(runs_home())


def run_title(run_dir, info: dict | None = None) -> str:
    """The run's title from run.json (pass `info` when it is already read), else a short name."""
    if info is None:
        try:
            info = read_run_info(run_dir)
        except (RunError, OSError, ValueError):
            info = {}
    t = info.get("title")
    if isinstance(t, str) and t.strip():
        return t.strip()
    return short_run_name(Path(run_dir).name)


def short_run_name(folder_name: str) -> str:
    """'2026-11-27_075353_pirate_captain' -> 'pirate_captain (11-27 07:53)'; other names unchanged."""
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
    """metrics.jsonl of a run, train and evaluation rows, by step."""
    from ..training.runs import load_run_metrics
    m = load_run_metrics(run_dir)
    return sorted(list(m.train) + list(m.eval), key=lambda r: (r.get("step") or 0))


def checkpoints(run_dir) -> list[Path]:
    from ..training.runs import checkpoint_dirs
    return checkpoint_dirs(run_dir)


def checkpoint_step(path) -> int:
    try:
        return int(Path(path).name.split("-")[-1])
    except ValueError:
        return 0


def delete_run(run_dir) -> str:
    p = Path(run_dir)
    if not (p / "run.json").is_file():
        raise RunError(f"{p} is not a run folder")
    trash = p.with_name("." + p.name + ".deleting")
    p.rename(trash)         # atomic: the run disappears from the list at once
    shutil.rmtree(trash, ignore_errors=True)
    return str(p)


def copy_folder(src, dst) -> str:
    """Copy a model/adapter folder to dst (atomically: temp folder, then rename)."""
    from ..engine.checkpoint import make_temp_dir_beside, replace_dir_atomically
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise RunError(f"{src} does not exist")
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
    """(Model, Tokenizer): the run's base model with a checkpoint's trainable tensors applied.
    Every trainable tensor must be in the checkpoint with the right shape (as when the training
    loop resumes); otherwise RunError says which one does not fit."""
    from ..engine import LoraConfig, Model, Tokenizer
    from ..training.config import TrainConfig
    from ..training.runs import load_checkpoint
    info = read_run_info(run_dir)
    base = (info.get("base_model") or {}).get("path")
    if not base or not Path(base).exists():
        raise RunError(f"the base model of this run ({base}) is not available any more")
    tc = TrainConfig.from_dict(info.get("settings") or {})
    model = Model.from_pretrained(base)
    saved, _opt, _state = load_checkpoint(ckpt_dir)
    if any(".lora_" in k for k in saved):
        model.add_lora(LoraConfig(r=tc.lora_rank, alpha=tc.lora_alpha, dropout=0.0, target_modules=tc.lora_targets))
    target = model.trainable_params()
    extra = sorted(set(saved) - set(target))
    if extra:
        raise RunError(f"{ckpt_dir}: checkpoint tensor {extra[0]!r} does not belong to the base model {base}")
    for k, v in target.items():
        if k not in saved or saved[k].shape != v.shape:
            raise RunError(f"{ckpt_dir}: checkpoint tensor {k!r} is missing or has the wrong shape "
                           f"for the base model {base}")
        target[k] = saved[k].astype(v.dtype)
    model.weights_changed()
    tok_dir = Path(run_dir) / "model" if (Path(run_dir) / "model" / "tokenizer.json").exists() else base
    return model, Tokenizer.from_pretrained(tok_dir)


# ----------------------------------------------------------------------------- training
def new_run_dir(name_hint: str) -> Path:
    from ..training.runs import new_run_dir as nrd
    return nrd(name_hint, home=runs_home())


def make_control():
    from ..training.control import TrainControl
    return TrainControl()


def make_train_fn(data_path: str, run_dir: str, base_model: str, cfg_kwargs: dict, valid_path: str | None,
                  live=None):
    """A function (on_event, control) -> None that runs the whole training loop. With `live` (a
    live_model.LiveModel) the base model and data are loaded here and handed to start_training,
    so the app knows the model object the loop trains (what start_training would load itself)."""
    from ..training.config import TrainConfig
    config = TrainConfig(**cfg_kwargs)

    def run(on_event, control):
        from ..training.session import (check_config, estimate_tokens_per_second, fit_config_to_model,
                                        load_base_model, prepare_data, start_training)
        if live is None:
            start_training(data_path, run_dir=run_dir, config=config, base=base_model, validation_path=valid_path,
                           on_event=on_event, control=control)
            return
        check_config(config)
        model, tok, base_dir = load_base_model(base_model)
        fitted = fit_config_to_model(config, model)
        data = prepare_data(data_path, tok, fitted, valid_path, estimate_tokens_per_second(model, fitted.method),
                            base_dir=base_dir)
        live.attach(model, tok, base_dir, fitted.method)
        emit = live.wrap(on_event)
        start_training(data_path, run_dir=run_dir, config=config, base=base_model, validation_path=valid_path,
                       on_event=emit, control=control, prepared=(model, tok, base_dir, data))
        live.final_measure(on_event)

    return run


def make_resume_fn(run_dir: str, extra_epochs: int):
    """A function (on_event, control) -> None that continues a run from its newest checkpoint,
    adding extra_epochs (0 = just finish a stopped run)."""
    def run(on_event, control):
        from ..training.session import resume_training
        resume_training(run_dir, extra_epochs=extra_epochs, on_event=on_event, control=control)
    return run


# ----------------------------------------------------------------------------- looking inside
@dataclass(frozen=True)
class ExampleRef:
    """One encoded example the per-token view can show."""
    line: int
    split: str                     # "training" or "validation"
    input_ids: tuple
    labels: tuple
    preview: str                   # the first words of its text


def example_refs(report, valid_report, val_split: float, seed: int, tokenizer=None) -> list[ExampleRef]:
    """The training and validation examples of a checked file (and of the validation file), split
    the way the training session splits them (data.split_train_valid with the run's seed)."""
    from ..data.batching import split_train_valid
    usable = [e for e in (getattr(report, "examples", None) or []) if e.num_trained_tokens > 0]
    if valid_report is not None:
        train, valid = usable, [e for e in (getattr(valid_report, "examples", None) or []) if e.num_trained_tokens > 0]
    elif val_split > 0:
        train, valid = split_train_valid(usable, val_split, seed)
    else:
        train, valid = usable, []
    texts = {c.line: c for c in (getattr(report, "conversations", None) or [])}
    vtexts = {c.line: c for c in (getattr(valid_report, "conversations", None) or [])} if valid_report else texts
    out = []
    for split, exs, convs in (("training", train, texts), ("validation", valid, vtexts)):
        for e in exs:
            conv = convs.get(e.line)
            words = " ".join(m.content for m in conv.messages if m.role == "user")[:60] if conv else ""
            out.append(ExampleRef(int(e.line), split, tuple(int(i) for i in e.input_ids),
                                  tuple(int(x) for x in e.labels), words))
    return out


def token_picture(model, tokenizer, input_ids, labels, label: str):
    """Every token of one example under `model` with the engine's per-token loss
    (training.inspect.token_losses), ready to draw (gui/tokens.py)."""
    from ..training.inspect import token_losses
    from .tokens import TokenPicture, display_pieces
    tl = token_losses(model, tokenizer, input_ids, labels)
    return TokenPicture(tuple(display_pieces(tokenizer, tl.ids)), tl.losses, tl.probs, tl.top, tl.mean_loss, label)


# ----------------------------------------------------------------------------- models elsewhere
def cached_models() -> list:
    """Models in the local Hugging Face cache (training.hf_cache.CachedModel), loadable or not."""
    from ..training.hf_cache import list_cached_models
    return list_cached_models()


def human_bytes(n: int) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


EXPORT_KINDS = {"gguf": "GGUF file + Ollama Modelfile", "hf": "Hugging Face folder (LoRA merged)",
                "peft": "PEFT adapter folder (LoRA only)"}


def export(run_dir: str, kind: str, dest: str, gguf_type: str = "q8_0") -> str:
    """Export a run's model: a GGUF file (f32 / f16 / q8_0) with an Ollama Modelfile, an HF folder
    or its PEFT adapter (interop/). Returns what was written, in words."""
    if kind == "gguf":
        from ..interop.gguf_export import export_gguf
        r = export_gguf(str(run_dir), dest, gguf_type)
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        return f"{r.path} ({r.gguf_type}, {r.num_tensors} tensors)" + (f" and {r.modelfile.name}" if r.modelfile else "") + notes
    if kind == "hf":
        from ..interop.folders import export_hf
        return str(export_hf(str(run_dir), dest))
    if kind == "peft":
        from ..interop.folders import export_peft
        return str(export_peft(str(run_dir), dest))
    raise ValueError(f"unknown export kind {kind!r}")


def import_job(job_dir: str) -> str:
    """A finished TRL job folder -> a run folder under the runs folder; returns its path."""
    from ..interop.job_import import import_job as ij
    return str(ij(job_dir).run_dir)

