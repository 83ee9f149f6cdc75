"""`finetune-desktop [gui [DATA]]`: open the app."""
from __future__ import annotations

import sys

NAME = "gui"


def register(sub) -> None:
    g = sub.add_parser(NAME, help="open the app (the default when no command is given)")
    g.add_argument("data", nargs="?", help="a training file to load at start")
    g.set_defaults(run=run)


def run(args) -> int:
    from ..gui.startup import window_system_problem

    problem = window_system_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from ..gui.qtcompat import binding_problem

    problem = binding_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from ..gui.app import run_app

    return run_app(args.data)
