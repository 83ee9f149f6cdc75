"""The command line: `finetune-desktop [gui [DATA] | validate | train | chat | ...]`.

One module per command (`register` adds its parser, `run` does the work); `main.py` holds the
parser and the error convention (see errors.py)."""
from .errors import CliError
from .main import build_parser, main

__all__ = ["main", "build_parser", "CliError"]
