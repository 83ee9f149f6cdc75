"""The command line's one error convention.

- `CliError(message, code)`: a usage problem found by a command itself; printed as
  `error: message`, exit `code` (2 unless said otherwise).
- `engine.errors.UserError` and its subclasses (model folders, training files, run folders, ...):
  problems with the user's input, raised by the library with neutral wording. `main` prints them as
  `error: message` (plus the command's flag hint, see `hint_for`) and exits 2.
- `OSError` (disk full, permission denied, ...): the machine said no; printed with the file
  name it concerns, exit 2.
- Anything else is a bug: `error: internal error: ... (please report this)`, exit 3.
"""
from __future__ import annotations


class CliError(Exception):
    """An error for the user: printed as `error: <message>`, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def describe_os_error(e: OSError) -> str:
    """'No space left on device: /path/file' rather than Python's '[Errno 28] ...' form."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        return f"{e.filename}: {what}"
    return what
