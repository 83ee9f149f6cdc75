"""Streaming text input: byte-order marks, binary detection and line iteration with a per-line
size limit, so a huge file or one enormous line never has to fit in memory.

UTF-8 (with or without BOM) is read in binary, line by line, and decoded per line, so one bad
byte is reported with its line and file offset and the other lines are still checked. UTF-16 and
UTF-32 need a BOM; they are decoded by an incremental text reader."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from .types import Issue

MAX_LINE_BYTES = 10 * 1024 * 1024   # one line (one example) larger than this is an error
SNIFF_BYTES = 64 * 1024

_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
    (b"\xef\xbb\xbf", "utf-8", "UTF-8 with BOM"),
    (b"\xff\xfe", "utf-16-le", "UTF-16"),
    (b"\xfe\xff", "utf-16-be", "UTF-16"),
)

_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx or Word .docx file?); export it as CSV or JSONL"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (.xls/.doc); export it as CSV"),
    (b"%PDF", "a PDF document"),
    (b"PAR1", "a Parquet file; export it as JSONL"),
    (b"ARROW1", "an Arrow file; export it as JSONL"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first"),
    (b"BZh", "a bzip2-compressed file; decompress it first"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x80\x02", "a Python pickle (never loaded, for safety)"),
    (b"\x80\x03", "a Python pickle (never loaded, for safety)"),
    (b"\x80\x04", "a Python pickle (never loaded, for safety)"),
    (b"\x80\x05", "a Python pickle (never loaded, for safety)"),
    (b"\x93NUMPY", "a NumPy array file"),
)


@dataclass(frozen=True)
class Sniff:
    encoding: str            # Python codec for the body (after the BOM)
    bom_len: int
    label: str               # for the report: "UTF-8", "UTF-8 with BOM", "UTF-16", ...
    size: int                # file size in bytes
    fatal: Optional[Issue]   # set when the file cannot be read as text at all


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def sniff_file(path: Union[str, os.PathLike]) -> Sniff:
    """Look at the first bytes: encoding from the BOM, and reject binary files early.
    Raises OSError if the file cannot be opened."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    for bom, enc, label in _BOMS:
        if head.startswith(bom):
            if enc.startswith("utf-16") and head.startswith(b"\xff\xfe\x00\x00"):
                continue
            return Sniff(enc, len(bom), label, size, None)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return Sniff("utf-8", 0, "binary", size,
                         Issue(1, None, f"this is not a text file: it looks like {what}", "error", "binary"))
    nul = head.find(b"\x00")
    if nul >= 0:
        even = head[0::2].count(0)
        odd = head[1::2].count(0)
        half = max(1, len(head) // 2)
        if max(even, odd) > 0.3 * half and min(even, odd) < 0.05 * half:
            msg = ("the file looks like UTF-16 text without a byte-order mark (BOM); "
                   "save it as UTF-8 (or UTF-16 with a BOM)")
        else:
            msg = f"this is not a text file: binary data (a NUL byte) at byte offset {nul}"
        return Sniff("utf-8", 0, "binary", size, Issue(_line_of_offset(head, nul), None, msg, "error", "binary"))
    return Sniff("utf-8", 0, "UTF-8", size, None)


# A line item: (line_number, text without its line ending, or None when `issue` says why not)
LineItem = tuple[int, Optional[str], Optional[Issue]]


def iter_lines(path, sniff: Sniff, max_line_bytes: Optional[int] = None) -> Iterator[LineItem]:
    """Yield (line_no, text, None) for each line, or (line_no, None, issue) for a line that is too
    long or cannot be decoded. LF, CRLF and lone CR all end a line. Never holds more than about
    one line (max_line_bytes, default MAX_LINE_BYTES) in memory."""
    if max_line_bytes is None:
        max_line_bytes = MAX_LINE_BYTES
    if sniff.encoding == "utf-8":
        yield from _iter_utf8(path, sniff, max_line_bytes)
    else:
        yield from _iter_wide(path, sniff, max_line_bytes)


def _split_cr(text: str):
    # a lone CR also ends a line (old Mac files); CRLF was removed already
    return text.split("\r") if "\r" in text else (text,)


def _iter_utf8(path, sniff: Sniff, max_line_bytes: int) -> Iterator[LineItem]:
    line_no = 0
    offset = sniff.bom_len
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(sniff.bom_len)
        readline = f.readline
        while True:
            raw = readline(max_line_bytes + 1)
            if not raw:
                return
            start = offset
            offset += len(raw)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                line_no += 1
                while True:  # skip the rest of the enormous line in bounded chunks
                    chunk = readline(1 << 20)
                    if not chunk:
                        break
                    offset += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                yield (line_no, None, Issue(line_no, None,
                                            f"line is too long ({offset - start:,} bytes; one example may be at most "
                                            f"{max_line_bytes // (1024 * 1024)} MB)", "error", "line_too_long"))
                continue
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line_no += 1
                bad = raw[e.start]
                hint = ""
                if bad >= 0x80:
                    hint = " (the file is not UTF-8; if it came from Excel or an old editor, save it as UTF-8)"
                yield (line_no, None, Issue(line_no, None,
                                            f"cannot be decoded as UTF-8: byte 0x{bad:02x} at byte offset {start + e.start} "
                                            f"(column {e.start + 1}){hint}", "error", "encoding"))
                continue
            if "\x00" in text:
                line_no += 1
                col = text.index("\x00")
                yield (line_no, None, Issue(line_no, None,
                                            f"binary data: a NUL byte at byte offset {start + len(text[:col].encode('utf-8'))}",
                                            "error", "binary"))
                continue
            for piece in _split_cr(text):
                line_no += 1
                yield (line_no, piece, None)


def _iter_wide(path, sniff: Sniff, max_line_bytes: int) -> Iterator[LineItem]:
    unit = 4 if sniff.encoding.startswith("utf-32") else 2
    max_chars = max(1, max_line_bytes // unit)
    line_no = 0
    raw = open(path, "rb", buffering=1 << 20)
    raw.seek(sniff.bom_len)
    f = io.TextIOWrapper(raw, encoding=sniff.encoding, errors="strict", newline="")
    try:
        while True:
            try:
                text = f.readline(max_chars + 1)
            except UnicodeDecodeError as e:
                line_no += 1
                yield (line_no, None, Issue(line_no, None, f"cannot be decoded as {sniff.label} ({e.reason}); "
                                            f"the rest of the file is not read", "error", "encoding"))
                return
            if not text:
                return
            if len(text) > max_chars and not text.endswith(("\n", "\r")):
                line_no += 1
                try:
                    while True:
                        chunk = f.readline(1 << 18)
                        if not chunk or chunk.endswith(("\n", "\r")):
                            break
                except UnicodeDecodeError:
                    pass
                yield (line_no, None, Issue(line_no, None, f"line is too long (one example may be at most "
                                            f"{max_line_bytes // (1024 * 1024)} MB)", "error", "line_too_long"))
                continue
            if text.endswith("\n"):
                text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
            line_no += 1
            if "\x00" in text:
                yield (line_no, None, Issue(line_no, None, "binary data: a NUL character", "error", "binary"))
                continue
            yield (line_no, text, None)
    finally:
        f.close()


def json_objects(path) -> Iterator[tuple[str, dict]]:
    """(line text, object) for every line of a JSONL file that holds a JSON object; blank lines,
    cut-off lines (a process killed mid-write) and anything else are skipped. For the app's own
    files (metrics, chat logs), which are never huge; training files go through iter_lines."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            s = line.strip()
            if not s:
                continue
            try:
                d = json.loads(s)
            except json.JSONDecodeError:
                continue
            if isinstance(d, dict):
                yield s, d
