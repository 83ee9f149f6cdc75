"""The training loop: the lecture's four phases, step after step, as a plain function with callbacks.

    for each step:
        forward    model.forward_hidden(batch, train=True)   every layer, up to the final hidden states
        loss       model.head_loss(...)   output layer + cross-entropy on the assistant tokens, by
                   chunks of the counted positions, with the gradient at the final hidden states
        backward   grads = model.backward_hidden(...)       (backpropagation)
        update     clip the gradients, AdamW step on the trainable weights

No Qt here. Everything the outside sees goes through `on_event(event)` with the dataclasses of
`events.py` (always copies), `metrics.jsonl` (one line per step / evaluation) and the run folder.
A `TrainControl` is checked between steps: stop and pause take effect within one step.

How it is organised: `train` sets up a `_Run` (what stays fixed for the run: model, optimizer,
data, callbacks) and a `RunState` (what changes and is saved in checkpoints: step, best
validation loss, ...), then calls small functions: `_restore` (resume from a checkpoint),
`_step` (one step of the four phases), `_evaluate`, `_checkpoint` and `_finish`.

Determinism: the batches of epoch e depend only on (seed, e); LoRA dropout draws from a generator
seeded with (seed, step); so a run resumed from a checkpoint repeats the uninterrupted run's
losses bit for bit (on the same machine and library versions).

Learning-rate schedule: a list of segments {"start", "steps", "warmup", "lr"}; a fresh run has one
segment over all its steps. Adding epochs to a finished run appends a new segment (warmup, then
the chosen decay again over the added steps), keeping the weights and the AdamW moments.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..engine.checkpoint import read_safetensors
from ..engine.optim import AdamWConfig, adamw_init, adamw_step, clip_grads, lr_at
from .auto import Hyperparameters
from .config import TrainConfig
from .control import TrainControl
from .events import (CheckpointSaved, EvalMetrics, Notice, PhaseEvent, PhaseTimes, RunAlarm, RunFailed, RunFinished,
                     RunPaused, RunStarted, RunStopped, StepDetail, StepMetrics)
from .memory import available_memory_bytes, estimate_peak_memory
from .runs import (MetricsWriter, latest_checkpoint, load_checkpoint, now_iso, read_run_json, save_checkpoint,
                   save_run_model, truncate_metrics, update_run_json, write_run_json)
from .snapshots import SnapshotMaker
from .watch import DivergenceWatch, TrainingDiverged


OVERFIT_EVALS = 3          # validation loss rising this many evaluations in a row while training loss falls
FORGETTING_RISE = 1.0      # general-dialog loss above its start by this many nats per token; a default
                           # persona fine-tune of the embedded model (the style moves, as wanted) rises
                           # about 0.65, a 12-epoch run on the Korean FAQ sample about 0.5


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
    forgetting_rise: float = FORGETTING_RISE  # the forgetting alarm's threshold (nats per token)


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



@dataclass
class RunState:
    """What changes as a run goes; saved in every checkpoint's state.json."""
    segments: list[dict]                   # the learning-rate schedule (see the module docstring)
    step: int = 0                          # steps done
    elapsed_before: float = 0.0            # seconds of earlier sessions of this run
    best_valid: float = math.inf
    bad_evals: int = 0                     # evaluations since the best validation loss
    last_train: float | None = None
    last_valid: float | None = None
    checkpoint: str | None = None          # the newest checkpoint folder
    early_stopped: bool = False
    best_params: dict | None = field(default=None, repr=False)   # with restore_best
    watch: DivergenceWatch = field(default_factory=DivergenceWatch)
    best_step: int | None = None           # step of the best validation loss
    valid_history: list = field(default_factory=list)    # (step, valid loss, smoothed train loss) per evaluation
    general_start: float | None = None     # general-ability loss before training
    alarms: set = field(default_factory=set)             # kinds already raised
    epoch_counted: int = 0                 # assistant tokens seen this epoch ...
    epoch_correct: int = 0                 # ... and how many the model's top guess got right
    learned_at: int | None = None          # step at which the training answers were reproduced

    @property
    def total_steps(self) -> int:
        return self.segments[-1]["start"] + self.segments[-1]["steps"]


@dataclass
class _Run:
    """What stays fixed for a run's life."""
    model: object
    train_examples: Sequence
    valid_examples: Sequence
    config: TrainConfig
    hyper: Hyperparameters
    run_dir: Path
    emit: Callable
    control: TrainControl
    options: LoopOptions
    base_dir: Path | None
    pad_id: int
    batcher: Callable
    params: dict = field(default_factory=dict)      # the trainable arrays the optimizer updates in place
    opt: dict = field(default_factory=dict)
    acfg: AdamWConfig = field(default_factory=AdamWConfig)
    metrics: MetricsWriter | None = None
    snap: SnapshotMaker | None = None
    t_start: float = 0.0
    default_system: str | None = None
    general_examples: Sequence = ()                 # the base model's general dialogs (forgetting meter)
    quiz_items: Sequence = ()                       # training.quiz items scored at each evaluation
    recall_items: Sequence = ()                     # training questions asked to decide that the answers are learned
    question_dropout: float = 0.0                   # chance that a context token is replaced (training/augment.py)
    protected_ids: frozenset = frozenset()          # token ids question dropout never touches
    tokenizer: object = None                        # needed for the quiz and the recall check

    @property
    def steps_per_epoch(self) -> int:
        return self.hyper.steps_per_epoch

    def elapsed(self, st: RunState) -> float:
        return st.elapsed_before + (time.perf_counter() - self.t_start)


def default_segments(hyper: Hyperparameters) -> list[dict]:
    return [{"start": 0, "steps": hyper.total_steps, "warmup": hyper.warmup_steps, "lr": hyper.learning_rate}]


def lr_for_step(step: int, segments: Sequence[dict], schedule: str) -> float:
    """Learning rate for 0-based global `step` under the segment schedule."""
    seg = segments[0]
    for s in segments:
        if s["start"] <= step:
            seg = s
    return lr_at(step - seg["start"], seg["steps"], seg["lr"], schedule, seg["warmup"])


def peak_lr_at(step: int, segments: Sequence[dict]) -> float:
    """The learning rate the schedule segment of `step` was set to (its peak, after warmup)."""
    seg = segments[0]
    for s in segments:
        if s["start"] <= step:
            seg = s
    return float(seg["lr"])


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


def _diverged_message(what: str, step: int, lr: float, ckpt: str | None, config: TrainConfig,
                      hyper: Hyperparameters) -> str:
    from .auto import auto_learning_rate

    safe = auto_learning_rate(config.method, hyper.batch_size)
    if lr <= safe:
        safe = lr / 4
    keep = (f" The last good checkpoint ({Path(ckpt).name}) was kept, and continuing the run starts from it with "
            f"the lower learning rate." if ckpt else " No checkpoint had been saved yet.")
    return (f"Training stopped at step {step}: {what}. The model was being wrecked rather than trained: the "
            f"weights moved too far each step, which means the learning rate ({lr:.3g}) is too high for this "
            f"model and data. A learning rate of {safe:.2g} is safe here (the automatic setting for "
            f"{config.method} at batch {hyper.batch_size}).{keep}")


# ----------------------------------------------------------------------------- the steps of a run
def _restore(run: _Run, st: RunState, segments_given: bool) -> None:
    """Load the newest checkpoint into the trainable weights, the optimizer and the run state."""
    cp = latest_checkpoint(run.run_dir)
    if cp is None:
        return
    tr, ost, saved = load_checkpoint(cp)
    for k, v in run.params.items():
        if k not in tr or tr[k].shape != v.shape:
            raise ValueError(f"{cp}: checkpoint tensor {k!r} is missing or has the wrong shape")
        v[...] = tr[k]
        run.opt["m"][k][...] = ost["m"][k]
        run.opt["v"][k][...] = ost["v"][k]
    run.opt["step"] = ost["step"]
    run.model.weights_changed()
    st.step = int(saved["step"])
    st.elapsed_before = float(saved.get("elapsed_s", 0.0))
    st.best_valid = float(saved.get("best_valid_loss", math.inf) or math.inf)
    st.bad_evals = int(saved.get("evals_without_improvement", 0))
    st.last_train, st.last_valid = saved.get("last_train_loss"), saved.get("last_valid_loss")
    st.watch = DivergenceWatch(saved.get("start_loss"), saved.get("loss_ema"))
    st.general_start = saved.get("general_start")
    st.best_step = saved.get("best_step")
    st.epoch_counted = int(saved.get("epoch_counted", 0))
    st.epoch_correct = int(saved.get("epoch_correct", 0))
    if not segments_given and saved.get("segments"):
        st.segments = [dict(s) for s in saved["segments"]]
    if (cp / "best.safetensors").exists():
        st.best_params = read_safetensors(cp / "best.safetensors")
    st.checkpoint = str(cp)
    truncate_metrics(run.run_dir, st.step)


def _state_dict(run: _Run, st: RunState) -> dict:
    S = run.steps_per_epoch
    return {"step": st.step, "epoch": st.step / S, "elapsed_s": run.elapsed(st), "segments": st.segments,
            "steps_per_epoch": S, "batch_size": run.hyper.batch_size, "seed": run.config.seed,
            "data_order": {"seed": run.config.seed, "batcher": "make_batches(examples, batch_size, seed, epoch)"},
            "rng": {"dropout": "numpy default_rng([seed, step]) per step"},
            "best_valid_loss": (st.best_valid if math.isfinite(st.best_valid) else None),
            "evals_without_improvement": st.bad_evals,
            "last_train_loss": st.last_train, "last_valid_loss": st.last_valid,
            "start_loss": st.watch.start, "loss_ema": st.watch.ema, "general_start": st.general_start,
            "best_step": st.best_step, "epoch_counted": st.epoch_counted, "epoch_correct": st.epoch_correct,
            "saved": now_iso()}


def _checkpoint(run: _Run, st: RunState) -> str:
    """Save the resumable state at this step (once per step)."""
    if st.checkpoint is not None and Path(st.checkpoint).name == f"step-{st.step:06d}" and Path(st.checkpoint).exists():
        return st.checkpoint
    extra = {"best.safetensors": st.best_params} if st.best_params is not None else None
    cp = save_checkpoint(run.run_dir, st.step, run.params, run.opt, _state_dict(run, st),
                         keep=run.options.keep_checkpoints, extra_tensors=extra)
    st.checkpoint = str(cp)
    update_run_json(run.run_dir, step=st.step, checkpoint=str(cp.relative_to(run.run_dir)), elapsed_s=run.elapsed(st))
    run.emit(CheckpointSaved(step=st.step, epoch=st.step / run.steps_per_epoch, path=st.checkpoint))
    return st.checkpoint


def _general_loss(run: _Run) -> float | None:
    if not run.general_examples:
        return None
    gl, _ = evaluate(run.model, run.general_examples, run.hyper.batch_size, run.pad_id, run.batcher)
    return gl if math.isfinite(gl) else None


def _quiz(run: _Run) -> tuple[int, int] | None:
    if not run.quiz_items or run.tokenizer is None:
        return None
    from .chat import ChatModel
    from .quiz import run_quiz, score

    sc = score(run_quiz(ChatModel(run.model, run.tokenizer, run.run_dir), run.quiz_items))
    return sc.correct, sc.total


def _evaluate(run: _Run, st: RunState, before_training: bool = False) -> None:
    """Validation loss and accuracy, the general-ability loss (forgetting meter) and the quiz
    score, whichever the run has; tracks the best validation loss and raises alarms."""
    vl = va = None
    if run.valid_examples:
        vl, va = evaluate(run.model, run.valid_examples, run.hyper.batch_size, run.pad_id, run.batcher)
        if not math.isfinite(vl):
            raise TrainingDiverged("the validation loss became NaN or infinite")
    gl = _general_loss(run)
    qz = _quiz(run)
    if vl is None and gl is None and qz is None:
        return
    if before_training:
        st.general_start = gl
    ep = st.step / run.steps_per_epoch
    line = {"step": st.step, "epoch": ep, "elapsed_s": run.elapsed(st)}
    if vl is not None:
        line.update(valid_loss=vl, valid_token_accuracy=va)
    if gl is not None:
        line["general_loss"] = gl
    if qz is not None:
        line.update(quiz_score=qz[0], quiz_total=qz[1])
    run.metrics.write(line)
    run.emit(EvalMetrics(step=st.step, epoch=ep, valid_loss=vl, valid_token_accuracy=va, general_loss=gl,
                         quiz_score=qz[0] if qz else None, quiz_total=qz[1] if qz else None))
    if vl is not None and not before_training:
        st.last_valid = vl
        if vl < st.best_valid - 1e-6:
            st.best_valid, st.bad_evals, st.best_step = vl, 0, st.step
            st.best_params = {k: v.copy() for k, v in run.params.items()}
        else:
            st.bad_evals += 1
        st.valid_history.append((st.step, vl, st.watch.ema))
    _check_alarms(run, st, gl)


def _answers_learned(run: _Run, st: RunState) -> bool:
    """The automatic stopping rule (auto.py explains it): once this epoch's training-token accuracy
    says the answers are nearly learned, ask the training questions themselves (greedy, as chat
    answers) and stop when enough of the trained answers come back word for word."""
    from .auto import RECALL_TARGET, TOKEN_ACCURACY_BEFORE_RECALL

    acc = st.epoch_correct / st.epoch_counted if st.epoch_counted else 0.0
    if acc < TOKEN_ACCURACY_BEFORE_RECALL or run.tokenizer is None:
        return False
    from .chat import ChatModel
    from .quiz import run_quiz, score

    sc = score(run_quiz(ChatModel(run.model, run.tokenizer, run.run_dir), run.recall_items))
    run.metrics.write({"step": st.step, "epoch": st.step / run.steps_per_epoch, "recall_score": sc.correct,
                       "recall_total": sc.total, "elapsed_s": run.elapsed(st)})
    if sc.fraction < RECALL_TARGET:
        return False

    run.emit(Notice(f"the model now gives {sc.correct} of {sc.total} training answers word for word, so training "
                    f"stops here, at epoch {st.step // run.steps_per_epoch} of up to "
                    f"{st.total_steps // run.steps_per_epoch} (more epochs would only make it forget more)"))
    return True


def _check_alarms(run: _Run, st: RunState, general_loss: float | None) -> None:
    """Overfitting: validation loss up OVERFIT_EVALS evaluations in a row while training loss
    falls. Forgetting: the general-dialog loss options.forgetting_rise above where it started."""
    h = st.valid_history[-(OVERFIT_EVALS + 1):]
    if ("overfit" not in st.alarms and len(h) == OVERFIT_EVALS + 1
            and all(b[1] > a[1] for a, b in zip(h, h[1:]))
            and all(b[2] is not None and a[2] is not None and b[2] < a[2] for a, b in zip(h, h[1:]))):
        st.alarms.add("overfit")
        msg = (f"The model is memorising the training examples instead of learning what they have in common: "
               f"for {OVERFIT_EVALS} evaluations in a row the validation loss went up ({h[0][1]:.3f} -> "
               f"{h[-1][1]:.3f}) while the training loss kept going down. Training longer makes it worse. The best "
               f"validation loss was at step {st.best_step}; stopping now and keeping that checkpoint gives the "
               "better model.")
        run.emit(RunAlarm("overfit", msg, st.step, st.best_step))
    if ("forgetting" not in st.alarms and general_loss is not None and st.general_start is not None
            and general_loss - st.general_start > run.options.forgetting_rise):
        st.alarms.add("forgetting")
        msg = (f"The model is forgetting what it knew: its loss on ordinary conversations rose from "
               f"{st.general_start:.3f} to {general_loss:.3f} since training began. It is being bent too far "
               "towards the training data (too many epochs or too high a learning rate)."
               + (f" The best validation loss was at step {st.best_step}; stopping now and keeping that "
                  "checkpoint limits the damage." if st.best_step is not None else ""))
        run.emit(RunAlarm("forgetting", msg, st.step, st.best_step))


@dataclass
class _StepTimer:
    ema: float | None = None
    last_snapshot: float = -1e9


def _step(run: _Run, st: RunState, b, timer: _StepTimer) -> None:
    """One training step on batch b: forward, loss, backward, update; then metrics and events."""
    model, cfg, opts, emit = run.model, run.config, run.options, run.emit
    step = st.step
    lr = lr_for_step(step, st.segments, cfg.schedule)
    detail = run.control.detail_wanted()
    rng = np.random.default_rng([cfg.seed, step]) if cfg.lora_dropout > 0 else None
    if opts.phase_events:
        emit(PhaseEvent(step + 1, "forward"))
    t0 = time.perf_counter()
    ids = b.input_ids
    if run.question_dropout > 0:
        from .augment import drop_question_tokens

        ids = drop_question_tokens(b.input_ids, b.labels, b.attention_mask, run.protected_ids,
                                   model.config.vocab_size, run.question_dropout,
                                   np.random.default_rng([cfg.seed, step, 7]))
    _, cache = model.forward_hidden(ids, attention_mask=b.attention_mask, train=True, rng=rng)
    if opts.phase_events:
        emit(PhaseEvent(step + 1, "loss"))
    t1 = time.perf_counter()
    # the output layer and the loss together, by chunks of the positions that count: the full
    # (batch, tokens, vocabulary) logits never exist
    hl = model.head_loss(cache, b.labels, need_grad=True, row_losses=detail)
    loss = hl.loss
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the loss became {'NaN' if math.isnan(loss) else 'infinite'}")
    n_counted, n_correct = hl.counted, hl.correct
    if detail:
        row_losses = np.full(len(hl.row_losses), np.nan)
        row_losses[1:] = hl.row_losses[:-1]  # the loss of token t is predicted at position t - 1
        act_rms = model.residual_rms(cache, b.attention_mask)
    if opts.phase_events:
        emit(PhaseEvent(step + 1, "backward"))
    t2 = time.perf_counter()
    grads = model.backward_hidden(hl, cache)
    del cache, hl
    if opts.phase_events:
        emit(PhaseEvent(step + 1, "update"))
    t3 = time.perf_counter()
    want_snap = (time.perf_counter() - timer.last_snapshot) >= cfg.snapshot_interval_s
    layer_gn = run.snap.grad_norms(grads) if want_snap else None  # before clipping: what backprop produced
    tensor_gn = run.snap.tensor_grad_norms(grads) if detail else None
    gnorm = clip_grads(grads, cfg.grad_clip)
    if not math.isfinite(gnorm):
        raise TrainingDiverged("the gradients became NaN or infinite")
    if gnorm == 0.0 and n_counted and loss > 1e-3:
        # every gradient exactly zero while the loss is not: activations overflowed and the
        # network went dead (it predicts a flat distribution and can no longer learn)
        raise TrainingDiverged("the activations overflowed and the gradients became exactly zero")
    before = run.snap.before_update() if (want_snap or detail) else None
    rel = adamw_step(run.params, grads, run.opt, lr, run.acfg)
    model.weights_changed(adapters_only=model.lora is not None)
    t4 = time.perf_counter()
    del grads
    st.step = step + 1
    st.last_train = float(loss)
    st.epoch_counted += int(n_counted)
    st.epoch_correct += int(n_correct)
    why = st.watch.update(st.last_train)
    dt = t4 - t0
    timer.ema = dt if timer.ema is None else 0.8 * timer.ema + 0.2 * dt
    ntok = int(b.attention_mask.sum())
    acc = n_correct / n_counted if n_counted else 0.0
    el = run.elapsed(st)
    phases = PhaseTimes((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3)
    sm = StepMetrics(step=st.step, epoch=st.step / run.steps_per_epoch, train_loss=st.last_train,
                     train_token_accuracy=acc, lr=lr, grad_norm=gnorm, tokens_per_s=ntok / dt if dt > 0 else 0.0,
                     elapsed_s=el, eta_s=timer.ema * (st.total_steps - st.step), total_steps=st.total_steps,
                     phases=phases)
    run.metrics.write({"step": st.step, "epoch": sm.epoch, "train_loss": sm.train_loss, "train_token_accuracy": acc,
                       "lr": lr, "grad_norm": gnorm, "tokens_per_s": sm.tokens_per_s, "elapsed_s": el,
                       "eta_s": sm.eta_s, "forward_ms": phases.forward_ms, "loss_ms": phases.loss_ms,
                       "backward_ms": phases.backward_ms, "update_ms": phases.update_ms,
                       "tokens": ntok, "trained_tokens": int(n_counted)})
    emit(sm)
    if detail:
        emit(StepDetail(step=st.step, learning_rate=lr, input_ids=np.array(ids), labels=np.array(b.labels),
                        attention_mask=np.array(b.attention_mask), example_lines=tuple(int(x) for x in b.lines),
                        activation_rms=tuple(act_rms), token_losses=row_losses, loss=float(loss),
                        grad_norms=tensor_gn, update_ratios=run.snap.update_ratios(before, rel)))
    if want_snap:
        t5 = time.perf_counter()
        emit(run.snap.build(st.step, before, layer_gn, run.control.focus_matrix, rel))
        # never spend more than ~1/6 of the time on snapshots (full fine-tuning of big matrices),
        # unless every step was asked for (interval 0)
        slow = 5 * (time.perf_counter() - t5) if cfg.snapshot_interval_s > 0 else 0.0
        timer.last_snapshot = time.perf_counter() + slow
    if why:
        raise TrainingDiverged(why)


def _after_step(run: _Run, st: RunState) -> None:
    """Evaluate and checkpoint where the schedule says so; early stopping."""
    S = run.steps_per_epoch
    epoch_end = st.step % S == 0
    if epoch_end or (run.hyper.eval_every and st.step % run.hyper.eval_every == 0):
        _evaluate(run, st)
    if epoch_end and (run.config.checkpoint_every_epoch or st.step >= st.total_steps) and not st.watch.suspicious():
        _checkpoint(run, st)  # never while the loss is far above the start: the last checkpoint stays a good one
    patience = run.config.early_stopping_patience
    if run.valid_examples and patience and st.bad_evals >= patience:
        st.early_stopped = True  # no better validation loss for `patience` evaluations
    if epoch_end:
        if run.recall_items and st.step < st.total_steps and _answers_learned(run, st):
            st.early_stopped = True
            st.learned_at = st.step
        st.epoch_counted = st.epoch_correct = 0


def _train_epochs(run: _Run, st: RunState) -> bool:
    """Steps until the schedule ends, early stopping, or a stop request. True when stopped."""
    S = run.steps_per_epoch
    timer = _StepTimer()

    def on_pause():
        run.emit(RunPaused(run_dir=str(run.run_dir), step=st.step))

    while st.step < st.total_steps and not st.early_stopped:
        e = st.step // S
        batches = run.batcher(run.train_examples, run.hyper.batch_size, run.config.seed, e, run.pad_id)
        if len(batches) != S:
            raise RuntimeError(f"epoch {e} has {len(batches)} batches, expected {S}")
        for i in range(st.step - e * S, S):
            if run.control.wait_while_paused(on_pause=on_pause):
                return True
            _step(run, st, batches[i], timer)
            _after_step(run, st)
            run.control.after_step()
            if st.early_stopped:
                break
    return False


def _finish(run: _Run, st: RunState, stopped: bool) -> TrainResult:
    """Write the final checkpoint, model/ and adapter/, the run's status; send the end event."""
    rd = str(run.run_dir)
    if stopped and run.control.keep_best and st.best_params is not None:
        cp = _checkpoint(run, st)  # the state it stopped in, so the run can still continue from there
        _restore_best(run, st)
        model_dir = save_run_model(run.model, run.run_dir, run.base_dir, run.default_system)
        el = run.elapsed(st)
        update_run_json(run.run_dir, status="stopped", step=st.step, stopped=now_iso(), elapsed_s=el,
                        final={"train_loss": st.last_train, "valid_loss": st.best_valid, "steps": st.step,
                               "elapsed_s": el, "restored_best": True, "best_step": st.best_step})
        run.metrics.close()
        run.emit(RunStopped(run_dir=rd, step=st.step, checkpoint=cp))
        return TrainResult("stopped", rd, st.step, st.last_train, st.best_valid, el, model_dir, cp)
    if stopped:
        cp = _checkpoint(run, st)
        model_dir = save_run_model(run.model, run.run_dir, run.base_dir, run.default_system) \
            if run.options.save_model_on_stop else None
        el = run.elapsed(st)
        update_run_json(run.run_dir, status="stopped", step=st.step, stopped=now_iso(), elapsed_s=el,
                        final={"train_loss": st.last_train, "valid_loss": st.last_valid, "steps": st.step,
                               "elapsed_s": el})
        run.metrics.close()
        run.emit(RunStopped(run_dir=rd, step=st.step, checkpoint=cp))
        return TrainResult("stopped", rd, st.step, st.last_train, st.last_valid, el, model_dir, cp)
    if st.step % run.steps_per_epoch != 0 or not run.config.checkpoint_every_epoch:
        _checkpoint(run, st)  # the final state, so more epochs can be added later
    restored = bool(run.config.restore_best and st.best_params is not None)
    if restored:
        _restore_best(run, st)
    model_dir = save_run_model(run.model, run.run_dir, run.base_dir, run.default_system)
    el = run.elapsed(st)
    final = {"train_loss": st.last_train, "valid_loss": st.last_valid, "steps": st.step, "elapsed_s": el,
             "best_valid_loss": st.best_valid if math.isfinite(st.best_valid) else None,
             "early_stopped": st.early_stopped, "restored_best": restored, "answers_learned_at_step": st.learned_at}
    update_run_json(run.run_dir, status="finished", step=st.step, finished=now_iso(), elapsed_s=el, final=final,
                    model="model", adapter="adapter" if run.model.lora is not None else None)
    run.metrics.close()
    run.emit(RunFinished(run_dir=rd, model_dir=model_dir, final_train_loss=st.last_train,
                         final_valid_loss=st.last_valid, steps=st.step, elapsed_s=el))
    return TrainResult("finished", rd, st.step, st.last_train, st.last_valid, el, model_dir, st.checkpoint)


def _restore_best(run: _Run, st: RunState) -> None:
    for k, v in run.params.items():
        v[...] = st.best_params[k]
    run.model.weights_changed()


def _fail(run: _Run, st: RunState, reason: str, kind: str = "error", lr: float | None = None) -> TrainResult:
    run.metrics.close()
    el = run.elapsed(st)
    try:
        update_run_json(run.run_dir, status="failed", step=st.step, finished=now_iso(),
                        failure={"reason": reason, "kind": kind, "step": st.step, "lr": lr,
                                 "checkpoint": Path(st.checkpoint).name if st.checkpoint else None})
    except Exception:  # noqa: BLE001 - the failure itself must still be reported
        pass
    run.emit(RunFailed(run_dir=str(run.run_dir), reason=reason, step=st.step, checkpoint=st.checkpoint))
    return TrainResult("failed", str(run.run_dir), st.step, st.last_train, st.last_valid, el, None, st.checkpoint,
                       reason)


def _memory_problem(run: _Run) -> str | None:
    """Why this run would not fit in memory, or None. With activation checkpointing on "auto",
    it is switched on when that makes a run fit that otherwise would not (and said so)."""
    opts = run.options
    model = run.model
    setting = run.config.activation_checkpointing
    model.activation_checkpointing = setting is True
    if not opts.check_memory:
        return None
    longest = max((len(e) for e in run.train_examples), default=1)
    avail = available_memory_bytes()
    if opts.memory_limit_bytes:
        avail = min(avail, opts.memory_limit_bytes) if avail else opts.memory_limit_bytes

    def estimate(ckpt: bool):
        return estimate_peak_memory(model.config, model.num_parameters(), int(sum(v.size for v in run.params.values())),
                                    run.hyper.batch_size, longest, full=model.lora is None, available=avail,
                                    checkpointing=ckpt)

    est = estimate(model.activation_checkpointing)
    if not est.fits and setting == "auto" and estimate(True).fits:
        model.activation_checkpointing = True
        run.emit(Notice("activation checkpointing is on: the run fits in memory only if each layer's activations "
                        "are computed again in the backward (about a third more time per step)"))
        return None
    if est.fits:
        return None
    hint = "" if model.activation_checkpointing else " or activation checkpointing,"
    return (f"This run would not fit in memory: {est.explain()}. Use a smaller batch size or a shorter "
            f"maximum length,{hint} or LoRA instead of full fine-tuning.")


# ----------------------------------------------------------------------------- the entry point
def train(model, train_examples, valid_examples, config: TrainConfig, hyper: Hyperparameters, run_dir,
          on_event: Callable | None = None, control: TrainControl | None = None, resume: bool = False,
          options: LoopOptions = LoopOptions(), base_dir=None, segments: list[dict] | None = None,
          pad_id: int = 0, batcher=None, general_examples=(), quiz_items=(), tokenizer=None,
          recall_items=(), question_dropout: float = 0.0) -> TrainResult:
    """Train `model` (LoRA already attached for method "lora") in place on encoded examples.

    run_dir must exist with a run.json (see runs.py / session.py). With resume=True the newest
    checkpoint in run_dir/checkpoints is loaded and training continues after it; `segments` may
    then extend the schedule (more epochs). Returns a TrainResult; never raises for a diverged
    run or a stop (those become RunFailed / RunStopped events).

    numpy overflow warnings are silenced (the padding mask adds two very negative numbers on
    purpose; real overflows are caught as non-finite losses or gradients)."""
    run = _Run(model=model, train_examples=train_examples, valid_examples=valid_examples, config=config, hyper=hyper,
               run_dir=Path(run_dir), emit=on_event or (lambda e: None), control=control or TrainControl(),
               options=options, base_dir=Path(base_dir) if base_dir is not None else None, pad_id=pad_id,
               batcher=batcher or _default_batcher(), general_examples=general_examples, quiz_items=quiz_items,
               tokenizer=tokenizer, recall_items=recall_items,
               question_dropout=question_dropout if tokenizer is not None else 0.0,
               protected_ids=frozenset(tokenizer.special_ids()) if tokenizer is not None else frozenset())
    run.params = model.trainable_params()
    run.opt = adamw_init(run.params)
    run.acfg = AdamWConfig(weight_decay=config.weight_decay)
    st = RunState(segments=[dict(s) for s in (segments or default_segments(hyper))])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if resume:
            _restore(run, st, segments_given=segments is not None)
        run.snap = SnapshotMaker(model, options.snapshot_matrices or None, options.snapshot_max_size)
        run.metrics = MetricsWriter(run.run_dir)
        run.t_start = time.perf_counter()
        resumed_from = st.step
        lr = lr_for_step(min(st.step, st.total_steps - 1), st.segments, config.schedule)
        try:
            info = read_run_json(run.run_dir)
            run.default_system = info.get("system_prompt") if options.default_system_prompt else None
            problem = _memory_problem(run)
            if problem:
                return _fail(run, st, problem)
            info.update(status="running", step=st.step, hyper=hyper.to_dict(), schedule_segments=st.segments,
                        pid=os.getpid())
            info.pop("failure", None)
            if resume:
                info.setdefault("resumed", []).append({"from_step": resumed_from, "at": now_iso()})
            write_run_json(run.run_dir, info)
            S = hyper.steps_per_epoch
            emit = run.emit
            emit(RunStarted(run_dir=str(run.run_dir), total_steps=st.total_steps, steps_per_epoch=S,
                            epochs=max(1, math.ceil(st.total_steps / S)), batch_size=hyper.batch_size,
                            learning_rate=hyper.learning_rate, num_train_examples=len(train_examples),
                            num_valid_examples=len(valid_examples),
                            trainable_params=int(sum(v.size for v in run.params.values())),
                            total_params=model.num_parameters(), resumed_from_step=resumed_from))
            if st.step == 0:
                _evaluate(run, st, before_training=True)  # where validation, general loss and quiz start
            stopped = _train_epochs(run, st)
            return _finish(run, st, stopped)
        except TrainingDiverged as e:
            lr = peak_lr_at(max(0, st.step - 1), st.segments)
            return _fail(run, st, _diverged_message(str(e), st.step, lr, st.checkpoint, config, hyper),
                         kind="diverged", lr=lr)
        except OSError as e:  # disk full, permissions, a removed folder: the machine said no
            where = e.filename or run.run_dir
            return _fail(run, st, f"Could not write {where}: {e.strerror or e}. Nothing already saved was "
                                  "damaged; fix the problem (for example free some disk space) and continue the run.",
                         kind="io")
        except MemoryError:
            keep = f" The last checkpoint ({Path(st.checkpoint).name}) was kept." if st.checkpoint else ""
            return _fail(run, st, "Training ran out of memory. Use a smaller batch size or a shorter maximum "
                                  "length, or LoRA instead of full fine-tuning." + keep)
        except Exception as e:  # noqa: BLE001 - reported as a failed run; details go to error.log
            try:
                (run.run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            except OSError:
                pass
            return _fail(run, st, f"internal error: {type(e).__name__}: {e} (details in {run.run_dir / 'error.log'})")
