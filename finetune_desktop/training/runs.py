"""Run folders: create, list and read them; write and read resumable checkpoints.

A run folder:
    run.json          settings, base model, data file + sha256, versions, status, timestamps, final metrics
    metrics.jsonl     one JSON object per line: train steps, and eval lines (with "valid_loss")
    checkpoints/      step-NNNNNN/ {trainable.safetensors, optimizer.safetensors, state.json}
    model/            the tuned model as an HF folder (LoRA merged) + tokenizer files
    adapter/          with LoRA: a PEFT adapter folder

Every write is atomic (temp file or folder, then rename); nothing here unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..engine.checkpoint import (RUN_MODEL_SUBDIR, atomic_write_json, make_temp_dir_beside, read_safetensors,
                                 replace_dir_atomically, write_safetensors)
from ..data.textio import json_objects
from ..engine.errors import UserError

RUN_FORMAT = 1
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


class RunError(UserError):
    """A problem with a run folder, in words for the user."""


class RunLocked(RunError):
    """Another process is writing this run folder."""


# ----------------------------------------------------------------------------- one writer per run
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive OS file lock on a run folder, held while a process trains in it.

    The lock lives on `.lock` inside the folder (fcntl.flock on Unix, msvcrt on Windows). The
    operating system drops it when the process ends in any way, kill -9 included, so a lock can
    never be left behind by a crash; the file itself only records who holds it (pid, host,
    time) for the message another writer gets."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.run_dir} is being written by another process ({holder}); wait for it to "
                            "finish or stop it first")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc):
        self.release()


if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        d = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return f"process {d.get('pid', '?')} on {d.get('host', '?')}, since {d.get('since', '?')}"
    except (OSError, ValueError, AttributeError):
        return "a process that has not said who it is"


def lock_holder(run_dir) -> dict | None:
    """Who holds the run's lock right now ({"pid", "host", "since"}), or None when nobody does.
    A process that trains in this folder itself appears too (its pid is os.getpid())."""
    p = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(p, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            d = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        except (OSError, ValueError):
            d = {}
        return d if isinstance(d, dict) else {}
    finally:
        os.close(fd)


# what engine.checkpoint's atomic writes leave when interrupted: ".NAME.XXXX.tmp" files,
# ".NAME.tmp-XXXX" folders, and ".NAME.old-PID" folders from a swap cut in the middle
TEMP_PATTERNS = (".*.tmp", ".*.tmp-*", ".*.old-*")


def remove_leftovers(run_dir) -> list[str]:
    """Delete half-written temp files and folders that a killed process left behind (call it only
    while holding the run's lock). -> the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for where in (run_dir, run_dir / "checkpoints"):
        if not where.is_dir():
            continue
        for pat in TEMP_PATTERNS:
            for p in where.glob(pat):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        p.unlink()
                    except OSError:
                        continue
                removed.append(str(p.relative_to(run_dir)))
    return removed


# ----------------------------------------------------------------------------- where runs live
def app_home() -> Path:
    env = os.environ.get("FINETUNE_DESKTOP_HOME")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("finetune-desktop", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".finetune-desktop"


def runs_home() -> Path:
    return app_home() / "runs"


def new_run_dir(name_hint: str = "run", home: Path | None = None) -> Path:
    """A fresh, not yet existing folder under runs_home(): '2026-11-27_0712_pirate_captain'."""
    home = Path(home) if home is not None else runs_home()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name_hint).strip("._-")[:40] or "run"
    base = f"{datetime.now().strftime('%Y-%m-%d_%H%M%S')}_{stem}"
    p = home / base
    i = 2
    while p.exists():
        p = home / f"{base}_{i}"
        i += 1
    return p


# ----------------------------------------------------------------------------- the tuned model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def tokenizer_files(base_dir: Path | None, default_system: str | None = None) -> dict[str, bytes]:
    """The tokenizer files of the base model, to copy next to the tuned weights. With
    default_system, the chat template gains that system prompt as its default."""
    from ..engine.tokenizer import template_with_default_system

    extra = {}
    if base_dir is None:
        return extra
    for name in TOKENIZER_FILES:
        f = Path(base_dir) / name
        if f.is_file():
            extra[name] = f.read_bytes()
    if default_system:
        if "chat_template.jinja" in extra:
            t = extra["chat_template.jinja"].decode("utf-8")
            extra["chat_template.jinja"] = template_with_default_system(t, default_system).encode("utf-8")
        if "tokenizer_config.json" in extra:
            try:
                cfg = json.loads(extra["tokenizer_config.json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                cfg = None
            if isinstance(cfg, dict) and isinstance(cfg.get("chat_template"), str):
                cfg["chat_template"] = template_with_default_system(cfg["chat_template"], default_system)
                extra["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return extra


def save_run_model(model, run_dir: Path, base_dir: Path | None, default_system: str | None = None) -> str:
    """Write model/ (LoRA merged, tokenizer files copied) and, with LoRA, adapter/ atomically."""
    extra = tokenizer_files(base_dir, default_system)
    model.save_pretrained(Path(run_dir) / RUN_MODEL_SUBDIR, extra_files=extra)
    if model.lora is not None:
        model.save_adapter(Path(run_dir) / "adapter", base_model_name_or_path=str(base_dir) if base_dir else None)
    return str(Path(run_dir) / RUN_MODEL_SUBDIR)


# ----------------------------------------------------------------------------- small helpers
def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def versions() -> dict:
    import platform
    import sys

    from .. import __version__

    out = {"finetune_desktop": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "platform": sys.platform}
    for mod in ("tokenizers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


# ----------------------------------------------------------------------------- run.json
def read_run_json(run_dir) -> dict:
    p = Path(run_dir) / "run.json"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir}: not a run folder (run.json is missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{p}: cannot be read ({e})") from None
    if not isinstance(d, dict):
        raise RunError(f"{p}: expected a JSON object")
    return d


def write_run_json(run_dir, info: dict) -> None:
    info = dict(info)
    info["updated"] = now_iso()
    atomic_write_json(Path(run_dir) / "run.json", info)


def update_run_json(run_dir, **fields) -> dict:
    info = read_run_json(run_dir)
    info.update(fields)
    write_run_json(run_dir, info)
    return info


# ----------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class RunInfo:
    path: str
    name: str
    status: str                 # running / finished / stopped / failed (or "unknown")
    created: str
    updated: str
    method: str
    base_model: str
    data_path: str
    steps: int
    total_steps: int
    final_train_loss: float | None
    final_valid_loss: float | None
    has_model: bool
    reason: str | None = None   # why it failed (or why a "running" run is really stopped)


def pid_alive(pid) -> bool:
    """Is process `pid` still running (this process counts)? False for a missing or bad pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def interrupted_reason(run_dir, info: dict) -> str:
    """What a run whose process died can do next, in words (no command-line flags)."""
    cps = checkpoint_dirs(run_dir)
    total = int((info.get("hyper") or {}).get("total_steps", 0) or 0)
    if not cps:
        return "the training process ended before the first checkpoint; continuing starts it again from step 0"
    step = int(cps[-1].name.split("-")[-1])
    if total and step >= total:
        return "the training finished but its model was not saved; continuing saves it"
    return f"the training process ended at step {step} of {total}; it can continue from there"


def load_run(run_dir) -> RunInfo:
    """A run's summary. A run marked running whose lock nobody holds (its process died, even by
    kill -9) reads as "interrupted", with what continuing it will do; one whose lock another
    process holds reads as running there."""
    run_dir = Path(run_dir)
    d = read_run_json(run_dir)
    reason = (d.get("failure") or {}).get("reason")
    status = str(d.get("status", "unknown"))
    if status == "running":
        holder = lock_holder(run_dir)
        if holder is None and d.get("pid") != os.getpid():
            status, reason = "interrupted", interrupted_reason(run_dir, d)
        elif holder is not None and holder.get("pid") != os.getpid():
            reason = (f"training in another process (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                      f"since {holder.get('since', '?')})")
    final = d.get("final") or {}
    settings = d.get("settings") or {}
    hyper = d.get("hyper") or {}
    return RunInfo(path=str(run_dir), name=run_dir.name, status=status,
                   created=str(d.get("created", "")), updated=str(d.get("updated", "")),
                   method=str(settings.get("method", "")),
                   base_model=str((d.get("base_model") or {}).get("path", "")),
                   data_path=str((d.get("data") or {}).get("path", "")),
                   steps=int(d.get("step", final.get("steps", 0)) or 0),
                   total_steps=int(hyper.get("total_steps", 0) or 0),
                   final_train_loss=final.get("train_loss"), final_valid_loss=final.get("valid_loss"),
                   has_model=(run_dir / RUN_MODEL_SUBDIR / "config.json").exists(), reason=reason)


def list_runs(home=None) -> list[RunInfo]:
    """Every readable run under runs_home() (or `home`), newest first."""
    home = Path(home) if home is not None else runs_home()
    if not home.is_dir():
        return []
    out = []
    for p in home.iterdir():
        if p.name.startswith(".") or not (p / "run.json").is_file():
            continue
        try:
            out.append(load_run(p))
        except (RunError, ValueError, TypeError):
            continue
    out.sort(key=lambda r: (r.created, r.name), reverse=True)
    return out


@dataclass(frozen=True)
class RunMetrics:
    train: list[dict]   # one dict per step line
    eval: list[dict]    # one dict per evaluation line (valid_loss, general_loss, quiz_score: whichever the run had)


def load_run_metrics(run_dir) -> RunMetrics:
    """Read metrics.jsonl; a cut-off last line (a killed process) is skipped."""
    p = Path(run_dir) / "metrics.jsonl"
    train, ev = [], []
    if not p.exists():
        return RunMetrics(train, ev)
    for _, d in json_objects(p):
        if "train_loss" in d:
            train.append(d)
        elif "recall_score" not in d:  # evaluation lines: validation, general loss, quiz
            ev.append(d)
    return RunMetrics(train, ev)


def truncate_metrics(run_dir, last_step: int) -> None:
    """Keep only metric lines up to last_step (used when resuming from a checkpoint)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return
    keep = [line for line, d in json_objects(p) if int(d.get("step", 0)) <= last_step]
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(p, "".join(k + "\n" for k in keep))


class MetricsWriter:
    """Appends one JSON line per call and flushes it (cheap; the file stays open)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    c = Path(run_dir) / "checkpoints"
    if not c.is_dir():
        return []
    out = []
    for p in c.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(run_dir) -> Path | None:
    c = checkpoint_dirs(run_dir)
    return c[-1] if c else None


def save_checkpoint(run_dir, step: int, trainable: dict, opt_state: dict, state: dict, keep: int = 1,
                    extra_tensors: dict[str, dict] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically (safetensors + JSON; extra_tensors: more
    safetensors files by name, in the same swap), then drop all but the newest `keep`."""
    target = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    tmp = make_temp_dir_beside(target)
    try:
        write_safetensors(tmp / "trainable.safetensors", trainable)
        for name, tensors in (extra_tensors or {}).items():
            write_safetensors(tmp / name, tensors)
        opt = {f"m.{k}": v for k, v in opt_state["m"].items()}
        opt.update({f"v.{k}": v for k, v in opt_state["v"].items()})
        write_safetensors(tmp / "optimizer.safetensors", opt)
        st = dict(state)
        st["optimizer_step"] = int(opt_state["step"])
        st["format"] = RUN_FORMAT
        atomic_write_json(tmp / "state.json", st)
        replace_dir_atomically(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """-> (trainable tensors, optimizer state {"step", "m", "v"}, state dict)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: checkpoint state cannot be read ({e})") from None
    from ..engine.config import ModelFormatError

    try:
        trainable = read_safetensors(path / "trainable.safetensors")
        raw = read_safetensors(path / "optimizer.safetensors")
    except ModelFormatError as e:
        raise RunError(f"checkpoint is damaged: {e}") from None
    m = {k[2:]: v for k, v in raw.items() if k.startswith("m.")}
    v = {k[2:]: v for k, v in raw.items() if k.startswith("v.")}
    return trainable, {"step": int(state.get("optimizer_step", 0)), "m": m, "v": v}, state

