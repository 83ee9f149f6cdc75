"""Format detection and streaming readers. Each reader yields `Record`s (one per example, with its
source line) and `Issue`s (for lines that are not examples at all), in file order.

Formats (detected by content; the extension only breaks ties):
  jsonl  one JSON object per line: {"messages": [...]} or {"prompt": ..., "completion": ...}
  json   one JSON array of such objects (or such objects one after another, pretty-printed)
  csv    a header naming a prompt column and a response column; comma, semicolon or tab separated
  tsv    the same, tab separated
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional, Union

from . import textio
from .textio import LineItem, Sniff, iter_lines
from .types import Issue

JSON_WS = " \t\n\r"

# CSV header names (compared lower-cased, with spaces and dashes as underscores)
PROMPT_COLUMNS = ("prompt", "instruction", "question", "user", "query", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "assistant", "completion")
SYSTEM_COLUMNS = ("system", "system_prompt")
EXTRA_INPUT_COLUMN = "input"  # Alpaca style: appended to the instruction when both are present


class Record(NamedTuple):
    line: int                        # line where the example starts
    value: Any                       # parsed JSON value, or for CSV a dict column -> text
    kind: str                        # "json" or "csv"
    raw: Optional[str] = None        # for multi-line JSON: the element's text, to find a field's own line


@dataclass(frozen=True)
class CsvColumns:
    delimiter: str
    header: tuple[str, ...]          # as written
    prompt: Optional[int]            # column indices
    response: Optional[int]
    system: Optional[int]
    extra_input: Optional[int]       # Alpaca "input" next to "instruction"
    ignored: tuple[str, ...]


def _norm(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower().replace(" ", "_").replace("-", "_")


def csv_columns(header: list[str], delimiter: str) -> CsvColumns:
    names = [_norm(h) for h in header]

    def first(candidates, skip=()):
        for c in candidates:
            if c in names and names.index(c) not in skip:
                return names.index(c)
        return None

    prompt = first(PROMPT_COLUMNS)
    response = first(RESPONSE_COLUMNS)
    system = first(SYSTEM_COLUMNS)
    extra = None
    if prompt is not None and names[prompt] == "instruction" and EXTRA_INPUT_COLUMN in names:
        extra = names.index(EXTRA_INPUT_COLUMN)
    used = {i for i in (prompt, response, system, extra) if i is not None}
    ignored = tuple(h for i, h in enumerate(header) if i not in used and h.strip())
    return CsvColumns(delimiter, tuple(header), prompt, response, system, extra, ignored)


def _parse_header(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return []


def sniff_csv_header(line: str) -> Optional[CsvColumns]:
    """A CSV/TSV header with usable prompt and response columns, or None."""
    for d in ("\t", ",", ";", "|"):
        if d not in line:
            continue
        cols = csv_columns(_parse_header(line, d), d)
        if cols.prompt is not None and cols.response is not None:
            return cols
    return None


@dataclass(frozen=True)
class Detected:
    format: Optional[str]            # "jsonl", "json", "csv", "tsv", or None (empty / unknown)
    first_line: int                  # line of the first non-blank line (1 if none)
    csv: Optional[CsvColumns] = None
    issue: Optional[Issue] = None    # why the format could not be determined


def _first_lines(path, sniff: Sniff, n: int = 2) -> list[LineItem]:
    out = []
    for item in iter_lines(path, sniff):
        ln, text, issue = item
        if text is not None and not text.strip(" \t\ufeff\f\v"):
            continue
        out.append(item)
        if len(out) >= n:
            break
    return out


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


def detect_format(path, sniff: Sniff) -> Detected:
    ext = os.path.splitext(str(path))[1].lower()
    first = _first_lines(path, sniff)
    if not first:
        return Detected(None, 1, issue=Issue(1, None, "the file is empty: no examples found", "error", "empty_file"))
    ln, text, issue = first[0]
    if text is None:  # the first line itself is undecodable or too long: go by extension
        fmt = {".json": "json", ".csv": "csv", ".tsv": "tsv"}.get(ext, "jsonl")
        return Detected(fmt, ln)
    s = text.strip(" \t\ufeff")
    if s[:1] in ("{", "["):
        one_line_ok = True
        try:
            json.loads(s)
        except (ValueError, RecursionError):
            one_line_ok = False
        if one_line_ok:
            if s[0] == "[" and len(first) == 1:
                return Detected("json", ln)   # a one-line JSON array of examples
            return Detected("jsonl", ln)
        # the first value spans several lines: a JSON document (pretty-printed array or objects)?
        for item in iter_json_values(path, sniff):
            if isinstance(item, Record) or ext == ".json" or s == "[" or s == "{":
                return Detected("json", ln)
            break
        if ext in (".jsonl", ".ndjson") or (len(first) > 1 and first[1][1] is not None and _parses(first[1][1])):
            return Detected("jsonl", ln)  # JSON Lines whose first line is broken
    else:
        cols = sniff_csv_header(text)
        if cols is not None:
            return Detected("tsv" if cols.delimiter == "\t" else "csv", ln, csv=cols)
        if ext in (".jsonl", ".json", ".ndjson"):
            return Detected("jsonl" if ext != ".json" else "json", ln)
        if ext in (".csv", ".tsv"):
            d = "\t" if (ext == ".tsv" or "\t" in text) else ","
            cols = csv_columns(_parse_header(text, d), d)
            return Detected("tsv" if d == "\t" else "csv", ln, csv=cols)
    return Detected(None, ln, issue=Issue(
        ln, None, "unrecognised format: expected JSON Lines (one {\"messages\": [...]} object per line), "
                  "a JSON array, or a CSV/TSV file whose header names a prompt and a response column "
                  "(prompt/response, instruction/output, question/answer or user/assistant)", "error", "unknown_format"))


# ---------------------------------------------------------------------------------------------
# JSON Lines

def iter_jsonl(path, sniff: Sniff) -> Iterator[Union[Record, Issue]]:
    loads = json.loads
    for ln, text, issue in iter_lines(path, sniff):
        if issue is not None:
            yield issue
            continue
        if not text or text.isspace():
            continue
        if text[0] == "\ufeff":  # a BOM in the middle (files concatenated): harmless
            text = text[1:]
        try:
            value = loads(text)
        except json.JSONDecodeError as e:
            yield Issue(ln, None, f"not valid JSON: {e.msg} (column {e.colno})", "error", "not_json")
            continue
        except RecursionError:
            yield Issue(ln, None, "not valid JSON: nested too deeply", "error", "not_json")
            continue
        except ValueError as e:  # e.g. an integer with too many digits
            yield Issue(ln, None, f"not valid JSON: {e}", "error", "not_json")
            continue
        yield Record(ln, value, "json")


# ---------------------------------------------------------------------------------------------
# JSON document: an array of examples, or objects one after another (pretty-printed)

class _JsonStream:
    """A sliding text window over the file's lines, so elements of a big JSON array can be parsed
    one at a time. Keeps the line number of the window's first character."""

    def __init__(self, lines: Iterator[LineItem]):
        self.lines = lines
        self.buf = ""
        self.pos = 0
        self.base_line = 1           # line number of buf[0]
        self.eof = False
        self.issue: Optional[Issue] = None

    def fill(self, want: int) -> None:
        """Read lines until at least `want` characters are pending after pos (or EOF)."""
        parts = []
        pending = len(self.buf) - self.pos
        while pending < want and not self.eof:
            try:
                ln, text, issue = next(self.lines)
            except StopIteration:
                self.eof = True
                break
            if issue is not None:  # an undecodable/too long line inside a JSON document: stop there
                self.issue = issue
                self.eof = True
                break
            parts.append(text)
            parts.append("\n")
            pending += len(text) + 1
        if parts:
            if self.pos > (1 << 20):
                self.compact()
            self.buf += "".join(parts)

    def compact(self) -> None:
        self.base_line += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos:]
        self.pos = 0

    def line_at(self, p: int) -> int:
        return self.base_line + self.buf.count("\n", 0, p)

    def skip_ws(self) -> Optional[str]:
        """Skip whitespace; return the next character (not consumed), or None at the end."""
        while True:
            buf, p, n = self.buf, self.pos, len(self.buf)
            while p < n and buf[p] in JSON_WS:
                p += 1
            self.pos = p
            if p < n:
                return buf[p]
            if self.eof:
                return None
            self.fill(1 << 16)


def iter_json_values(path, sniff: Sniff, max_value_chars: Optional[int] = None) -> Iterator[Union[Record, Issue]]:
    """Stream the elements of a top-level JSON array (or a sequence of top-level values).
    A syntax error ends the reading (the rest of the document cannot be trusted) with an issue
    naming the line."""
    if max_value_chars is None:
        max_value_chars = textio.MAX_LINE_BYTES
    s = _JsonStream(iter_lines(path, sniff))
    decoder = json.JSONDecoder()
    s.fill(1 << 16)
    c = s.skip_ws()
    if c is None:
        if s.issue:
            yield s.issue
        return
    in_array = c == "["
    if in_array:
        s.pos += 1
    first = True
    while True:
        c = s.skip_ws()
        if in_array:
            if c == "]":
                s.pos += 1
                c = s.skip_ws()
                if c is not None:
                    yield Issue(s.line_at(s.pos), None, "extra data after the closing ']' of the array", "error", "not_json")
                elif s.issue:
                    yield s.issue
                return
            if not first:
                if c != ",":
                    if c is None:
                        yield s.issue or Issue(s.line_at(s.pos), None, "not valid JSON: the array is not closed with ']'",
                                               "error", "not_json")
                    else:
                        yield Issue(s.line_at(s.pos), None, f"not valid JSON: expected ',' or ']' after an example, "
                                                            f"found {c!r}", "error", "not_json")
                    return
                s.pos += 1
                c = s.skip_ws()
                if c == "]":
                    yield Issue(s.line_at(s.pos), None, "not valid JSON: a trailing comma before ']'", "error", "not_json")
                    return
        if c is None:
            if s.issue:
                yield s.issue
            elif in_array:
                yield Issue(s.line_at(s.pos), None, "not valid JSON: the array is not closed with ']'", "error", "not_json")
            return
        first = False
        # decode one value, reading more text while it may just be incomplete
        while True:
            start = s.pos
            try:
                value, end = decoder.raw_decode(s.buf, start)
            except json.JSONDecodeError as e:
                maybe_cut = e.msg.startswith("Unterminated string") or e.pos >= len(s.buf.rstrip(JSON_WS))
                if maybe_cut and not s.eof and len(s.buf) - start <= max_value_chars:
                    s.fill(max(1 << 16, 2 * (len(s.buf) - start)))
                    continue
                if maybe_cut and not s.eof:
                    yield Issue(s.line_at(start), None, f"this example is larger than "
                                f"{max_value_chars // (1024 * 1024)} MB; the rest of the file is not read",
                                "error", "line_too_long")
                    return
                if s.issue is not None and maybe_cut:
                    yield s.issue
                    return
                yield Issue(s.line_at(e.pos), None, f"not valid JSON: {e.msg}", "error", "not_json")
                return
            except RecursionError:
                yield Issue(s.line_at(start), None, "not valid JSON: nested too deeply", "error", "not_json")
                return
            except ValueError as e:
                yield Issue(s.line_at(start), None, f"not valid JSON: {e}", "error", "not_json")
                return
            if end >= len(s.buf) and not s.eof:  # a number may continue in the next line
                s.fill(len(s.buf) - start + (1 << 16))
                continue
            break
        if end - start > max_value_chars:
            yield Issue(s.line_at(start), None, f"this example is too long ({end - start:,} characters; one example "
                        f"may be at most {max_value_chars // (1024 * 1024)} MB)", "error", "line_too_long")
        else:
            raw = s.buf[start:end] if "\n" in s.buf[start:end] else None
            yield Record(s.line_at(start), value, "json", raw)
        s.pos = end
        if not in_array:
            c = s.skip_ws()
            if c is not None and c not in "{[":
                yield Issue(s.line_at(s.pos), None, f"not valid JSON: unexpected {c!r} after an example", "error", "not_json")
                return


def locate_line(record: Record, path: tuple) -> int:
    """The line of the value at `path` (keys and indices) inside a multi-line JSON element, or the
    element's own line. Never raises."""
    if record.raw is None or not path:
        return record.line
    try:
        off = _locate(record.raw, 0, path)
    except Exception:  # noqa: BLE001 - a best-effort nicety
        off = None
    if off is None:
        return record.line
    return record.line + record.raw.count("\n", 0, off)


def _skip(raw: str, p: int) -> int:
    while p < len(raw) and raw[p] in JSON_WS:
        p += 1
    return p


def _locate(raw: str, p: int, path: tuple) -> Optional[int]:
    decoder = json.JSONDecoder()
    for depth, key in enumerate(path):
        p = _skip(raw, p)
        if isinstance(key, str):
            if raw[p] != "{":
                return None
            p += 1
            found = None
            while True:
                p = _skip(raw, p)
                if raw[p] == "}":
                    return None
                kpos = p
                k, p = decoder.raw_decode(raw, p)
                p = _skip(raw, p) + 1  # the ':'
                p = _skip(raw, p)
                if k == key:
                    found = kpos if depth == len(path) - 1 else p
                    break
                _, p = decoder.raw_decode(raw, p)
                p = _skip(raw, p)
                if raw[p] == ",":
                    p += 1
            if depth == len(path) - 1:
                return found
        else:
            if raw[p] != "[":
                return None
            p += 1
            for _ in range(key):
                p = _skip(raw, p)
                _, p = decoder.raw_decode(raw, p)
                p = _skip(raw, p)
                if raw[p] != ",":
                    return None
                p += 1
            p = _skip(raw, p)
            if depth == len(path) - 1:
                return p
    return p


# ---------------------------------------------------------------------------------------------
# CSV / TSV

def iter_csv(path, sniff: Sniff, columns: CsvColumns) -> Iterator[Union[Record, Issue]]:
    """Rows as Records whose value maps column index -> text; the header row is skipped. Quoted
    fields may span lines; a row's line is the line where it starts."""
    lines = iter_lines(path, sniff)
    state: dict = {"first": None}   # line where the row being read started
    pending_issues: list[Issue] = []

    def feed():
        for ln, text, issue in lines:
            if issue is not None:
                pending_issues.append(issue)
                continue
            if state["first"] is None:
                state["first"] = ln
            yield text + "\n"

    old_limit = csv.field_size_limit()
    csv.field_size_limit(textio.MAX_LINE_BYTES)
    try:
        reader = csv.reader(feed(), delimiter=columns.delimiter)
        header_seen = False
        while True:
            try:
                row = next(reader)
            except StopIteration:
                row = None
            except csv.Error as e:
                row = e
            while pending_issues:
                yield pending_issues.pop(0)
            if row is None:
                break
            if isinstance(row, csv.Error):
                yield Issue(state["first"], None, f"CSV error: {row}", "error", "csv")
                state["first"] = None
                continue
            line = state["first"]
            state["first"] = None
            if not row or all(not c.strip() for c in row):
                continue  # a blank line, or a row of empty cells
            if not header_seen:
                header_seen = True
                continue
            yield Record(line, row, "csv")
    finally:
        csv.field_size_limit(old_limit)
