"""The main window's teaching views: step mode, the per-token loss view, "Did it learn?", the
overview of which matrices moved, the overfit / forgetting alarm and the run's notices. A mixin
of MainWindow: it builds the views into the centre tabs and wires them to the controllers."""
from __future__ import annotations

from pathlib import Path

from . import bridge
from .quiz_view import QuizView
from .step_view import StepView
from .token_view import LIVE, TokenLossView
from .workers import start_job

LIVE_LABEL = "Current weights (paused run)"


class TeachingActions:
    def _build_teaching(self) -> None:
        self.step_view = StepView(self.pool)
        self.token_view = TokenLossView(self.pool, self.cache)
        self.quiz_view = QuizView(self.pool, self.cache)
        self.overview = self.monitor.overview
        m = self.monitor
        self.step_tab = m.add_view(self.step_view, "One step")
        self.token_tab = m.add_view(self.token_view, "Token loss")
        self.quiz_tab = m.add_view(self.quiz_view, "Did it learn?")
        self.step_button = self.data_panel.step_button
        self.token_view.live_reader = self.training
        self.token_view.base_of = self._base_of_spec
        self._valid_report = None

    def _wire_teaching(self) -> None:
        t = self.training
        self.step_button.clicked.connect(self.step)
        t.stepDetail.connect(self._on_step_detail)
        t.alarmRaised.connect(self._on_alarm)
        t.noticeSent.connect(self._on_notice)
        t.changesReady.connect(self.overview.set_changes)
        self.overview.wantedChanged.connect(self._overview_wanted)
        self.overview.matrixChosen.connect(self._show_matrix)
        self.banners.keepBestRequested.connect(self.training.stop_keeping_best)
        self.banners.stopRequested.connect(self.stop_training)
        self.data_panel.exampleActivated.connect(self.open_example)
        self.step_view.openTokens.connect(lambda line: self.open_example(line, prefer_live=True))
        self.step_view.phaseShown.connect(self._step_phase_shown)
        self.data.validationChecked.connect(self._keep_valid_report)

    # ------------------------------------------------------------------ step mode
    def step(self) -> None:
        """Step: exactly one training step from idle (a new run that pauses after its first step)
        or from a pause; the centre then shows what it computed."""
        if self.is_training():
            if self.training.step_once():
                self.step_button.setEnabled(False)
                self.pause_button.setEnabled(False)
                self.statusBar().showMessage("Running one step…", 4000)
            return
        self.start_training(one_step=True)

    def _on_step_detail(self, d) -> None:
        live = self.training.live
        tok = live.tokenizer if live is not None and live.tokenizer is not None else None
        if tok is None and self.base_ok():
            try:
                tok = self.data.tokenizer(self.base_model_path)    # cached since the file was checked
            except Exception:  # noqa: BLE001 - the numbers still show; tokens need the tokenizer
                tok = None
        self.step_view.show_detail(d, tok)
        self.monitor.tabs.setCurrentWidget(self.step_view)

    def _step_phase_shown(self, key: str) -> None:
        """While the run waits after a step, the phase strip lights the phase the step view shows."""
        if self.is_training() and self.training.waiting:
            self.phase_strip.set_active(None if key == "batch" else key)

    def _update_step_enabled(self) -> None:
        idle_ok = self.run_button.isEnabled()
        paused = self.is_training() and self.training.waiting
        self.step_button.setEnabled(bool(idle_ok or paused))

    # ------------------------------------------------------------------ alarms and notices
    def _on_alarm(self, alarm) -> None:
        self.banners.show_alarm(alarm, running=self.is_training())
        self.statusBar().showMessage(alarm.message.split(". ")[0] + ".", 15000)

    def _on_notice(self, message: str) -> None:
        text = message[:1].upper() + message[1:]
        self.statusBar().showMessage(text if text.endswith(".") else text + ".", 20000)
        self.last_notice = message

    # ------------------------------------------------------------------ weights
    def _overview_wanted(self, on: bool) -> None:
        """The overview is shown (or hidden): the training thread measures only while it is; a run
        that waits in a pause (or has ended) is measured now, as a reader."""
        self.training.set_want_changes(on)
        live = self.training.live
        if not on or live is None or not self.training.current_weights_readable():
            return
        if self.training.begin_read() is None:
            return
        start_job(self.pool, live.measure_now, on_result=lambda ch: ch is not None and self.overview.set_changes(ch),
                  on_done=self.training.end_read, name="measure-changes")

    def _show_matrix(self, layer: str, proj: str) -> None:
        self.weights_view.select(layer, proj)
        self.monitor.tabs.setCurrentWidget(self.weights_view)

    def _show_saved_changes(self, run_dir: str) -> None:
        """A saved run's overview: its model/ against its base model (read on a worker)."""
        from .live_model import changes_between_folders
        entry = self.runs.entry(run_dir)
        base = entry.info.base_model if entry is not None else ""
        if entry is None or not entry.info.has_model or not base or not Path(base).exists():
            return
        start_job(self.pool, changes_between_folders, str(Path(run_dir) / "model"), base,
                  on_result=self.overview.set_changes, name="saved-changes")

    # ------------------------------------------------------------------ the per-token loss view
    def _keep_valid_report(self, path: str, rep) -> None:
        self._valid_report = rep if rep.ok else None
        self._refresh_examples()

    def _refresh_examples(self) -> None:
        rep = self.data.report
        if rep is None or not rep.ok:
            return
        dp = self.data_panel
        valid = self._valid_report if dp.validation_path() else None
        kw = dp.train_config_kwargs()
        start_job(self.pool, bridge.example_refs, rep, valid, kw["val_split"], kw["seed"],
                  on_result=self.token_view.set_examples, name="examples")

    def _refresh_token_models(self) -> None:
        from .runs_controller import ModelEntry
        box = self.chat.model_selector
        entries = [ModelEntry(box.itemText(i), box.itemData(i)) for i in range(box.count()) if box.itemData(i)]
        live = self.training.live
        self.token_view.set_models(entries, LIVE_LABEL if live is not None and live.model is not None else None)

    def _base_of_spec(self, spec: str) -> str | None:
        """The base model a chosen model was tuned from (the window's base model otherwise)."""
        if spec == LIVE:
            live = self.training.live
            return live.base_dir if live is not None else None
        run_dir = spec.split("::")[1] if spec.startswith("checkpoint::") else \
            (str(Path(spec).parent) if Path(spec).name == "model" else None)
        entry = self.runs.entry(run_dir) if run_dir else None
        if entry is not None and entry.info.base_model:
            return entry.info.base_model
        return self.base_model_path if self.base_ok() else None

    def open_example(self, line: int, prefer_live: bool = False) -> None:
        """Show one example (by its line in the training file) in the per-token loss view."""
        self._refresh_token_models()
        tv = self.token_view
        if prefer_live and self.training.current_weights_readable():
            tv.select_model(LIVE, compute=False)
        elif tv.model_box.currentData() == LIVE and not self.training.current_weights_readable():
            tv.select_model(self.base_model_path or "", compute=False)
        self.monitor.tabs.setCurrentWidget(tv)
        if not tv.select_example(int(line)):
            self.statusBar().showMessage(f"Line {line} is not an example the model trains on.", 6000)

    # ------------------------------------------------------------------ did it learn?
    def _ask_quiz(self, run_dir: str, model_dir: str) -> None:
        """After a finished run: its own training file and base model (run.json, read when the loop
        ended), else the window's."""
        details = self.training.details or {}
        data = (details.get("data") or {}).get("path") or self.data.path
        base = (details.get("base_model") or {}).get("path") or self._base_of_spec(model_dir)
        if data and Path(data).is_file():
            self.quiz_view.ask(data, model_dir, base)
