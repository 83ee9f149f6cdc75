"""`finetune-desktop [COMMAND ...]`: the parser, and one place that turns errors into exit codes.

Each command lives in its own module of this package with two functions: `register(sub)` adds
its sub-parser (every option with help text and default), `run(args) -> int` does the work and
returns the exit code. Qt is imported only by the `gui` command."""
from __future__ import annotations

import sys

from . import chat, export, gui, import_job, job, quiz, train, validate
from .common import Parser
from .errors import CliError, describe_os_error

COMMANDS = [gui, validate, train, chat, quiz, export, job, import_job]


def build_parser() -> Parser:
    p = Parser(prog="finetune-desktop",
               description="Fine-tune a small language model on your own computer and watch it learn. "
                           "Without a command, the app opens.")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for mod in COMMANDS:
        mod.register(sub)
    return p


def command_names() -> set[str]:
    return {m.NAME for m in COMMANDS}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in command_names() | {"-h", "--help"}:
        argv = ["gui", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..engine.errors import UserError
    from ..engine.runtime import configure_process

    configure_process()

    try:
        return int(args.run(args))
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except UserError as e:
        hint = getattr(args, "hint_for", None)
        extra = hint(e) if hint else ""
        print(f"error: {e}{extra}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - last line of defence: no tracebacks for users
        print(f"error: internal error: {type(e).__name__}: {e} (please report this)", file=sys.stderr)
        return 3
