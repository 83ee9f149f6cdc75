"""The weights of the run training in this window, and how far each matrix has moved. No Qt here.

LiveModel holds the Model object the training loop updates. For a new run the app loads the base
model and the data itself and hands them to start_training (its `prepared` argument), so the
object is known here. The views read it only while the loop waits in a pause or after the loop
has ended; TrainingController makes a resume wait until every reader is done, so nothing ever
reads weights the training thread is writing.

ChangeMeter runs on the training thread inside the loop's event callback (between steps, where
the weights are still), at most every MEASURE_INTERVAL_S and only while a view wants it:
||W - W0|| / ||W0|| for every projection matrix of every layer. With LoRA, W - W0 = s·B·A and
||B A||² = tr((BᵀB)(AAᵀ)) comes from (r, r) products, never a full-size matrix; with full
fine-tuning the matrices are compared with a copy taken before the first step (only for models
whose matrices fit in FULL_COPY_LIMIT floats; bigger models say so instead of guessing).

`changes_between_folders` measures the same for a saved run: its model/ against its base model."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEASURE_INTERVAL_S = 0.5            # at most two measurements a second (the view draws at 1-2 Hz)
FULL_COPY_LIMIT = 40_000_000        # floats of W0 kept for full fine-tuning (160 MB)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MATRIX_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")


@dataclass(frozen=True)
class TensorChanges:
    """Not a loop event: ||W - W0|| / ||W0|| per matrix, measured on the training thread."""
    step: int
    changes: dict            # matrix name -> relative change since the start
    note: str = ""           # why nothing was measured (empty when `changes` is filled)


def matrix_names(params: dict) -> list[str]:
    """The projection matrices of every layer, in layer order."""
    out = []
    for name in params:
        m = _MATRIX_RE.match(name)
        if m and m.group(3) in PROJECTIONS:
            out.append((int(m.group(1)), PROJECTIONS.index(m.group(3)), name))
    return [n for *_, n in sorted(out)]


def _norm(a) -> float:
    a = np.asarray(a, dtype=np.float32).ravel()
    return float(np.sqrt(np.dot(a, a)))


def lora_change_norm(A: np.ndarray, B: np.ndarray, scale: float) -> float:
    """||scale · B @ A||_F from (r, r) products."""
    A64, B64 = np.asarray(A, np.float64), np.asarray(B, np.float64)
    sq = float(np.trace((B64.T @ B64) @ (A64 @ A64.T)))
    return abs(scale) * float(np.sqrt(max(sq, 0.0)))


class ChangeMeter:
    """Measures relative change per matrix of one model (call from the thread that trains it)."""

    def __init__(self, model):
        from ..engine.lora import lora_names
        self.model = model
        self.names = matrix_names(model.params)
        self.w0_norm = {n: _norm(model.params[n]) for n in self.names}
        self.lora = model.lora is not None
        self._lora_names = lora_names
        self.w0: dict[str, np.ndarray] | None = None
        self.note = ""
        if not self.lora:
            size = sum(model.params[n].size for n in self.names)
            if size <= FULL_COPY_LIMIT:
                self.w0 = {n: model.params[n].copy() for n in self.names}
            else:
                self.note = (f"Not measured: with full fine-tuning it needs a second copy of "
                             f"{size / 1e6:.0f} million weights.")

    def measure(self) -> dict[str, float]:
        out = {}
        for n in self.names:
            w0 = self.w0_norm[n] or 1e-30
            if self.lora:
                an, bn = self._lora_names(n)
                if an not in self.model.lora:
                    continue
                out[n] = lora_change_norm(self.model.lora[an], self.model.lora[bn], self.model.lora_config.scale) / w0
            elif self.w0 is not None:
                d = np.subtract(self.model.params[n], self.w0[n], dtype=np.float32)
                out[n] = _norm(d) / w0
        return out


class LiveModel:
    """The model a run in this window trains (set on the training thread before the loop starts)."""

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.base_dir: str | None = None
        self.method: str | None = None
        self.want_changes = False          # a view shows the changes (set by the GUI thread)
        self._meter: ChangeMeter | None = None
        self._last = -1e9
        self._step = 0

    def attach(self, model, tokenizer, base_dir, method: str) -> None:
        self.model, self.tokenizer, self.base_dir, self.method = model, tokenizer, str(base_dir), method
        self._meter = None

    def release(self) -> None:
        self.model = self.tokenizer = None
        self._meter = None

    def wrap(self, on_event):
        """The loop's callback with the change measurement added (training thread)."""
        from ..training import events as ev

        def emit(e):
            if isinstance(e, ev.RunStarted) and self.model is not None:
                self._meter = ChangeMeter(self.model)     # before the first update: W0
            elif isinstance(e, ev.StepMetrics):
                self._step = e.step
            on_event(e)
            if isinstance(e, (ev.WeightSnapshot, ev.RunPaused)):
                self._maybe_measure(on_event, force=isinstance(e, ev.RunPaused))
            elif isinstance(e, ev.CheckpointSaved):
                self._maybe_measure(on_event)
        return emit

    def measure_now(self):
        """TensorChanges of the weights as they are (a reader: the loop waits or has ended)."""
        meter = self._meter
        if meter is None:
            return None
        return TensorChanges(self._step, meter.measure() if not meter.note else {}, meter.note)

    def final_measure(self, on_event) -> None:
        """After the loop (the model is what the run saved)."""
        self._maybe_measure(on_event, force=True)

    def _maybe_measure(self, on_event, force: bool = False) -> None:
        meter = self._meter
        if meter is None or not self.want_changes:
            return
        now = time.monotonic()
        if not force and now - self._last < MEASURE_INTERVAL_S:
            return
        self._last = now
        changes = meter.measure() if not meter.note else {}
        on_event(TensorChanges(self._step, changes, meter.note))


def changes_between_folders(model_dir, base_dir) -> TensorChanges:
    """||W - W0|| / ||W0|| per matrix between a saved model folder and its base model (a worker)."""
    from ..engine.checkpoint import load_weights
    tuned, base = load_weights(model_dir), load_weights(base_dir)
    out = {}
    for n in matrix_names(base):
        if n in tuned and tuned[n].shape == base[n].shape:
            out[n] = _norm(np.subtract(tuned[n], base[n], dtype=np.float32)) / (_norm(base[n]) or 1e-30)
    step = 0
    try:
        import json
        step = int(json.loads((Path(model_dir).parent / "run.json").read_text(encoding="utf-8")).get("step") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return TensorChanges(step, out, "" if out else "No matrices in common with the base model.")
