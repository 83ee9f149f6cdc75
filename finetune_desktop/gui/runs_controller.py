"""Previous runs: the list (with titles, checkpoints and run.json details read on a worker),
the models and checkpoints to chat with, and open / overlay / rename / delete / export.

Every file operation runs on a worker thread; results come back as signals on the GUI thread.
A refresh while a scan is running is remembered and runs once the scan ends."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from . import bridge
from .workers import start_job


@dataclass(frozen=True)
class RunEntry:
    """One run as the window shows it (everything read once, on the scanning worker)."""
    info: object                       # training.runs.RunInfo
    title: str
    details: dict = field(default_factory=dict, repr=False)   # run.json
    checkpoints: tuple[str, ...] = ()  # oldest first
    has_adapter: bool = False

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def system_prompt(self) -> str:
        return str(self.details.get("system_prompt") or "")


@dataclass(frozen=True)
class ModelEntry:
    """One choice in the chat's model selector."""
    label: str
    spec: str                          # a model folder or "checkpoint::<run>::<checkpoint>"
    run_dir: str = ""
    system_prompt: str = ""            # the run's training system prompt (the persona it learned)


def scan_runs() -> list[RunEntry]:
    """Every run under the runs folder, newest first (worker thread)."""
    out = []
    for info in bridge.list_runs():
        try:
            details = bridge.read_run_info(info.path)
        except Exception:  # noqa: BLE001 - listed already; details are optional
            details = {}
        try:
            ckpts = tuple(str(c) for c in bridge.checkpoints(info.path))
        except OSError:
            ckpts = ()
        out.append(RunEntry(info, bridge.run_title(info.path, details), details, ckpts,
                            (Path(info.path) / "adapter" / "adapter_config.json").is_file()))
    return out


def chat_models(base_path: str | None, base_label: str, entries: list[RunEntry]) -> list[ModelEntry]:
    """The base model, then per run its tuned model and its checkpoints."""
    out = [ModelEntry(base_label, base_path)] if base_path else []
    for r in entries:
        if r.info.has_model:
            out.append(ModelEntry(f"{r.title} (tuned)", str(Path(r.path) / "model"), r.path, r.system_prompt))
        for c in r.checkpoints:
            out.append(ModelEntry(f"{r.title} · checkpoint step {bridge.checkpoint_step(c)}",
                                  f"checkpoint::{r.path}::{c}", r.path, r.system_prompt))
    return out


class RunsController(QObject):
    listed = Signal(object)                    # list[RunEntry], after every refresh
    failed = Signal(str)                       # a message for the window
    opened = Signal(str, object)               # run_dir, metric rows
    overlayReady = Signal(str, str, object)    # run_dir, title, metric rows
    exported = Signal(str)                     # destination folder
    deleted = Signal(str)                      # run_dir

    def __init__(self, pool, cache, parent=None):
        super().__init__(parent)
        self.pool, self.cache = pool, cache
        self.entries: list[RunEntry] = []
        self.loaded = False                    # a scan has finished at least once
        self._scanning = False
        self._again = False

    # ------------------------------------------------------------------ listing
    def refresh(self) -> None:
        if self._scanning:
            self._again = True
            return
        self._scanning = True
        start_job(self.pool, scan_runs, on_result=self._listed, on_done=self._scan_done,
                  on_error=lambda m: self.failed.emit(f"Cannot list previous runs: {m}"), name="list-runs")

    def _listed(self, entries) -> None:
        self.entries = list(entries)
        self.loaded = True
        self.listed.emit(self.entries)

    def _scan_done(self) -> None:
        self._scanning = False
        if self._again:
            self._again = False
            self.refresh()

    def busy(self) -> bool:
        return self._scanning

    def entry(self, run_dir) -> RunEntry | None:
        p = Path(run_dir)
        return next((e for e in self.entries if Path(e.path) == p), None)

    def title(self, run_dir) -> str:
        e = self.entry(run_dir)
        return e.title if e is not None else bridge.short_run_name(Path(run_dir).name)

    def runs_with_model(self) -> list[RunEntry]:
        return [e for e in self.entries if e.info.has_model]

    # ------------------------------------------------------------------ one run
    def open(self, run_dir: str) -> None:
        """Read a run's metrics: opened(run_dir, rows)."""
        start_job(self.pool, bridge.load_metric_rows, run_dir,
                  on_result=lambda rows: self.opened.emit(run_dir, rows),
                  on_error=lambda m: self.failed.emit(f"Cannot open {run_dir}: {m}"), name="open-run")

    def load_overlay(self, run_dir: str) -> None:
        title = self.title(run_dir)
        start_job(self.pool, bridge.load_metric_rows, run_dir,
                  on_result=lambda rows: self.overlayReady.emit(run_dir, title, rows),
                  on_error=lambda m: self.failed.emit(f"Cannot read {title}: {m}"), name="overlay")

    def rename(self, run_dir: str, title: str) -> None:
        start_job(self.pool, bridge.set_run_title, run_dir, title,
                  on_error=lambda m: self.failed.emit(f"Cannot rename: {m}"), on_done=self.refresh, name="rename")

    def delete(self, run_dir: str) -> None:
        start_job(self.pool, bridge.delete_run, run_dir, on_result=self._deleted,
                  on_error=lambda m: self.failed.emit(f"Cannot delete: {m}"), on_done=self.refresh, name="delete")

    def _deleted(self, run_dir: str) -> None:
        self.cache.drop(run_dir)
        self.deleted.emit(run_dir)

    def export_problem(self, run_dir: str, adapter: bool) -> str | None:
        """Why this run has nothing to export (from the last listing), or None."""
        e = self.entry(run_dir)
        if e is None:
            return None          # not listed yet: the copy says so if the folder is missing
        if adapter and not e.has_adapter:
            return "This run has no LoRA adapter (it used full fine-tuning, or did not finish)."
        if not adapter and not e.info.has_model:
            return "This run has no finished model to export (it did not finish)."
        return None

    def export(self, run_dir: str, adapter: bool, dest: str) -> None:
        src = str(Path(run_dir) / ("adapter" if adapter else "model"))
        start_job(self.pool, bridge.copy_folder, src, dest, on_result=self.exported.emit,
                  on_error=lambda m: self.failed.emit(f"Export failed: {m}"), name="export")
