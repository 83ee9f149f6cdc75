"""ValidationReport (what the CLI prints, `--json` outputs and the app shows), DataError, and the
collector that keeps issue lists bounded on huge broken files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..engine.errors import UserError
from .types import Conversation, EncodedExample, Issue

MAX_ERRORS = 1000               # errors kept in a report; the rest are counted
MAX_WARNINGS_PER_KIND = 20      # per-example warnings of one kind kept; the rest are summarised


@dataclass(frozen=True)
class ValidationReport:
    path: str
    format: Optional[str]                    # "jsonl", "json", "csv", "tsv", or None if unreadable/unknown
    ok: bool                                 # no errors (warnings allowed)
    errors: list[Issue]
    warnings: list[Issue]
    stats: dict
    conversations: list[Conversation] = field(default_factory=list, repr=False)
    examples: list[EncodedExample] = field(default_factory=list, repr=False)  # with a tokenizer: encoded, truncated, dropped ones removed
    readable: bool = True                    # False: the path could not be opened at all (CLI exit 2)

    def to_dict(self) -> dict:
        """JSON-able summary: everything except the conversations and the encoded examples."""
        return {"path": self.path, "format": self.format, "ok": self.ok, "readable": self.readable,
                "errors": [i.to_dict() for i in self.errors],
                "warnings": [i.to_dict() for i in self.warnings],
                "stats": self.stats}

    def summary_line(self) -> str:
        n = self.stats.get("examples", 0)
        return (f"{n} example{'s' if n != 1 else ''}, {len(self.errors)} error{'s' if len(self.errors) != 1 else ''}, "
                f"{len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}")


class DataError(UserError):
    """A training file with errors (or one that cannot be read). `report` has every issue;
    str(error) names the first few, each with its line."""

    def __init__(self, report_or_message, issues: Optional[list[Issue]] = None):
        if isinstance(report_or_message, ValidationReport):
            self.report: Optional[ValidationReport] = report_or_message
            self.issues = list(report_or_message.errors)
            head = report_or_message.path
        else:
            self.report = None
            self.issues = list(issues or [])
            head = str(report_or_message)
        super().__init__(self._format(head))

    def _format(self, head: str, first: int = 5) -> str:
        if not self.issues:
            return head
        shown = "; ".join(str(i) for i in self.issues[:first])
        more = len(self.issues) - first
        tail = f" (and {more} more error{'s' if more != 1 else ''})" if more > 0 else ""
        return f"{head}: {shown}{tail}"


class IssueCollector:
    """Collects errors and warnings, keeping memory bounded: at most MAX_ERRORS errors, and at most
    MAX_WARNINGS_PER_KIND per-example warnings of each code (then one summary warning)."""

    def __init__(self):
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.error_count = 0
        self._warn_counts: dict[str, int] = {}
        self._warn_first_line: dict[str, Optional[int]] = {}
        self._warn_summary: dict[str, str] = {}

    def error(self, line, field, message, code=""):
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(Issue(line, field, message, "error", code))

    def add(self, issue: Issue):
        if issue.severity == "error":
            self.error(issue.line, issue.field, issue.message, issue.code)
        else:
            self.warn(issue.line, issue.field, issue.message, issue.code)

    def warn(self, line, field, message, code="", summary: Optional[str] = None):
        """A warning. With a code, only the first MAX_WARNINGS_PER_KIND of that code are kept;
        `summary` (e.g. "examples have very short replies") describes the rest."""
        if code:
            n = self._warn_counts.get(code, 0) + 1
            self._warn_counts[code] = n
            if summary:
                self._warn_summary[code] = summary
            if n > MAX_WARNINGS_PER_KIND:
                return
        self.warnings.append(Issue(line, field, message, "warning", code))

    def warn_count(self, code: str) -> int:
        return self._warn_counts.get(code, 0)

    def finish(self) -> tuple[list[Issue], list[Issue]]:
        errors = list(self.errors)
        if self.error_count > len(errors):
            more = self.error_count - len(errors)
            errors.append(Issue(None, None, f"{more} more error{'s' if more != 1 else ''} not shown "
                                f"(fix the ones above and validate again)", "error", "more_errors"))
        warnings = list(self.warnings)
        for code, n in self._warn_counts.items():
            if n > MAX_WARNINGS_PER_KIND:
                what = self._warn_summary.get(code, f"more warnings of this kind ({code})")
                warnings.append(Issue(None, None, f"{n - MAX_WARNINGS_PER_KIND} more {what} not listed "
                                      f"({n} in all)", "warning", code))
        return errors, warnings
