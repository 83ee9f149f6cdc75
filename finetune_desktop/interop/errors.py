"""The one error class of the interop package, and the JSON reader whose errors use it."""
from __future__ import annotations

import json
from pathlib import Path

from ..engine.errors import UserError


class InteropError(UserError):
    """An export, job or import that cannot be done; the message names the file and field."""


def read_json_object(path: Path, what: str = "file") -> dict:
    """A JSON object from path; InteropError naming the file when it is missing, unreadable or
    not an object (`what` says what the missing file is)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(d, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return d
