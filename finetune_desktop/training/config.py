"""TrainConfig: every setting of a fine-tuning run, frozen and passed whole."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from ..engine.lora import DEFAULT_TARGETS

Auto = str  # the literal "auto"


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"                     # "lora" (adapters on frozen weights) or "full"
    lora_rank: int = 16                      # LoRA rank r
    lora_alpha: float = 32.0                 # LoRA scale = alpha / r
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: Union[int, Auto] = "auto"        # passes over the training data
    batch_size: Union[int, Auto] = "auto"    # examples per step
    learning_rate: Union[float, Auto] = "auto"
    schedule: str = "linear"                 # "constant", "linear" or "cosine" decay after warmup
    warmup_ratio: float = 0.05               # fraction of all steps spent warming up
    weight_decay: float = 0.0                # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0                   # global-norm clipping; 0 = off
    max_seq_len: int = 512                   # longer examples are truncated
    val_split: float = 0.0                   # fraction held out for validation when no file is given
    eval_every: int = 0                      # evaluate every N steps (0 = auto: ~10 times a run) and at each epoch end
    early_stopping_patience: int = 0         # stop after N evaluations without improvement (0 = off)
    restore_best: bool = False               # with early stopping: keep the best weights, not the last
    seed: int = 0
    snapshot_interval_s: float = 0.25        # at most ~4 weight snapshots per second to the UI
    checkpoint_every_epoch: bool = True
    general_file: str | None = "auto"        # general dialogs whose loss shows forgetting at each evaluation;
                                             # "auto" = the base model's general_eval.jsonl if it ships one
    quiz_file: str | None = None             # a quiz (or training) file scored at each evaluation
    question_dropout: Union[float, Auto] = "auto"  # chance that a context token is replaced at a step
                                             # (training/augment.py); auto: 0 (measured: no reliable gain)
    activation_checkpointing: Union[bool, Auto] = "auto"  # keep only each layer's input and recompute the
                                             # rest in the backward; auto: only when the run would not fit otherwise
    reword_questions: Union[int, Auto] = "auto"  # new wordings of each training question written by the base
                                             # model (training/augment.py); needs a model that can paraphrase,
                                             # so auto is 0

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "lora_targets" in kw:
            kw["lora_targets"] = tuple(kw["lora_targets"])
        return cls(**kw)
