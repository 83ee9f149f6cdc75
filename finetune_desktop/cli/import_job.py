"""`finetune-desktop import JOB_DIR [--out RUN]`

Turn a finished TRL job's output into a normal run folder (run.json, metrics.jsonl, model/ with the LoRA merged, adapter/), so it shows in the
run history, draws its loss curves and chats like any run."""
from __future__ import annotations

NAME = "import"


def register(sub) -> None:
    i = sub.add_parser(NAME, help="turn a finished training job's output into a run folder",
                       description=__doc__.split("\n\n", 1)[1])
    i.add_argument("job", metavar="JOB_DIR", help="the folder `finetune-desktop job` wrote (with output/ filled in)")
    i.add_argument("--out", metavar="RUN", default=None,
                   help="the run folder to create (default: a new folder in the app's runs folder)")
    i.set_defaults(run=run)


def run(args) -> int:
    from ..interop.job_import import import_job

    r = import_job(args.job, args.out)
    print(f"imported {args.job} as {r.run_dir} ({r.steps} steps, final train loss "
          f"{'-' if r.final_train_loss is None else f'{r.final_train_loss:.4f}'})")
    print(f"chat with it: finetune-desktop chat {r.run_dir}")
    return 0
