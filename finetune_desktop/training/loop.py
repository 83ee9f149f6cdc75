"""The training loop: the lecture's four phases, step after step, as a plain function with callbacks.

    for each step:
        forward    logits = model.forward(batch, train=True)           (the model's prediction)
        loss       cross-entropy on the assistant tokens, and its gradient dlogits
        backward   grads = model.backward(dlogits)                     (backpropagation)
        update     clip the gradients, AdamW step on the trainable weights

No Qt here. Everything the outside sees goes through `on_event(event)` with the dataclasses of
`events.py` (always copies), `metrics.jsonl` (one line per step / evaluation) and the run folder.
A `TrainControl` is checked between steps: stop and pause take effect within one step.

Determinism: the batches of epoch e depend only on (seed, e); LoRA dropout draws from a generator
seeded with (seed, step); so a run resumed from a checkpoint repeats the uninterrupted run's
losses bit for bit (on the same machine and library versions).

Learning-rate schedule: a list of segments {"start", "steps", "warmup", "lr"}; a fresh run has one
segment over all its steps. Adding epochs to a finished run appends a new segment (warmup, then
the chosen decay again over the added steps), keeping the weights and the AdamW moments.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..engine.checkpoint import read_safetensors, write_safetensors
from ..engine.optim import AdamWConfig, adamw_init, adamw_step, clip_grads, lr_at
from .auto import Hyperparameters
from .config import TrainConfig
from .control import TrainControl
from .events import (CheckpointSaved, EvalMetrics, PhaseEvent, PhaseTimes, RunFailed, RunFinished, RunStarted,
                     RunStopped, StepMetrics)
from .memory import available_memory_bytes, estimate_peak_memory
from .runs import (MetricsWriter, latest_checkpoint, load_checkpoint, now_iso, read_run_json, save_checkpoint,
                   truncate_metrics, update_run_json, write_run_json)
from .snapshots import SnapshotMaker

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class LoopOptions:
    """Settings of the loop that are not hyperparameters (owned by training/, not the GUI contract)."""
    snapshot_matrices: tuple[str, ...] = ()   # matrices the weights view gets (empty = every projection)
    snapshot_max_size: int = 64               # snapshots are block-averaged to at most this per axis
    keep_checkpoints: int = 1                 # newest checkpoints kept in checkpoints/
    save_model_on_stop: bool = True           # a stopped run also writes model/ (and adapter/)
    phase_events: bool = True                 # send PhaseEvent at the start of each phase
    check_memory: bool = True
    memory_limit_bytes: int | None = None     # refuse runs estimated above this (None: the free memory)
    default_system_prompt: bool = True        # model/'s chat template adds the training data's system prompt
                                              # when a conversation has none (run.json "system_prompt")


@dataclass(frozen=True)
class TrainResult:
    status: str                  # "finished", "stopped" or "failed"
    run_dir: str
    step: int
    final_train_loss: float | None
    final_valid_loss: float | None
    elapsed_s: float
    model_dir: str | None
    checkpoint: str | None
    reason: str | None = None


class TrainingDiverged(Exception):
    pass


def default_segments(hyper: Hyperparameters) -> list[dict]:
    return [{"start": 0, "steps": hyper.total_steps, "warmup": hyper.warmup_steps, "lr": hyper.learning_rate}]


def lr_for_step(step: int, segments: Sequence[dict], schedule: str) -> float:
    """Learning rate for 0-based global `step` under the segment schedule."""
    seg = segments[0]
    for s in segments:
        if s["start"] <= step:
            seg = s
    return lr_at(step - seg["start"], seg["steps"], seg["lr"], schedule, seg["warmup"])


def evaluate(model, examples, batch_size: int, pad_id: int, batcher) -> tuple[float, float]:
    """Mean loss and token accuracy over every example (forward only), in batches."""
    if not examples:
        return float("nan"), float("nan")
    tot, n, correct = 0.0, 0, 0
    for b in batcher(examples, batch_size, 0, 0, pad_id):
        loss, cnt, cor = model.loss(b.input_ids, b.labels, attention_mask=b.attention_mask)
        tot += loss * cnt
        n += cnt
        correct += cor
    return (tot / n if n else float("nan")), (correct / n if n else float("nan"))


def _default_batcher():
    from ..data.batching import make_batches

    return make_batches


def _diverged_message(what: str, step: int, lr: float, ckpt: str | None) -> str:
    lower = f"{lr / 10:.2g}"
    keep = (f" The last good checkpoint ({Path(ckpt).name}) was kept; nothing after it was saved."
            if ckpt else " No checkpoint had been saved yet.")
    return (f"Training stopped at step {step}: {what}. The weights were moving too far per step, which "
            f"usually means the learning rate ({lr:.3g}) is too high. Try a lower learning rate, for example "
            f"{lower}, or 'auto'.{keep}")


def template_with_default_system(template: str, system_prompt: str) -> str:
    """The chat template, preceded by a line that adds `system_prompt` as the first message when a
    conversation has no system message of its own (as Qwen's templates do with their default)."""
    lit = json.dumps(system_prompt, ensure_ascii=False)  # JSON escapes are valid Jinja string escapes
    head = ("{%- set messages = messages if (messages and messages[0]['role'] == 'system') "
            f"else [{{'role': 'system', 'content': {lit}}}] + messages %}}")
    return head + template


def tokenizer_files(base_dir: Path | None, default_system: str | None = None) -> dict[str, bytes]:
    """The tokenizer files of the base model, to copy next to the tuned weights. With
    default_system, the chat template gains that system prompt as its default."""
    extra = {}
    if base_dir is None:
        return extra
    for name in TOKENIZER_FILES:
        f = Path(base_dir) / name
        if f.is_file():
            extra[name] = f.read_bytes()
    if default_system:
        if "chat_template.jinja" in extra:
            t = extra["chat_template.jinja"].decode("utf-8")
            extra["chat_template.jinja"] = template_with_default_system(t, default_system).encode("utf-8")
        if "tokenizer_config.json" in extra:
            try:
                cfg = json.loads(extra["tokenizer_config.json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                cfg = None
            if isinstance(cfg, dict) and isinstance(cfg.get("chat_template"), str):
                cfg["chat_template"] = template_with_default_system(cfg["chat_template"], default_system)
                extra["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return extra


def save_outputs(model, run_dir: Path, base_dir: Path | None, default_system: str | None = None) -> str:
    """Write model/ (LoRA merged, tokenizer files copied) and, with LoRA, adapter/ atomically."""
    extra = tokenizer_files(base_dir, default_system)
    model.save_pretrained(run_dir / "model", extra_files=extra)
    if model.lora is not None:
        model.save_adapter(run_dir / "adapter", base_model_name_or_path=str(base_dir) if base_dir else None)
    return str(run_dir / "model")


def train(model, train_examples, valid_examples, config: TrainConfig, hyper: Hyperparameters, run_dir,
          on_event: Callable | None = None, control: TrainControl | None = None, resume: bool = False,
          options: LoopOptions = LoopOptions(), base_dir=None, segments: list[dict] | None = None,
          pad_id: int = 0, batcher=None) -> TrainResult:
    """Train `model` (LoRA already attached for method "lora") in place on encoded examples.

    run_dir must exist with a run.json (see runs.py / session.py). With resume=True the newest
    checkpoint in run_dir/checkpoints is loaded and training continues after it; `segments` may
    then extend the schedule (more epochs). Returns a TrainResult; never raises for a diverged
    run or a stop (those become RunFailed / RunStopped events).

    Runs with the BLAS thread limit of threads.py; numpy overflow warnings are silenced (the
    padding mask adds two very negative numbers on purpose; real overflows are caught as
    non-finite losses or gradients)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _train(model, train_examples, valid_examples, config, hyper, run_dir, on_event, control, resume,
                      options, base_dir, segments, pad_id, batcher)


def _train(model, train_examples, valid_examples, config, hyper, run_dir, on_event, control, resume, options,
           base_dir, segments, pad_id, batcher) -> TrainResult:
    emit = on_event or (lambda e: None)
    control = control or TrainControl()
    batcher = batcher or _default_batcher()
    run_dir = Path(run_dir)
    base_dir = Path(base_dir) if base_dir is not None else None
    P = model.trainable_params()
    opt = adamw_init(P)
    acfg = AdamWConfig(weight_decay=config.weight_decay)
    S = hyper.steps_per_epoch
    segs = [dict(s) for s in (segments or default_segments(hyper))]
    total_steps = segs[-1]["start"] + segs[-1]["steps"]
    epochs = max(1, math.ceil(total_steps / S))

    step, elapsed_before = 0, 0.0
    best_valid, bad_evals, best_params = float("inf"), 0, None
    last_train, last_valid = None, None
    ckpt_path: str | None = None
    resumed_from = 0
    if resume:
        cp = latest_checkpoint(run_dir)
        if cp is not None:
            tr, ost, st = load_checkpoint(cp)
            for k, v in P.items():
                if k not in tr or tr[k].shape != v.shape:
                    raise ValueError(f"{cp}: checkpoint tensor {k!r} is missing or has the wrong shape")
                v[...] = tr[k]
                opt["m"][k][...] = ost["m"][k]
                opt["v"][k][...] = ost["v"][k]
            opt["step"] = ost["step"]
            model.weights_changed()
            step = resumed_from = int(st["step"])
            elapsed_before = float(st.get("elapsed_s", 0.0))
            best_valid = float(st.get("best_valid_loss", float("inf")) or float("inf"))
            bad_evals = int(st.get("evals_without_improvement", 0))
            last_train, last_valid = st.get("last_train_loss"), st.get("last_valid_loss")
            if segments is None and st.get("segments"):
                segs = [dict(s) for s in st["segments"]]
                total_steps = segs[-1]["start"] + segs[-1]["steps"]
                epochs = max(1, math.ceil(total_steps / S))
            if config.restore_best and (cp / "best.safetensors").exists():
                best_params = read_safetensors(cp / "best.safetensors")
            ckpt_path = str(cp)
            truncate_metrics(run_dir, step)

    snap = SnapshotMaker(model, options.snapshot_matrices or None, options.snapshot_max_size)
    metrics = MetricsWriter(run_dir)
    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + (time.perf_counter() - t_start)

    def state_dict(epoch_done: float) -> dict:
        return {"step": step, "epoch": epoch_done, "elapsed_s": elapsed(), "segments": segs,
                "steps_per_epoch": S, "batch_size": hyper.batch_size, "seed": config.seed,
                "data_order": {"seed": config.seed, "batcher": "make_batches(examples, batch_size, seed, epoch)"},
                "rng": {"dropout": "numpy default_rng([seed, step]) per step"},
                "best_valid_loss": (best_valid if math.isfinite(best_valid) else None),
                "evals_without_improvement": bad_evals,
                "last_train_loss": last_train, "last_valid_loss": last_valid, "saved": now_iso()}

    def checkpoint() -> str:
        nonlocal ckpt_path
        if ckpt_path is not None and Path(ckpt_path).name == f"step-{step:06d}" and Path(ckpt_path).exists():
            return ckpt_path
        cp = save_checkpoint(run_dir, step, P, opt, state_dict(step / S), keep=options.keep_checkpoints)
        if best_params is not None:
            write_safetensors(cp / "best.safetensors", best_params)
        ckpt_path = str(cp)
        update_run_json(run_dir, step=step, checkpoint=str(cp.relative_to(run_dir)), elapsed_s=elapsed())
        emit(CheckpointSaved(step=step, epoch=step / S, path=ckpt_path))
        return ckpt_path

    def do_eval() -> float | None:
        nonlocal last_valid, best_valid, bad_evals, best_params
        if not valid_examples:
            return None
        vl, va = evaluate(model, valid_examples, hyper.batch_size, pad_id, batcher)
        if not math.isfinite(vl):
            raise TrainingDiverged("the validation loss became NaN or infinite")
        last_valid = vl
        metrics.write({"step": step, "epoch": step / S, "valid_loss": vl, "valid_token_accuracy": va,
                       "elapsed_s": elapsed()})
        emit(EvalMetrics(step=step, epoch=step / S, valid_loss=vl, valid_token_accuracy=va))
        if vl < best_valid - 1e-6:
            best_valid, bad_evals = vl, 0
            if config.restore_best:
                best_params = {k: v.copy() for k, v in P.items()}
        else:
            bad_evals += 1
        return vl

    lr = lr_for_step(min(step, total_steps - 1), segs, config.schedule)
    try:
        info = read_run_json(run_dir)
        default_system = info.get("system_prompt") if options.default_system_prompt else None
        if options.check_memory:
            longest = max((len(e) for e in train_examples), default=1)
            avail = available_memory_bytes()
            if options.memory_limit_bytes:
                avail = min(avail, options.memory_limit_bytes) if avail else options.memory_limit_bytes
            est = estimate_peak_memory(model.config, model.num_parameters(), int(sum(v.size for v in P.values())),
                                       hyper.batch_size, longest, full=model.lora is None, available=avail)
            if not est.fits:
                reason = (f"This run would not fit in memory: {est.explain()}. Use a smaller batch size or a "
                          f"shorter --max-seq-len, or LoRA instead of full fine-tuning.")
                update_run_json(run_dir, status="failed", failure={"reason": reason, "step": step}, finished=now_iso())
                emit(RunFailed(run_dir=str(run_dir), reason=reason, step=step, checkpoint=ckpt_path))
                metrics.close()
                return TrainResult("failed", str(run_dir), step, last_train, last_valid, elapsed_before, None,
                                   ckpt_path, reason)
        info.update(status="running", step=step, hyper=hyper.to_dict(), schedule_segments=segs, pid=os.getpid())
        info.pop("failure", None)
        if resume:
            info.setdefault("resumed", []).append({"from_step": resumed_from, "at": now_iso()})
        write_run_json(run_dir, info)
        emit(RunStarted(run_dir=str(run_dir), total_steps=total_steps, steps_per_epoch=S, epochs=epochs,
                        batch_size=hyper.batch_size, learning_rate=hyper.learning_rate,
                        num_train_examples=len(train_examples), num_valid_examples=len(valid_examples),
                        trainable_params=int(sum(v.size for v in P.values())),
                        total_params=model.num_parameters(), resumed_from_step=resumed_from))

        step_time_ema = None
        last_snapshot = -1e9
        early_stopped = False
        stopped = False
        while step < total_steps and not early_stopped:
            e = step // S
            batches = batcher(train_examples, hyper.batch_size, config.seed, e, pad_id)
            if len(batches) != S:
                raise RuntimeError(f"epoch {e} has {len(batches)} batches, expected {S}")
            for i in range(step - e * S, S):
                if control.wait_while_paused():
                    stopped = True
                    break
                b = batches[i]
                lr = lr_for_step(step, segs, config.schedule)
                rng = np.random.default_rng([config.seed, step]) if config.lora_dropout > 0 else None
                if options.phase_events:
                    emit(PhaseEvent(step + 1, "forward"))
                t0 = time.perf_counter()
                logits, cache = model.forward(b.input_ids, attention_mask=b.attention_mask, train=True, rng=rng)
                if options.phase_events:
                    emit(PhaseEvent(step + 1, "loss"))
                t1 = time.perf_counter()
                loss, lc = model.loss_forward(logits, b.labels, overwrite_logits=True)
                del logits
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {'NaN' if math.isnan(loss) else 'infinite'}")
                dlogits = model.loss_backward(lc)
                n_counted, n_correct = lc.counted, lc.correct
                del lc
                if options.phase_events:
                    emit(PhaseEvent(step + 1, "backward"))
                t2 = time.perf_counter()
                grads = model.backward(dlogits, cache)
                del cache, dlogits
                if options.phase_events:
                    emit(PhaseEvent(step + 1, "update"))
                t3 = time.perf_counter()
                want_snap = (time.perf_counter() - last_snapshot) >= config.snapshot_interval_s
                if want_snap:
                    layer_gn = snap.grad_norms(grads)  # before clipping: what backpropagation produced
                gnorm = clip_grads(grads, config.grad_clip)
                if not math.isfinite(gnorm):
                    raise TrainingDiverged("the gradients became NaN or infinite")
                if gnorm == 0.0 and n_counted and loss > 1e-3:
                    # every gradient exactly zero while the loss is not: activations overflowed and the
                    # network went dead (it predicts a flat distribution and can no longer learn)
                    raise TrainingDiverged("the activations overflowed and the gradients became exactly zero")
                before = snap.before_update() if want_snap else None
                rel = adamw_step(P, grads, opt, lr, acfg)
                model.weights_changed()
                t4 = time.perf_counter()
                del grads
                step += 1
                last_train = float(loss)
                dt = t4 - t0
                step_time_ema = dt if step_time_ema is None else 0.8 * step_time_ema + 0.2 * dt
                ntok = int(b.attention_mask.sum())
                acc = n_correct / n_counted if n_counted else 0.0
                el = elapsed()
                phases = PhaseTimes((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3)
                sm = StepMetrics(step=step, epoch=step / S, train_loss=last_train, train_token_accuracy=acc, lr=lr,
                                 grad_norm=gnorm, tokens_per_s=ntok / dt if dt > 0 else 0.0, elapsed_s=el,
                                 eta_s=step_time_ema * (total_steps - step), total_steps=total_steps, phases=phases)
                metrics.write({"step": step, "epoch": sm.epoch, "train_loss": sm.train_loss,
                               "train_token_accuracy": acc, "lr": lr, "grad_norm": gnorm,
                               "tokens_per_s": sm.tokens_per_s, "elapsed_s": el, "eta_s": sm.eta_s,
                               "forward_ms": phases.forward_ms, "loss_ms": phases.loss_ms,
                               "backward_ms": phases.backward_ms, "update_ms": phases.update_ms,
                               "tokens": ntok, "trained_tokens": int(n_counted)})
                emit(sm)
                if want_snap:
                    t5 = time.perf_counter()
                    emit(snap.build(step, before, layer_gn, control.focus_matrix, rel))
                    # never spend more than ~1/6 of the time on snapshots (full fine-tuning of big matrices)
                    last_snapshot = time.perf_counter() + 5 * (time.perf_counter() - t5)
                    before = None
                epoch_end = step % S == 0
                if epoch_end or (hyper.eval_every and step % hyper.eval_every == 0):
                    do_eval()
                if epoch_end and (config.checkpoint_every_epoch or step >= total_steps):
                    checkpoint()
                if valid_examples and config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
                    early_stopped = True  # no better validation loss for `patience` evaluations
                    break
            if stopped:
                break

        if stopped:
            cp = checkpoint()
            model_dir = None
            if options.save_model_on_stop:
                model_dir = save_outputs(model, run_dir, base_dir, default_system)
            update_run_json(run_dir, status="stopped", step=step, stopped=now_iso(), elapsed_s=elapsed(),
                            final={"train_loss": last_train, "valid_loss": last_valid, "steps": step,
                                   "elapsed_s": elapsed()})
            metrics.close()
            emit(RunStopped(run_dir=str(run_dir), step=step, checkpoint=cp))
            return TrainResult("stopped", str(run_dir), step, last_train, last_valid, elapsed(), model_dir, cp)

        if step % S != 0 or not config.checkpoint_every_epoch:
            checkpoint()  # the final state, so more epochs can be added later
        if config.restore_best and best_params is not None:
            for k, v in P.items():
                v[...] = best_params[k]
            model.weights_changed()
        model_dir = save_outputs(model, run_dir, base_dir, default_system)
        el = elapsed()
        final = {"train_loss": last_train, "valid_loss": last_valid, "steps": step, "elapsed_s": el,
                 "best_valid_loss": best_valid if math.isfinite(best_valid) else None,
                 "early_stopped": early_stopped, "restored_best": bool(config.restore_best and best_params is not None)}
        update_run_json(run_dir, status="finished", step=step, finished=now_iso(), elapsed_s=el, final=final,
                        model="model", adapter="adapter" if model.lora is not None else None)
        metrics.close()
        emit(RunFinished(run_dir=str(run_dir), model_dir=model_dir, final_train_loss=last_train,
                         final_valid_loss=last_valid, steps=step, elapsed_s=el))
        return TrainResult("finished", str(run_dir), step, last_train, last_valid, el, model_dir, ckpt_path)

    except TrainingDiverged as e:
        reason = _diverged_message(str(e), step + 1, lr, ckpt_path)
        return _fail(run_dir, reason, step, ckpt_path, metrics, emit, last_train, last_valid, elapsed())
    except MemoryError:
        reason = ("Training ran out of memory. Use a smaller batch size or a shorter --max-seq-len, or LoRA "
                  "instead of full fine-tuning." + (f" The last checkpoint ({Path(ckpt_path).name}) was kept."
                                                    if ckpt_path else ""))
        return _fail(run_dir, reason, step, ckpt_path, metrics, emit, last_train, last_valid, elapsed())
    except Exception as e:  # noqa: BLE001 - reported as a failed run; details go to error.log
        try:
            (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        except OSError:
            pass
        reason = f"internal error: {type(e).__name__}: {e} (details in {run_dir / 'error.log'})"
        return _fail(run_dir, reason, step, ckpt_path, metrics, emit, last_train, last_valid, elapsed())


def _fail(run_dir, reason, step, ckpt, metrics, emit, last_train, last_valid, elapsed):
    metrics.close()
    try:
        update_run_json(run_dir, status="failed", step=step, finished=now_iso(),
                        failure={"reason": reason, "step": step + 1, "checkpoint": ckpt})
    except Exception:  # noqa: BLE001 - the failure itself must still be reported
        pass
    emit(RunFailed(run_dir=str(run_dir), reason=reason, step=step, checkpoint=ckpt))
    return TrainResult("failed", str(run_dir), step, last_train, last_valid, elapsed, None, ckpt, reason)

