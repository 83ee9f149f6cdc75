"""The one base class for problems a person can fix.

Every error that is about the user's input or environment (a damaged model folder, a training
file with mistakes, a run folder in use, a setting out of range) derives from `UserError`, and
its message names the file, line or field in plain words, without command-line flags (each front
end adds its own hints). The command line prints such errors as `error: ...` and exits 2; any
other exception is a bug and is reported as an internal error. The GUI shows both in its error
banner.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in the user's files, settings or machine, explained in words."""


class ModelFormatError(UserError, ValueError):
    """A model folder or config that we cannot load (the message names file and problem)."""
