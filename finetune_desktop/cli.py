"""Command line: `finetune-desktop [gui [DATA] | validate | train | chat]`.

Qt is imported only for the GUI. Bad input prints one line `error: ...` and exits non-zero;
never a traceback."""
from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """An error for the user: printed as `error: <message>`, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _auto_int(s: str):
    if s == "auto":
        return "auto"
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _auto_float(s: str):
    if s == "auto":
        return "auto"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _pos_int(s: str):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="finetune-desktop",
                description="Fine-tune a small language model on your own computer and watch it learn.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("gui", help="open the app (default)")
    g.add_argument("data", nargs="?", help="a training file to load")

    v = sub.add_parser("validate", help="check a training file and report every problem by line")
    v.add_argument("data")
    v.add_argument("--max-seq-len", type=_pos_int, default=512)
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--base", default="base", help="model whose tokenizer counts tokens (default: base)")

    t = sub.add_parser("train", help="fine-tune a model on a training file")
    t.add_argument("data")
    t.add_argument("--out", required=True, help="run folder to create")
    t.add_argument("--base", default="base", help="model folder, run folder, or 'base' (embedded)")
    vg = t.add_mutually_exclusive_group()
    vg.add_argument("--validation-file")
    vg.add_argument("--val-split", type=float)
    t.add_argument("--method", choices=["lora", "full"], default="lora")
    t.add_argument("--lora-rank", type=_pos_int, default=None)
    t.add_argument("--epochs", type=_auto_int, default="auto")
    t.add_argument("--batch-size", type=_auto_int, default="auto")
    t.add_argument("--learning-rate", type=_auto_float, default="auto")
    t.add_argument("--max-seq-len", type=_pos_int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="print only the summary")

    c = sub.add_parser("chat", help="chat with a model")
    c.add_argument("model", help="model folder, run folder, or 'base'")
    c.add_argument("--prompt")
    c.add_argument("--system")
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--repetition-penalty", type=float, default=1.1)
    c.add_argument("--max-new-tokens", type=_pos_int, default=200)
    c.add_argument("--seed", type=int, default=None)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0] not in ("gui", "validate", "train", "chat", "-h", "--help")):
        argv = ["gui", *argv]
    args = parser.parse_args(argv)
    try:
        if args.command == "gui":
            from .gui.app import run_app
            return run_app(args.data)
        if args.command == "validate":
            from .data.validate_cli import run_validate
            return run_validate(args)
        if args.command == "train":
            from .training.cli_train import run_train
            return run_train(args)
        if args.command == "chat":
            from .training.cli_chat import run_chat
            return run_chat(args)
        parser.print_help()
        return 2
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: no tracebacks for users
        from .engine.config import ModelFormatError
        if isinstance(e, (ModelFormatError, OSError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"error: internal error: {type(e).__name__}: {e} (please report this)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
