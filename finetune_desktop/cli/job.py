"""`finetune-desktop job DATA --out DIR [--base MODEL] [train flags]`: a self-contained TRL + PEFT +
accelerate training job for machines with GPUs, with the same settings `train` would use.

DIR gets job.json (every setting, resolved), data/train.jsonl and data/valid.jsonl, the base model
(a copy of the built-in one, else its path and Hub repo id), train.py, accelerate configs for one
GPU, several GPUs, several machines and DeepSpeed ZeRO-2/3, and a README with the commands.
`python DIR/train.py` runs it anywhere (a CPU too); the result lands in DIR/output/ and
`finetune-desktop import DIR` turns it into a run folder."""
from __future__ import annotations

from .common import add_train_flags, config_from_args

NAME = "job"


def register(sub) -> None:
    j = sub.add_parser(NAME, help="write a TRL + PEFT + accelerate training job to run on GPUs",
                       description=__doc__.split("\n\n", 1)[1])
    j.add_argument("data", help="the training file (chat JSONL, prompt/completion JSONL, CSV or TSV)")
    j.add_argument("--out", required=True, metavar="DIR", help="the job folder to create (must be new or empty)")
    add_train_flags(j)
    j.set_defaults(run=run)


def run(args) -> int:
    from ..data.report import DataError
    from ..interop.trl_job import write_job
    from .train import _print_data_errors

    config = config_from_args(args)
    try:
        job = write_job(args.data, args.out, config, base=args.base, validation_path=args.validation_file)
    except DataError as e:
        _print_data_errors(e)
        return 1
    h = job.hyper
    print(f"wrote {job.folder}: {job.num_train} training examples"
          f"{f' (+{job.num_valid} validation)' if job.num_valid else ''}, {h['epochs']} epochs x "
          f"{h['steps_per_epoch']} steps of {h['batch_size']}, learning rate {h['learning_rate']:.3g}")
    print(f"run it here:    python {job.folder / 'train.py'}")
    print(f"run it on GPUs: accelerate launch --config_file {job.folder / 'accelerate' / 'multi_gpu.yaml'} "
          f"{job.folder / 'train.py'}   (see {job.folder / 'README.md'})")
    print(f"then:           finetune-desktop import {job.folder}")
    return 0
