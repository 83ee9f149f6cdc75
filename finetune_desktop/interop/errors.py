"""The one error class of the interop package."""
from __future__ import annotations

from ..engine.errors import UserError


class InteropError(UserError):
    """An export, job or import that cannot be done; the message names the file and field."""
