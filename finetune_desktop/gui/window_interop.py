"""The main window's ways in and out: File > Export… (a GGUF file with its type and an Ollama
Modelfile, a Hugging Face folder, or the PEFT adapter), Runs > Import… (the output of a TRL job
becomes a run in the history) and the models of the local Hugging Face cache in the base-model
selector. Every file operation runs on a worker (interop/ and training.hf_cache do the work).
A mixin of MainWindow."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QButtonGroup, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QLabel, QRadioButton,
                               QVBoxLayout)

from . import bridge
from .workers import start_job

GGUF_TYPES = (("q8_0", "q8_0: 8-bit, about a quarter of f32, nearly the same answers"),
              ("f16", "f16: half of f32"), ("f32", "f32: exact, largest"))


class ExportDialog(QDialog):
    """Which format (and GGUF type) to export a run's model in."""

    def __init__(self, title: str, has_adapter: bool, parent=None):
        super().__init__(parent)
        self.setObjectName("exportDialog")
        self.setWindowTitle(f"Export {title}")
        self.gguf = QRadioButton("GGUF file for llama.cpp, Ollama and LM Studio (with an Ollama Modelfile)")
        self.gguf_type = QComboBox()
        for key, text in GGUF_TYPES:
            self.gguf_type.addItem(text, key)
        self.hf = QRadioButton("Hugging Face folder (safetensors, LoRA merged into the weights)")
        self.peft = QRadioButton("PEFT adapter folder (only the LoRA matrices, used on top of the base model)")
        self.peft.setEnabled(has_adapter)
        if not has_adapter:
            self.peft.setToolTip("This run has no LoRA adapter (full fine-tuning, or it did not finish).")
        group = QButtonGroup(self)
        for b in (self.gguf, self.hf, self.peft):
            group.addButton(b)
        self.gguf.setChecked(True)
        self.gguf.toggled.connect(self.gguf_type.setEnabled)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Export the tuned model as:"))
        lay.addWidget(self.gguf)
        lay.addWidget(self.gguf_type)
        lay.addWidget(self.hf)
        lay.addWidget(self.peft)
        lay.addWidget(buttons)

    def choice(self) -> tuple[str, str]:
        kind = "gguf" if self.gguf.isChecked() else ("hf" if self.hf.isChecked() else "peft")
        return kind, self.gguf_type.currentData()


class InteropActions:
    # ------------------------------------------------------------------ export
    def export_dialog(self, run_dir: str | None = None) -> None:
        """File > Export…: choose the format, then where; written on a worker."""
        run_dir = run_dir or self._opened_run or self.run_dir or self.chat.current_run_dir()
        if not run_dir:
            self.show_error("Finish or open a run first: there is no tuned model to export yet.")
            return
        problem = self.runs.export_problem(run_dir, adapter=False)
        if problem:
            self.show_error(problem)
            return
        entry = self.runs.entry(run_dir)
        dlg = ExportDialog(self.runs.title(run_dir), bool(entry and entry.has_adapter), self)
        if dlg.exec() != QDialog.DialogCode.Accepted:
            return
        kind, gguf_type = dlg.choice()
        name = Path(run_dir).name
        if kind == "gguf":
            dest, _ = QFileDialog.getSaveFileName(self, "Save the GGUF file", f"{name}-{gguf_type}.gguf",
                                                  "GGUF model (*.gguf)")
        else:
            parent = QFileDialog.getExistingDirectory(self, "Export into which folder?")
            dest = str(Path(parent) / f"{name}-{'adapter' if kind == 'peft' else 'model'}") if parent else ""
        if dest:
            self.export_run(run_dir, kind, dest, gguf_type)

    def export_run(self, run_dir: str, kind: str, dest: str, gguf_type: str = "q8_0") -> None:
        """Export without dialogs (what the dialog ends in; scripts and tests call it)."""
        self.statusBar().showMessage(f"Exporting {self.runs.title(run_dir)}…")
        start_job(self.pool, bridge.export, str(run_dir), kind, str(dest), gguf_type,
                  on_result=lambda what: self._exported(what),
                  on_error=lambda m: self.show_error(f"Export failed: {m}"), name="export")

    def _exported(self, what: str) -> None:
        self.last_export = what
        self.statusBar().showMessage(f"Exported {what}", 15000)

    # ------------------------------------------------------------------ import
    def import_dialog(self) -> None:
        """Runs > Import…: a finished TRL job folder (made by `finetune-desktop job`)."""
        folder = QFileDialog.getExistingDirectory(self, "Import a finished TRL job (the folder with job.json)")
        if folder:
            self.import_run(folder)

    def import_run(self, job_dir: str) -> None:
        self.statusBar().showMessage(f"Importing {job_dir}…")
        start_job(self.pool, bridge.import_job, str(job_dir), on_result=self._imported,
                  on_error=lambda m: self.show_error(f"Import failed: {m}"), name="import")

    def _imported(self, run_dir: str) -> None:
        self.last_import = run_dir
        self._select_after_listing = run_dir
        self.left_tabs.setCurrentIndex(1)
        self.refresh_runs()
        self.statusBar().showMessage(f"Imported as {Path(run_dir).name}", 15000)

    # ------------------------------------------------------------------ the Hugging Face cache
    def list_cached_models(self) -> None:
        """Read the local Hugging Face cache on a worker; the base-model selector lists its models."""
        start_job(self.pool, bridge.cached_models, on_result=self._on_cached_models, name="hf-cache")

    def _on_cached_models(self, models) -> None:
        self.cached_models = list(models)
        self._fill_base_box()

    def cached_choices(self) -> list[tuple[str, str, str, bool]]:
        """(label, folder, tooltip, usable) for the base-model selector."""
        out = []
        for m in getattr(self, "cached_models", []):
            size = bridge.human_bytes(m.size_on_disk)
            params = f", {bridge.human_count(m.num_parameters)} parameters" if m.num_parameters else ""
            if m.loadable:
                out.append((f"HF cache: {m.repo_id} ({size})", m.snapshot_path,
                            f"{m.snapshot_path}\n{m.model_type or ''}{params}", True))
            else:
                out.append((f"HF cache: {m.repo_id} — cannot be used", m.snapshot_path,
                            f"{m.repo_id}: {m.reason}", False))
        return out
