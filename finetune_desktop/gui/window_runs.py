"""The main window's run-history side: the list of runs (read on a worker by RunsController),
opening one (its charts, its model in the chat), rename, delete, overlay, continue, export of
the folders. A mixin of MainWindow: every method works on the window's widgets and controllers."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QInputDialog, QMessageBox

from .history import can_continue, is_busy, status_of
from .runs_controller import chat_models
from .workers import plain_error


class RunsActions:
    def refresh_runs(self) -> None:
        """List the runs again (on a worker); the history, base box and chat models follow."""
        self.runs.refresh()

    def _on_runs_listed(self, entries) -> None:
        self.history.set_runs(entries)
        self._fill_base_box()
        self.refresh_models()
        if self._select_after_listing:
            self.history.select_run(self._select_after_listing)
            self._select_after_listing = None

    def _on_runs_failed(self, message: str) -> None:
        self.show_error(message)

    def refresh_models(self) -> None:
        base = self.base_model_path if self.base_ok() else None
        label = "Base model (built-in)" if base and Path(base) == Path(self.embedded_base) \
            else f"Base model: {Path(base or '').name}"
        self.chat.set_models(chat_models(base, label, self.runs.entries))
        self._refresh_token_models()

    def open_run(self, run_dir: str) -> None:
        """Show a saved run's charts and switch the chat to it (its metrics are read on a worker)."""
        if self.is_training():
            self.show_error("A run is in progress: its charts are shown. Open other runs after it ends.")
            return
        self.runs.open(run_dir)

    def _on_run_opened(self, run_dir: str, rows: list) -> None:
        if self.is_training():
            return
        self._opened_run = run_dir
        self.monitor.show_saved_run(rows)
        self._show_saved_changes(run_dir)
        if not self.chat.select_model(str(Path(run_dir) / "model")):
            entry = self.runs.entry(run_dir)
            if entry is not None and entry.checkpoints:
                self.chat.select_model(f"checkpoint::{run_dir}::{entry.checkpoints[-1]}")
        self.statusBar().showMessage(f"Opened {self.runs.title(run_dir)}", 6000)

    def rename_run(self, run_dir: str) -> None:
        entry = self.runs.entry(run_dir)
        if entry is not None and is_busy(entry):
            self.show_error("This run is training: rename it after it ends.")
            return
        new, ok = QInputDialog.getText(self, "Rename run", "New name:", text=self.runs.title(run_dir))
        if ok and new.strip():
            self.runs.rename(run_dir, new.strip())

    def delete_run(self, run_dir: str, confirm: bool = True) -> None:
        if self.is_training() and self.run_dir and Path(run_dir) == Path(self.run_dir):
            self.show_error("This run is still training. Stop it before deleting it.")
            return
        entry = self.runs.entry(run_dir)
        if entry is not None and is_busy(entry):
            self.show_error(f"This run is {entry.info.reason or 'training'}: it cannot be deleted while it trains.")
            return
        title = self.runs.title(run_dir)
        if confirm and self.confirm_close:
            ans = QMessageBox.question(self, "Delete run", f"Delete {title} with its model and charts? "
                                                           "This cannot be undone.")
            if ans != QMessageBox.StandardButton.Yes:
                return
        self.loss_panel.remove_overlay(title)
        self.runs.delete(run_dir)

    def _overlay_changed(self, run_dir: str, on: bool) -> None:
        if on:
            self.runs.load_overlay(run_dir)
        else:
            self.loss_panel.remove_overlay(self.runs.title(run_dir))

    def _on_overlay_ready(self, run_dir: str, title: str, rows: list) -> None:
        if self.history.is_overlaid(run_dir):
            self.loss_panel.add_overlay(title, rows)

    def export_model(self, run_dir: str | None, adapter: bool = False, dest: str | None = None) -> None:
        run_dir = run_dir or self._opened_run or self.run_dir or self.chat.current_run_dir()
        if not run_dir:
            self.show_error("Finish or open a run first: there is no tuned model to export yet.")
            return
        problem = self.runs.export_problem(run_dir, adapter)
        if problem:
            self.show_error(problem)
            return
        if dest is None:
            parent = QFileDialog.getExistingDirectory(self, "Export to which folder?")
            if not parent:
                return
            dest = str(Path(parent) / f"{Path(run_dir).name}-{'adapter' if adapter else 'model'}")
        self.runs.export(run_dir, adapter, dest)

    def continue_run(self, run_dir: str, extra_epochs: int | None = None) -> None:
        """Resume a stopped run, or add epochs to a finished one, from its newest checkpoint."""
        if self.is_training():
            self.show_error("A run is in progress: wait for it to end (or stop it) first.")
            return
        entry = self.runs.entry(run_dir)
        if entry is not None and not can_continue(entry):
            self.show_error("This run is training in another process: it can be continued once that process "
                            "has ended." if status_of(entry.info) == "elsewhere" else
                            "This run has no checkpoint to continue from.")
            return
        if extra_epochs is None and entry is not None and status_of(entry.info) == "interrupted":
            extra_epochs = 0           # one obvious action: finish it the way training.session says
        if extra_epochs is None:
            finished = entry is not None and entry.info.status == "finished"
            n, ok = QInputDialog.getInt(self, "Continue training",
                                        "Epochs to add:" if finished else
                                        "Epochs to add after finishing the planned ones (0 = just finish):",
                                        1 if finished else 0, 0, 1000)
            if not ok:
                return
            extra_epochs = n
        self.clear_error()
        try:
            self.training.continue_run(str(run_dir), int(extra_epochs))
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Cannot continue: {plain_error(e)}")
            return
        self.left_tabs.setCurrentIndex(0)

