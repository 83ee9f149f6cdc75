"""Events the training loop hands to its callbacks. Plain data, always copies: a receiver on
another thread may keep them without ever seeing a live training array."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    total_steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    learning_rate: float
    num_train_examples: int
    num_valid_examples: int
    trainable_params: int
    total_params: int
    resumed_from_step: int = 0


@dataclass(frozen=True)
class PhaseTimes:
    """The lecture's four phases of one step, in milliseconds."""
    forward_ms: float
    loss_ms: float
    backward_ms: float
    update_ms: float


@dataclass(frozen=True)
class StepMetrics:
    step: int                 # 1-based global step
    epoch: float              # fractional epoch, e.g. 1.25
    train_loss: float
    train_token_accuracy: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    total_steps: int
    phases: PhaseTimes


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    epoch: float
    valid_loss: float | None                 # None when the run has no validation data
    valid_token_accuracy: float | None
    general_loss: float | None = None        # loss on the base model's general dialogs (forgetting meter)
    quiz_score: int | None = None            # questions of the quiz file answered right (greedy)
    quiz_total: int | None = None


@dataclass(frozen=True)
class StepDetail:
    """What one step computed, phase by phase (sent for the steps that step mode runs).
    Arrays are copies."""
    step: int                                # the step these numbers belong to (1-based)
    learning_rate: float
    input_ids: np.ndarray                    # (B, T) the batch
    labels: np.ndarray                       # (B, T) -100 where a token does not count toward the loss
    attention_mask: np.ndarray               # (B, T) 0 for padding
    example_lines: tuple[int, ...]           # source line of each batch row in the training file
    activation_rms: tuple[float, ...]        # forward: RMS of the residual stream entering each layer, and after the last
    token_losses: np.ndarray                 # loss: (T,) per-token loss of row 0; NaN where not counted
    loss: float
    grad_norms: dict[str, float]             # backprop: L2 norm per tensor (LoRA: per adapted matrix, A and B together)
    update_ratios: dict[str, float]          # update: ||change|| / ||weight|| per tensor (LoRA: of W0 + s B A)


@dataclass(frozen=True)
class RunAlarm:
    """The run is overfitting or forgetting: said once, in plain words."""
    kind: str                                # "overfit" or "forgetting"
    message: str
    step: int
    best_step: int | None                    # the step of the best validation loss so far


@dataclass(frozen=True)
class WeightSnapshot:
    """What the weights view draws. Matrices are change-since-start (W - W0, or scale * B @ A
    with LoRA) downsampled for display; biases now and at the start."""
    step: int
    matrices: dict[str, np.ndarray]          # name -> (rows, cols) float32, downsampled delta
    current: dict[str, np.ndarray]           # name -> downsampled current values
    biases: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (now, at start)
    relative_update: dict[str, float]        # per layer ("layer 0".."layer N-1") ||dW|| / ||W||
    grad_norms: dict[str, float]             # per layer gradient L2 norm
    histogram: tuple[np.ndarray, np.ndarray] = field(default=(np.zeros(0), np.zeros(0)))  # (counts, edges) of the chosen matrix


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    epoch: float
    path: str


@dataclass(frozen=True)
class RunFinished:
    run_dir: str
    model_dir: str
    final_train_loss: float
    final_valid_loss: float | None
    steps: int
    elapsed_s: float


@dataclass(frozen=True)
class RunStopped:
    run_dir: str
    step: int
    checkpoint: str | None


@dataclass(frozen=True)
class Notice:
    """Something the person should know about how the run goes (in words, no flags)."""
    message: str


@dataclass(frozen=True)
class RunPaused:
    """Sent when the loop starts waiting in a pause (so receivers can show everything up to here)."""
    run_dir: str
    step: int


@dataclass(frozen=True)
class RunFailed:
    run_dir: str
    reason: str               # in plain words, with a suggested fix
    step: int
    checkpoint: str | None


@dataclass(frozen=True)
class PhaseEvent:
    """Sent when a phase of a step begins, so the UI can light it up (throttled by the receiver)."""
    step: int
    phase: str                # "forward" | "loss" | "backward" | "update"
