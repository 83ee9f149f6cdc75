"""Argument types and flags shared by several commands."""
from __future__ import annotations

import argparse
import sys


def _whole_number(s: str, minimum: int, auto: bool):
    """A whole number >= minimum (0 or 1), or with auto=True also the word 'auto'."""
    if auto and s == "auto":
        return "auto"
    try:
        v = int(s)
    except ValueError:
        expected = "a whole number or 'auto'" if auto else "a whole number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be {'positive' if minimum == 1 else '0 or more'}, got {v}")
    return v


def auto_int(s: str):
    """A positive whole number or the word 'auto'."""
    return _whole_number(s, 1, auto=True)


def auto_float(s: str):
    """A positive number or the word 'auto'."""
    if s == "auto":
        return "auto"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def auto_fraction(s: str):
    """A number in [0, 1) or the word 'auto'."""
    return "auto" if s == "auto" else fraction(s)


def auto_nonneg_int(s: str):
    """A whole number >= 0 or the word 'auto'."""
    return _whole_number(s, 0, auto=True)


def pos_int(s: str):
    return _whole_number(s, 1, auto=False)


def fraction(s: str):
    """A number in [0, 1)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a fraction), got {v}")
    return v


class _Help(argparse.HelpFormatter):
    """Adds '(default: X)' to options that have a real default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
                and "%(default)" not in h):
            h += " (default: %(default)s)"
        return h


class Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2; help shows each option's default."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


MODEL_HELP = ("a model folder, a run folder (its tuned model), 'base' (the built-in model), or a "
              "repo id found in the local Hugging Face cache")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The fine-tuning settings shared by `train` and `job` (defaults come from TrainConfig)."""
    from ..training.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--base", default="base", help="the model to start from: " + MODEL_HELP)
    vg = p.add_mutually_exclusive_group()
    vg.add_argument("--validation-file", metavar="FILE", default=None,
                    help="examples to measure validation loss on (never trained on)")
    vg.add_argument("--val-split", type=fraction, metavar="X", default=None,
                    help="hold out this fraction of the training file for validation instead (e.g. 0.1)")
    p.add_argument("--method", choices=["lora", "full"], default=d.method,
                   help="lora trains small adapter matrices beside frozen weights; full trains every weight")
    p.add_argument("--lora-rank", type=pos_int, metavar="R", default=d.lora_rank,
                   help="rank of the LoRA matrices (more capacity, more memory); alpha scales with it")
    p.add_argument("--epochs", type=auto_int, metavar="N|auto", default=d.epochs,
                   help="passes over the training data; auto picks them from the data size")
    p.add_argument("--batch-size", type=auto_int, metavar="N|auto", default=d.batch_size,
                   help="examples per step; auto picks it from the data size and length")
    p.add_argument("--learning-rate", type=auto_float, metavar="X|auto", default=d.learning_rate,
                   help="peak learning rate after warmup; auto picks a measured safe value per method")
    p.add_argument("--max-seq-len", type=pos_int, metavar="N", default=d.max_seq_len,
                   help="longer examples are cut to this many tokens (at most the model's context)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (data order, LoRA init)")
    p.add_argument("--question-dropout", type=auto_fraction, metavar="X|auto", default=d.question_dropout,
                   help="chance that a word of the context (system message, questions) is replaced by a random "
                        "token at each step, so the model learns what each word says about the answer; auto: 0 "
                        "(it did not reliably help on the FAQ samples; try 0.3)")
    p.add_argument("--activation-checkpointing", choices=["on", "off", "auto"], default="auto",
                   help="keep only each layer's input during the forward and compute the rest again in the "
                        "backward: a fraction of the memory for about a third more time; auto: on only when the "
                        "run would not fit in memory otherwise")
    p.add_argument("--reword", type=auto_nonneg_int, metavar="N|auto", default=d.reword_questions,
                   help="new wordings of each training question that the base model writes before training, so "
                        "facts carry over to questions worded differently; needs a base model that can "
                        "paraphrase (an instruction-tuned one, not the embedded model), so auto is 0")


def config_from_args(args):
    """TrainConfig from the flags of add_train_flags."""
    from ..training.config import TrainConfig

    base = TrainConfig()
    kw = dict(method=args.method, epochs=args.epochs, batch_size=args.batch_size,
              learning_rate=args.learning_rate, seed=args.seed, max_seq_len=args.max_seq_len,
              reword_questions=args.reword, question_dropout=args.question_dropout,
              activation_checkpointing={"on": True, "off": False}.get(args.activation_checkpointing, "auto"))
    if args.lora_rank != base.lora_rank:
        kw["lora_rank"] = args.lora_rank
        kw["lora_alpha"] = float(base.lora_alpha / base.lora_rank * args.lora_rank)  # keep scale alpha/r
    if args.val_split is not None:
        kw["val_split"] = args.val_split
    return base.replace(**kw)
