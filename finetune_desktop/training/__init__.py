"""Fine-tuning: the training loop as a plain function with callbacks, run folders, auto hyperparameters.

For the app and for scripts (all blocking; run them on a worker thread in a GUI):

    from finetune_desktop.training import TrainConfig, TrainControl, start_training, resume_training
    control = TrainControl()                      # .pause() .resume() .stop() from any thread
    result = start_training("data.jsonl", run_dir=None, config=TrainConfig(), base="base",
                            validation_path=None, on_event=callback, control=control)
    result = resume_training(run_dir, extra_epochs=0, on_event=callback, control=control)
    # result: TrainResult(status "finished" | "stopped" | "failed", run_dir, step, final losses, model_dir, ...)

    from finetune_desktop.training.runs import list_runs, load_run, load_run_metrics, runs_home, new_run_dir

Events (training/events.py) reach `callback(event)` on the training thread: RunStarted, PhaseEvent,
StepMetrics, EvalMetrics, WeightSnapshot, CheckpointSaved, RunFinished / RunStopped / RunFailed.
Setup problems raise session.TrainingSetupError or data.DataError before the run starts.

Modules: loop (the loop), session (files -> loop), runs (run folders, checkpoints), auto (auto
hyperparameters), memory (peak-memory estimate), snapshots (weight snapshots), control
(pause/stop), chat (chat with a model), loading (models by name), hf_cache (the local Hugging Face cache).
"""
from __future__ import annotations

_EXPORTS = {
    "TrainConfig": ".config",
    "TrainControl": ".control",
    "start_training": ".session",
    "resume_training": ".session",
    "TrainingSetupError": ".session",
    "TrainResult": ".loop",
    "LoopOptions": ".loop",
    "train": ".loop",
    "list_runs": ".runs",
    "load_run": ".runs",
    "load_run_metrics": ".runs",
}

__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy, so importing the package stays cheap
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)
