"""`finetune-desktop train DATA --out DIR [...]`: validate, fine-tune, print progress and a summary.

Exit codes: 0 finished, 1 invalid data or a failed run, 2 usage / setup problems, 130 stopped by Ctrl-C
(the run is checkpointed and can be continued with --resume)."""
from __future__ import annotations

import signal
import sys
import warnings
import time
from pathlib import Path

from ..training.control import TrainControl
from ..training.events import EvalMetrics, Notice, RunAlarm, RunStarted, StepMetrics
from .common import add_train_flags, config_from_args
from .errors import CliError

NAME = "train"


def _fmt_time(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    m, s = divmod(int(s + 0.5), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class _Printer:
    """Turns events into progress lines on stdout."""

    def __init__(self, quiet: bool, out=None):
        self.quiet = quiet
        self.out = out or sys.stdout
        self.started: RunStarted | None = None

    def __call__(self, ev) -> None:
        if isinstance(ev, Notice):
            self._p(f"note: {ev.message}")
        elif isinstance(ev, RunStarted):
            self.started = ev
            if not self.quiet:
                what = f"resuming at step {ev.resumed_from_step}" if ev.resumed_from_step else "training"
                self._p(f"{what}: {ev.num_train_examples} examples"
                        f"{f' (+{ev.num_valid_examples} validation)' if ev.num_valid_examples else ''}, "
                        f"{ev.epochs} epoch{'s' if ev.epochs != 1 else ''} x {ev.steps_per_epoch} steps of {ev.batch_size}, "
                        f"learning rate {ev.learning_rate:.3g}, {ev.trainable_params:,} of "
                        f"{ev.total_params:,} parameters trainable")
        elif isinstance(ev, StepMetrics) and not self.quiet:
            w = len(str(ev.total_steps))
            self._p(f"step {ev.step:>{w}}/{ev.total_steps}  epoch {ev.epoch:5.2f}  loss {ev.train_loss:.4f}  "
                    f"acc {100 * ev.train_token_accuracy:5.1f}%  lr {ev.lr:.2e}  {ev.tokens_per_s:6.0f} tok/s  "
                    f"eta {_fmt_time(ev.eta_s)}")
        elif isinstance(ev, EvalMetrics) and not self.quiet:
            parts = []
            if ev.valid_loss is not None:
                parts.append(f"validation loss {ev.valid_loss:.4f}  acc {100 * ev.valid_token_accuracy:.1f}%")
            if ev.general_loss is not None:
                parts.append(f"general loss {ev.general_loss:.4f}")
            if ev.quiz_score is not None:
                parts.append(f"quiz {ev.quiz_score}/{ev.quiz_total}")
            self._p(f"  evaluation at step {ev.step}: " + "  ".join(parts))
        elif isinstance(ev, RunAlarm):
            self._p(f"warning: {ev.message}")

    def _p(self, s: str) -> None:
        self.out.write(s + "\n")
        self.out.flush()


def _print_data_errors(err) -> None:
    issues = list(err.issues)
    path = err.report.path if err.report is not None else None
    if not issues:
        print(f"error: {err}", file=sys.stderr)
        return
    for i in issues:
        print(f"error: {path + ': ' if path else ''}{i}", file=sys.stderr)
    print(f"error: {len(issues)} problem{'s' if len(issues) != 1 else ''} in the training data; fix "
          f"{'them' if len(issues) != 1 else 'it'} and run again (see `finetune-desktop validate`)", file=sys.stderr)


def _print_data_summary(data, shown: int = 5) -> None:
    st = data.report.stats
    tokens = st.get("total_tokens")
    msg = f"data: {len(data.conversations)} examples"
    if tokens is not None:
        msg += f", {tokens:,} tokens ({st.get('trained_tokens', 0):,} trained)"
    if data.valid_report is not None:
        msg += f"; validation file: {len(data.valid)} examples"
    elif data.valid:
        msg += f"; {len(data.valid)} held out for validation"
    print(msg)
    warns = list(data.report.warnings) + (list(data.valid_report.warnings) if data.valid_report is not None else [])
    for w in warns[:shown]:
        print(f"  warning: {w}")
    if len(warns) > shown:
        print(f"  ... and {len(warns) - shown} more warnings (see `finetune-desktop validate`)")
    sys.stdout.flush()


def register(sub) -> None:
    t = sub.add_parser(NAME, help="fine-tune a model on a training file",
                       description="Fine-tune a model on a training file and write a run folder "
                                   "(run.json, metrics.jsonl, checkpoints/, model/, adapter/).")
    t.add_argument("data", help="the training file (chat JSONL, prompt/completion JSONL, CSV or TSV)")
    t.add_argument("--out", required=True, metavar="DIR", help="the run folder to create (or to continue with --resume)")
    add_train_flags(t)
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; with --epochs N above the "
                        "run's, add epochs to a finished run")
    t.add_argument("--quiz", metavar="FILE", default=None,
                   help="a quiz file (JSONL question/expected) or training file whose questions are asked "
                        "(greedy) at every evaluation; the score is printed and kept in metrics.jsonl")
    t.add_argument("--general-file", metavar="FILE|none", default="auto",
                   help="general dialogs whose loss at every evaluation shows how much the model forgets; "
                        "auto uses the base model's own set when it ships one")
    t.add_argument("--quiet", action="store_true", help="print only the summary, not every step")
    t.set_defaults(run=run, hint_for=hint_for)


def hint_for(err) -> str:
    """The command-line hint for a library error (the library's words name no flags)."""
    from ..training.session import RunAlreadyFinished, RunFolderInUse, NothingToTrain

    if isinstance(err, RunFolderInUse):
        return "; use --resume to continue it, or choose another --out folder"
    if isinstance(err, RunAlreadyFinished):
        return " (add epochs with --resume --epochs N, N above the run's epochs)"
    if isinstance(err, NothingToTrain):
        return " (raise --max-seq-len if the replies are cut off)"
    return ""


def run(args) -> int:
    # the engine's padding mask adds two very negative numbers on purpose (numpy warns about the
    # overflow); a real overflow shows up as a non-finite loss, which the loop reports in words
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"finetune_desktop\.engine")
    from ..data.report import DataError
    from ..training.session import (check_config, check_run_dir_free, estimate_tokens_per_second,
                                    fit_config_to_model, load_base_model, prepare_data, resume_training,
                                    start_training)

    control = TrainControl()
    printer = _Printer(args.quiet)
    presses = []

    def on_sigint(signum, frame):
        presses.append(1)
        if len(presses) == 1:
            print("\nstopping after this step (press Ctrl-C again to abort without saving)", file=sys.stderr)
            control.stop()
        else:
            raise KeyboardInterrupt

    old = None
    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        old = None
    t0 = time.perf_counter()
    try:
        if args.resume:
            out = Path(args.out)
            _check_resume_data(out, args.data)
            total_epochs = args.epochs if isinstance(args.epochs, int) else None
            result = resume_training(out, on_event=printer, control=control, total_epochs=total_epochs)
        else:
            config = config_from_args(args).replace(
                quiz_file=args.quiz, general_file=None if args.general_file in ("", "none") else args.general_file)
            if not Path(args.data).exists():
                raise CliError(f"{args.data}: no such file", 2)
            check_config(config)
            check_run_dir_free(args.out)
            vpath = args.validation_file
            model, tok, base_dir = load_base_model(args.base)
            config = fit_config_to_model(config, model)
            data = prepare_data(args.data, tok, config, vpath, estimate_tokens_per_second(model, config.method),
                                base_dir=base_dir)
            if not printer.quiet:
                _print_data_summary(data)
            result = start_training(args.data, args.out, config, base=args.base, validation_path=vpath,
                                    on_event=printer, control=control, prepared=(model, tok, base_dir, data))
    except DataError as e:
        _print_data_errors(e)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)

    wall = time.perf_counter() - t0
    out = Path(result.run_dir)
    vl = f", validation loss {result.final_valid_loss:.4f}" if result.final_valid_loss is not None else ""
    tl = f"final train loss {result.final_train_loss:.4f}" if result.final_train_loss is not None else "no steps run"
    if result.status == "failed":
        print(f"error: {result.reason}", file=sys.stderr)
        return 1
    if result.status == "stopped":
        print(f"stopped at step {result.step} after {_fmt_time(wall)}: {tl}{vl}")
        if result.model_dir:
            print(f"model so far: {result.model_dir}")
        print(f"continue with: finetune-desktop train {args.data} --out {out} --resume")
        return 130
    print(f"finished in {wall:.1f} s ({result.step} steps): {tl}{vl}")
    print(f"model: {result.model_dir}")
    if (out / "adapter").is_dir():
        print(f"adapter: {out / 'adapter'}")
    print(f"chat with it: finetune-desktop chat {out}")
    return 0


def _check_resume_data(run_dir: Path, data) -> None:
    from ..training.runs import read_run_json, sha256_file

    info = read_run_json(run_dir)
    rec = (info.get("data") or {}).get("path")
    if rec and data and Path(data).exists() and Path(data).resolve() != Path(rec):
        want = (info.get("data") or {}).get("sha256")
        if want and sha256_file(data) != want:
            raise CliError(f"--resume continues {run_dir} with the data it started with ({rec}); "
                           f"{data} is a different file", 2)
