"""Saved conversations: one JSON object per line (chats.jsonl in a run folder, or
chats/base.jsonl under the app home). Each reply appends one line, so saving costs the same at
the first reply and the thousandth. If the app dies in the middle of a write, the last line may
be cut off: the next append starts on a new line and readers skip the broken line, so the rest
of the file stays readable. No Qt here; the chat panel calls `append_record` on a worker."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _ends_with_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def append_record(path, record: dict) -> str:
    """Append `record` as one line (O_APPEND, one write, fsync). Returns the path."""
    path = Path(path)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with _lock_for(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _ends_with_newline(path):
            data = b"\n" + data          # the previous write was torn: never glue onto it
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    return str(path)


def read_records(path) -> list[dict]:
    """Every complete record; blank and broken lines (a torn last write) are skipped."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out
