"""Start or resume a fine-tuning run from files: the one entry point the CLI and the app share.

    result = start_training("pirate.jsonl", run_dir=None, config=TrainConfig(), base="base",
                            on_event=print, control=TrainControl())
    result = resume_training(run_dir, extra_epochs=2, on_event=..., control=...)

Both block until the run finishes, stops or fails (run them on a worker thread in the app) and
return a TrainResult. Problems that stop a run before it starts raise:
  TrainingSetupError  (no base model, run folder in use, changed data file, ...), in words;
  data.DataError      (the training file has errors; `.report` has every issue by line).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import LoraConfig, Model
from ..engine.errors import UserError
from .auto import Hyperparameters, resolve
from .config import TrainConfig
from .control import TrainControl
from .loading import open_model
from .loop import LoopOptions, TrainResult, default_segments, train
from .events import Notice
from .runs import (LOCK_FILE, RunError, RunLock, lock_holder, latest_checkpoint, new_run_dir, now_iso, read_run_json,
                   remove_leftovers, sha256_file, truncate_metrics, versions, write_run_json)


class TrainingSetupError(UserError):
    """A run cannot start; the message says why and what to do."""


class RunFolderInUse(TrainingSetupError):
    """The chosen run folder already holds a run (or other files)."""


class RunAlreadyFinished(TrainingSetupError):
    """Resuming a run that has done all its steps, without adding epochs."""


class NothingToTrain(TrainingSetupError):
    """No example has assistant tokens left after truncation."""


GENERAL_EVAL_FILE = "general_eval.jsonl"   # in a model folder: general dialogs for the forgetting meter


@dataclass
class PreparedData:
    train: list            # EncodedExample
    valid: list
    conversations: list           # every conversation of the training file
    valid_conversations: list
    report: object         # ValidationReport of the training file
    valid_report: object | None
    system_prompt: str | None
    general: list = field(default_factory=list)    # encoded general dialogs (forgetting meter)
    quiz: list = field(default_factory=list)       # training.quiz items scored at each evaluation
    recall: list = field(default_factory=list)     # training questions for the automatic stopping rule
    question_dropout: float = 0.0                  # resolved TrainConfig.question_dropout


# ----------------------------------------------------------------------------- model + data
def weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).exists():
            return folder / name
    return None


def load_base_model(spec: str):
    """'base', a model folder or a run folder -> (Model, Tokenizer, folder). Clear errors."""
    model, tok, folder, run_dir = open_model(spec, TrainingSetupError)
    return model, tok, folder


# The time estimate's speed model, fitted to measured LoRA and full steps on a 2-core laptop
# CPU (bench/real_models.py): a step costs about 4 N (LoRA: forward and the input gradients
# through frozen weights) or 6 N (full) operations per token for N parameters, done at
# THREAD_FLOPS per engine thread (a batch of one row uses them all too: its matrix products
# split), less for small models, whose steps are dominated by per-operation overheads rather than
# big matrix products (SMALL_MODEL_PARAMS). Measured / estimated tokens/s: embedded 4M model
# ~2,600 / 2,700; 135M LoRA 4x256 185-217 / 194; 135M full 135-147 / 130; 360M LoRA 2x256
# 80-84 / 75; 0.5B LoRA 1x512 47 / 54.
THREAD_FLOPS = 5.5e10
SMALL_MODEL_PARAMS = 7e6


def estimate_tokens_per_second(model, method: str) -> float:
    """A training speed for the time estimates (numpy on a laptop CPU); model: a Model or a
    ModelConfig."""
    from ..engine.runtime import engine_threads

    n = max(1, model.num_parameters())
    rate = THREAD_FLOPS * engine_threads() * n / (n + SMALL_MODEL_PARAMS)
    return rate / ((6 if method == "full" else 4) * n)


def _check_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainingSetupError(f"{what} {p} does not exist")
    if not p.is_file():
        raise TrainingSetupError(f"{what} {p} is not a file")
    return p


def _most_common_system_prompt(convs) -> str | None:
    c = collections.Counter()
    for conv in convs:
        for m in conv.messages:
            if m.role == "system":
                c[m.content] += 1
                break
    if not c:
        return None
    text, n = c.most_common(1)[0]
    return text if n * 2 >= len(convs) else None


def _data_api():
    from ..data import DataError, encode_conversations, split_train_valid, validate_file

    return validate_file, encode_conversations, split_train_valid, DataError


def prepare_data(data_path, tokenizer, config: TrainConfig, validation_path=None,
                 tokens_per_second: float = 1000.0, base_dir=None) -> PreparedData:
    """Validate the file(s) (raises data.DataError on errors), encode, split."""
    validate_file, encode_conversations, split_train_valid, DataError = _data_api()
    data_path = _check_file(data_path, "training file")
    bs = config.batch_size if config.batch_size != "auto" else 8

    def load(path):
        rep = validate_file(path, tokenizer, config.max_seq_len, bs, tokens_per_second)
        if not rep.ok:
            raise DataError(rep)
        convs = list(rep.conversations)
        ex = list(getattr(rep, "examples", None) or []) or encode_conversations(tokenizer, convs, config.max_seq_len)
        return rep, convs, [e for e in ex if e.num_trained_tokens > 0]

    report, convs, examples = load(data_path)
    vreport = None
    if validation_path:
        vreport, vconvs, valid_ex = load(_check_file(validation_path, "validation file"))
        train_ex = examples
    elif config.val_split and config.val_split > 0:
        train_ex, valid_ex = split_train_valid(examples, config.val_split, config.seed)
        vconvs = []
    else:
        train_ex, valid_ex, vconvs = examples, [], []
    if not train_ex:
        raise NothingToTrain(f"{data_path}: no example has assistant tokens left to train on "
                             f"(are the replies cut off at the maximum length of {config.max_seq_len} tokens?)")
    return PreparedData(train_ex, valid_ex, convs, vconvs, report, vreport, _most_common_system_prompt(convs),
                        general=_general_examples(config, tokenizer, base_dir),
                        quiz=_quiz_items(config), recall=_recall_items(config, convs, train_ex),
                        question_dropout=_question_dropout(config, convs, train_ex))


def _question_dropout(config: TrainConfig, convs, train_ex) -> float:
    from .augment import question_dropout

    lines = {e.line for e in train_ex}
    return question_dropout(config.question_dropout, [c for c in convs if c.line in lines])


def _recall_items(config: TrainConfig, convs, train_ex) -> list:
    """With automatic epochs: the training questions whose answers decide when to stop (the
    first wording of each distinct trained answer, evenly spread over at most RECALL_QUESTIONS)."""
    if config.epochs != "auto":
        return []
    from .auto import RECALL_QUESTIONS
    from .quiz import items_from_conversations

    lines = {e.line for e in train_ex}
    items, seen = [], set()
    for it in items_from_conversations([c for c in convs if c.line in lines]):
        if it.expected[0] not in seen:
            seen.add(it.expected[0])
            items.append(it)
    if len(items) > RECALL_QUESTIONS:
        idx = [round(i * (len(items) - 1) / (RECALL_QUESTIONS - 1)) for i in range(RECALL_QUESTIONS)]
        items = [items[i] for i in idx]
    return items


def _general_examples(config: TrainConfig, tokenizer, base_dir) -> list:
    """The forgetting meter's dialogs: the file the settings name, or with "auto" the base model's
    own general_eval.jsonl when it ships one (else none: the meter is then absent, not faked)."""
    spec = config.general_file
    if spec == "auto":
        path = Path(base_dir) / GENERAL_EVAL_FILE if base_dir is not None else None
        if path is None or not path.is_file():
            return []
    elif not spec:
        return []
    else:
        path = _check_file(spec, "general dialogs file")
    validate_file, encode_conversations, _, DataError = _data_api()
    rep = validate_file(path, tokenizer, config.max_seq_len)
    if not rep.ok:
        raise DataError(rep)
    return [e for e in rep.examples if e.num_trained_tokens > 0]


def _quiz_items(config: TrainConfig) -> list:
    if not config.quiz_file:
        return []
    from .quiz import load_questions

    return load_questions(_check_file(config.quiz_file, "quiz file"))



def attach_method(model: Model, config: TrainConfig) -> None:
    if config.method == "lora":
        model.add_lora(LoraConfig(r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                  target_modules=tuple(config.lora_targets)), seed=config.seed)
    elif config.method != "full":
        raise TrainingSetupError(f"unknown method {config.method!r} (lora or full)")


def fit_config_to_model(config: TrainConfig, model) -> TrainConfig:
    """Examples never get longer than the model's context (max_position_embeddings)."""
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and config.max_seq_len > limit:
        return config.replace(max_seq_len=limit)
    return config


def check_config(config: TrainConfig) -> None:
    problems = []
    if config.method not in ("lora", "full"):
        problems.append(f"method must be 'lora' or 'full', not {config.method!r}")
    if config.schedule not in ("constant", "linear", "cosine"):
        problems.append(f"schedule must be constant, linear or cosine, not {config.schedule!r}")
    if config.method == "lora" and config.lora_rank < 1:
        problems.append("lora_rank must be at least 1")
    if not 0.0 <= config.val_split < 1.0:
        problems.append(f"val_split must be between 0 and 1, not {config.val_split}")
    if config.max_seq_len < 8:
        problems.append("max_seq_len must be at least 8")
    if not 0.0 <= config.lora_dropout < 1.0:
        problems.append("lora_dropout must be in [0, 1)")
    for name in ("epochs", "batch_size"):
        v = getattr(config, name)
        if v != "auto" and (not isinstance(v, int) or v < 1):
            problems.append(f"{name} must be a positive whole number or 'auto', not {v!r}")
    lr = config.learning_rate
    if lr != "auto" and (not isinstance(lr, (int, float)) or not lr > 0):
        problems.append(f"learning_rate must be positive or 'auto', not {lr!r}")
    if config.activation_checkpointing not in (True, False, "auto"):
        problems.append(f"activation_checkpointing must be true, false or 'auto', not {config.activation_checkpointing!r}")
    qd = config.question_dropout
    if qd != "auto" and (not isinstance(qd, (int, float)) or not 0.0 <= qd < 1.0):
        problems.append(f"question_dropout must be in [0, 1) or 'auto', not {qd!r}")
    rw = config.reword_questions
    if rw != "auto" and (not isinstance(rw, int) or isinstance(rw, bool) or rw < 0):
        problems.append(f"reword_questions must be a whole number >= 0 or 'auto', not {rw!r}")
    if problems:
        raise TrainingSetupError("; ".join(problems))


def _steps_per_epoch(examples, batch_size, seed, pad_id) -> int:
    from ..data.batching import make_batches

    return len(make_batches(examples, batch_size, seed, 0, pad_id))


def check_run_dir_free(run_dir) -> Path:
    """The run folder to create: it must not exist yet, or hold nothing but a lock file."""
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunFolderInUse(f"{run_dir} exists and is not a folder")
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            holder = lock_holder(run_dir)
            if holder is not None and holder.get("pid") != os.getpid():
                raise RunFolderInUse(f"{run_dir} is being written by another process "
                                     f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')})")
            if (run_dir / "run.json").exists():
                raise RunFolderInUse(f"{run_dir} already holds a run")
            raise RunFolderInUse(f"{run_dir} exists and is not empty")
    return run_dir


# ----------------------------------------------------------------------------- entry points
def start_training(data_path, run_dir=None, config: TrainConfig = TrainConfig(), base: str = "base",
                   validation_path=None, on_event=None, control: TrainControl | None = None,
                   options: LoopOptions = LoopOptions(), prepared=None) -> TrainResult:
    """Create a run folder and train. `prepared` = (model, tokenizer, base_dir, PreparedData) skips loading."""
    check_config(config)
    if prepared is None:
        model, tok, base_dir = load_base_model(base)
        config = fit_config_to_model(config, model)
        data = prepare_data(data_path, tok, config, validation_path,
                            estimate_tokens_per_second(model, config.method), base_dir=base_dir)
    else:
        model, tok, base_dir, data = prepared
        config = fit_config_to_model(config, model)
    if run_dir is None:
        run_dir = new_run_dir(Path(data_path).stem)
    run_dir = check_run_dir_free(run_dir)
    with RunLock(run_dir):  # one writer per run folder, for the run's whole life
        check_run_dir_free(run_dir)  # again, now that no one else can write here
        return _start_locked(model, tok, base_dir, data, data_path, run_dir, config, base, validation_path,
                             on_event, control, options)


REWORDED_FILE = "reworded.jsonl"


def _add_reworded(model, tok, data: PreparedData, config: TrainConfig, run_dir: Path, emit, control) -> int:
    """Before the first step: more wordings of the training questions from the base model
    (training/augment.py), saved in the run folder and added to the training examples. A resumed
    run reads the same file back, so it trains on exactly the same examples."""
    from .augment import reword, wanted

    path = run_dir / REWORDED_FILE
    if path.exists():
        validate_file, encode_conversations, _, DataError = _data_api()
        rep = validate_file(path, tok, config.max_seq_len)
        if not rep.ok:
            raise DataError(rep)
        new = list(rep.conversations)
    else:
        lines = {e.line for e in data.train}
        convs = [c for c in data.conversations if c.line in lines]
        n = wanted(config.reword_questions, convs)
        if n <= 0:
            return 0
        emit(Notice(f"the base model is writing {n} more wordings of each training question, so the tuned model "
                    "learns the facts rather than the exact questions"))
        res = reword(model, tok, convs, n, seed=config.seed,
                     should_stop=(lambda: control.stop_requested) if control is not None else None)
        new = res.conversations
        _write_conversations(path, new)
    if new:
        from ..data import encode_conversations

        data.train.extend(e for e in encode_conversations(tok, new, config.max_seq_len) if e.num_trained_tokens > 0)
    return len(new)


def _write_conversations(path: Path, convs) -> None:
    import json

    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"messages": [m.as_template_dict() for m in c.messages]},
                                               ensure_ascii=False) + "\n" for c in convs))


def _start_locked(model, tok, base_dir, data, data_path, run_dir, config, base, validation_path, on_event,
                  control, options) -> TrainResult:
    reworded = _add_reworded(model, tok, data, config, run_dir, on_event or (lambda e: None), control)
    attach_method(model, config)
    pad = tok.pad_token_id
    longest = max(len(e) for e in data.train)
    tokens = int(sum(len(e) for e in data.train))
    from .augment import answers_repeat

    facts = answers_repeat(data.conversations)
    bs_guess = resolve(config, len(data.train), longest, train_tokens=tokens, facts=facts).batch_size
    spe = _steps_per_epoch(data.train, bs_guess, config.seed, pad)
    hyper = resolve(config, len(data.train), longest, steps_per_epoch=spe, train_tokens=tokens, facts=facts)
    wf = weights_file(base_dir)
    info = {
        "format": 1,
        "status": "running",
        "created": now_iso(),
        "pid": os.getpid(),
        "base_model": {"spec": base, "path": str(Path(base_dir).resolve()),
                       "weights_sha256": sha256_file(wf) if wf else None,
                       "model_type": model.config.model_type, "num_parameters": model.num_parameters()},
        "data": {"path": str(Path(data_path).resolve()), "sha256": sha256_file(data_path),
                 "format": data.report.format, "num_examples": len(data.conversations),
                 "validation_path": str(Path(validation_path).resolve()) if validation_path else None,
                 "validation_sha256": sha256_file(validation_path) if validation_path else None,
                 "num_train": len(data.train), "num_valid": len(data.valid), "reworded": reworded,
                 "question_dropout": data.question_dropout,
                 "train_tokens": tokens,
                 "trained_tokens": int(sum(e.num_trained_tokens for e in data.train))},
        "settings": config.to_dict(),
        "hyper": hyper.to_dict(),
        "schedule_segments": default_segments(hyper),
        "system_prompt": data.system_prompt,
        "versions": versions(),
        "step": 0,
    }
    write_run_json(run_dir, info)
    return train(model, data.train, data.valid, config, hyper, run_dir, on_event=on_event, control=control,
                 options=options, base_dir=base_dir, pad_id=pad, general_examples=data.general,
                 quiz_items=data.quiz, tokenizer=tok, recall_items=data.recall,
                 question_dropout=data.question_dropout)


def resume_training(run_dir, extra_epochs: int = 0, on_event=None, control: TrainControl | None = None,
                    options: LoopOptions = LoopOptions(), total_epochs: int | None = None) -> TrainResult:
    """Continue a run the way it needs: a stopped or interrupted run from its newest checkpoint; a
    run interrupted before its first checkpoint from step 0 (same settings and data); a run whose
    steps are all done but whose model was not saved, by saving it; a diverged run from its last
    good checkpoint with a lower learning rate. With extra_epochs (or a total_epochs above the
    run's), add epochs to a finished run. Same data and settings as recorded."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "run.json").exists():
        read_run_json(run_dir)  # the clear "not a run folder" error, before making a lock file there
    with RunLock(run_dir):
        removed = remove_leftovers(run_dir)
        emit = on_event or (lambda e: None)
        if removed:
            emit(Notice(f"removed {len(removed)} half-written file(s) left by an interrupted process"))
        return _resume_locked(run_dir, extra_epochs, emit, control, options, total_epochs)


def _lower_lr_after_divergence(info: dict, segs: list[dict], done: int, config: TrainConfig,
                               hyper: Hyperparameters) -> tuple[list[dict], float | None]:
    """A run that failed by diverging continues with a safe learning rate: the auto rule's, or a
    quarter of the one that diverged when that is lower, from its last good checkpoint."""
    failure = info.get("failure") or {}
    if info.get("status") != "failed" or failure.get("kind") != "diverged":
        return segs, None
    from .auto import auto_learning_rate

    bad = float(failure.get("lr") or hyper.learning_rate)
    new = min(auto_learning_rate(config.method, hyper.batch_size), bad / 4)
    total = segs[-1]["start"] + segs[-1]["steps"]
    kept = [dict(x) for x in segs if x["start"] < done]
    if kept:
        kept[-1]["steps"] = max(1, done - kept[-1]["start"])
    kept.append({"start": done, "steps": max(1, total - done), "warmup": 0, "lr": new})
    return kept, new


def _resume_locked(run_dir: Path, extra_epochs: int, emit, control, options, total_epochs) -> TrainResult:
    info = read_run_json(run_dir)
    try:
        config = TrainConfig.from_dict(info["settings"])
        hyper = Hyperparameters.from_dict(info["hyper"])
        segs = [dict(s) for s in info.get("schedule_segments") or default_segments(hyper)]
        base_path = Path(info["base_model"]["path"])
        data_info = info["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise TrainingSetupError(f"{run_dir / 'run.json'}: missing or invalid field {e}") from None
    cp = latest_checkpoint(run_dir)
    done = 0
    if cp is not None:
        import json
        try:
            st = json.loads((cp / "state.json").read_text(encoding="utf-8"))
            done = int(st.get("step", 0))
        except (OSError, ValueError, TypeError) as e:
            raise RunError(f"{cp / 'state.json'}: the checkpoint is damaged ({e}); delete that checkpoint "
                           "folder to continue from an earlier one, or start a new run") from None
        if st.get("segments"):
            segs = [dict(s) for s in st["segments"]]
    total = segs[-1]["start"] + segs[-1]["steps"]
    S = hyper.steps_per_epoch
    if total_epochs is not None and total_epochs * S > total:
        extra_epochs = max(extra_epochs, total_epochs - total // S)
    if extra_epochs > 0:
        add = extra_epochs * S
        warm = int(round(config.warmup_ratio * add))
        if config.warmup_ratio > 0:
            warm = max(1, warm)
        segs.append({"start": total, "steps": add, "warmup": min(warm, add), "lr": hyper.learning_rate})
        total += add
        hyper = Hyperparameters(epochs=total // S, batch_size=hyper.batch_size, learning_rate=hyper.learning_rate,
                                eval_every=hyper.eval_every, warmup_steps=hyper.warmup_steps, steps_per_epoch=S,
                                total_steps=total, auto=hyper.auto)
    elif done >= total and info.get("status") == "finished" and (run_dir / "model" / "config.json").exists():
        raise RunAlreadyFinished(f"{run_dir} already finished all {total} steps; add epochs to train more")
    segs, lowered = _lower_lr_after_divergence(info, segs, done, config, hyper)
    if lowered is not None:
        emit(Notice(f"this run diverged at learning rate {float((info.get('failure') or {}).get('lr') or 0):.3g}; "
                    f"it continues from step {done} with the safer learning rate {lowered:.3g}"))
    elif cp is None:
        emit(Notice("this run ended before its first checkpoint, so it starts again from step 0 with the same "
                    "settings and data"))
        truncate_metrics(run_dir, 0)
    elif done >= total:
        emit(Notice("this run had finished training but its model was not saved; saving it now"))

    if not base_path.exists():
        raise TrainingSetupError(f"the run's base model {base_path} is gone; it is needed to resume")
    model, tok, base_dir = load_base_model(str(base_path))
    wf = weights_file(base_dir)
    want = info["base_model"].get("weights_sha256")
    if want and wf is not None and wf.name == "model.safetensors" and sha256_file(wf) != want:
        raise TrainingSetupError(f"the base model {base_dir} changed since this run started; resuming needs the same weights")
    for key, pkey in (("sha256", "path"), ("validation_sha256", "validation_path")):
        p = data_info.get(pkey)
        if not p:
            continue
        if not Path(p).exists():
            raise TrainingSetupError(f"the run's data file {p} is gone; resuming needs the same data")
        if data_info.get(key) and sha256_file(p) != data_info[key]:
            raise TrainingSetupError(f"the data file {p} changed since this run started; resuming needs the same "
                                     "data (start a new run to train on the new file)")
    data = prepare_data(data_info["path"], tok, config, data_info.get("validation_path"),
                        estimate_tokens_per_second(model, config.method), base_dir=base_dir)
    if (run_dir / REWORDED_FILE).exists():
        _add_reworded(model, tok, data, config, run_dir, emit, control)
    attach_method(model, config)
    return train(model, data.train, data.valid, config, hyper, run_dir, on_event=emit, control=control,
                 resume=cp is not None, options=options, base_dir=base_dir, segments=segs, pad_id=tok.pad_token_id,
                 general_examples=data.general, quiz_items=data.quiz, tokenizer=tok, recall_items=data.recall,
                 question_dropout=data.question_dropout)
