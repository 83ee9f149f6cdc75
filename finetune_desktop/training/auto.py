"""`auto` hyperparameters: OpenAI's published fine-tuning defaults, adapted to a small model on a CPU.

The rule (every constant is named below, so the rule can be read and changed in one place):

Epochs. OpenAI starts from 3 epochs and scales them so that examples x epochs lands in
[100, 25,000] example-passes (at most 25 epochs, at least 1). A few-million-parameter model needs
more passes than a GPT, so our lower target is larger, and it depends on what the file teaches:

  style (a persona: every reply different)     MIN_EXAMPLE_PASSES, at most MAX_EPOCHS epochs
  facts (an FAQ: answers given to several      FACT_EXAMPLE_PASSES, at most FACT_MAX_EPOCHS,
         questions, training.augment.answers_repeat)   and the run stops once it gives the
                                               trained answers back (below)

    epochs = 3
    if n * epochs < target:  epochs = min(max_epochs, ceil(target / n))
    if n * epochs > MAX_EXAMPLE_PASSES:  epochs = max(1, floor(MAX_EXAMPLE_PASSES / n))

  so a 140-example persona gets 3 epochs and a 60-example FAQ 20. Epochs above 3 are only added
  while the whole run stays within a token budget (SMALL_SET_TOKEN_BUDGET, FACT_TOKEN_BUDGET:
  about half a minute of training on a laptop CPU), so a small file with long examples gets 3.

  Measured with the embedded model (tools/content_eval.py, tools/persona_eval.py; 2 seeds):
    FAQ, 20 facts x 3 wordings, 60 examples (bike shop; swimming pool):
      old rule (7 epochs)        training answers 13-15 of 20, unseen rewordings 2-5 of 20
      20 epochs, no early stop   60/60 and 20/20, rewordings 0-2 / 4, bits per byte +0.50, 24 s
      this rule (20 epochs, the recall stop ended them at step 72-88 of 160)
                                 20/20 and 19-20/20, rewordings 1 / 1-4, +0.46 to +0.48, 15-20 s
    pirate persona, 140 examples:
      3 epochs (this rule)       100% of 42 unseen questions in style, bits per byte +0.19, 9 s
      9 epochs (the FAQ rule)    100% in style, +0.46, 24 s: more passes only cost general ability
  A fine-tune this small cannot carry an FAQ's facts to reworded questions: the base model's
  picture of a question keys on its words (see tools/paraphrase_probe.py), so the reworded
  score stays near what the base model guesses.

Batch size. OpenAI uses about 0.2% of the examples (clamped to [1, 256]). On a CPU a batch of one
wastes most of the matrix-multiply speed, while a big batch gives a small dataset too few updates.
We take 0.2% of the examples, clamped to [MIN_BATCH, MAX_BATCH], and lower it further when the
batch would hold more than MAX_BATCH_TOKENS tokens of the longest examples (memory and step time):

    batch = clamp(round(0.002 * n), MIN_BATCH, MAX_BATCH);  while batch > 1 and batch * longest > MAX_BATCH_TOKENS: batch //= 2

Learning rate. OpenAI multiplies the pre-training rate by 0.05-0.2, taking larger values for
larger batches. LoRA adapters start at zero and need a larger rate than full weights:

    lora: LORA_LR * sqrt(batch / REF_BATCH)        full: FULL_LR * sqrt(batch / REF_BATCH)

(the square-root rule keeps the update noise about constant when the batch changes). LORA_LR was
measured on the embedded base model (LoRA r16, batch 8, default settings otherwise; greedy
replies to 40 English / 15 Korean everyday questions that are not in the files):

    persona file               lr      persona shows    held-out everyday dialog, bits per byte
    pirate, 140 examples       4e-3    40/40            1.90 -> 2.06
    pirate, 140 examples       3e-3    40/40            1.90 -> 2.04
    pirate, first 100          4e-3    40/40            1.90 -> 2.20
    pirate, first 100          3e-3    40/40            1.90 -> 2.09
    Gyeongsang, 144 examples   3e-3    15/15 (base 0)
    (2e-3 on a mid-pretraining checkpoint: the Korean dialect in about half the replies)

so 3e-3 makes both personas show while everyday dialog loses about 0.2 bits per byte. Full
fine-tuning moves every weight, so it uses a tenth of the base model's pre-training rate (1e-3).

Evaluation interval (eval_every = 0): about EVALS_PER_RUN evaluations a run, plus one at each epoch end.
Warmup: warmup_ratio of all steps (at least one step when warmup_ratio > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig

MIN_EXAMPLE_PASSES = 400
MAX_EXAMPLE_PASSES = 25_000
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 25
SMALL_SET_TOKEN_BUDGET = 48_000
FACT_EXAMPLE_PASSES = 1200
FACT_MAX_EPOCHS = 30
FACT_TOKEN_BUDGET = 100_000

BATCH_FRACTION = 0.002
MIN_BATCH = 8
MAX_BATCH = 16
MAX_BATCH_TOKENS = 4096

REF_BATCH = 8
LORA_LR = 3e-3
FULL_LR = 1e-4

EVALS_PER_RUN = 10

# Stopping when the answers are learned (epochs auto): at each epoch end, once the epoch's
# training-token accuracy reaches TOKEN_ACCURACY_BEFORE_RECALL, up to RECALL_QUESTIONS training
# questions (the first wording of each distinct answer) are asked greedily, as chat answers them;
# the run stops when RECALL_TARGET of the trained answers come back word for word.
TOKEN_ACCURACY_BEFORE_RECALL = 0.97
RECALL_TARGET = 0.95
RECALL_QUESTIONS = 24


@dataclass(frozen=True)
class Hyperparameters:
    """The concrete values a run uses (auto resolved)."""
    epochs: int
    batch_size: int
    learning_rate: float
    eval_every: int            # steps between mid-epoch evaluations (0 = only at epoch ends)
    warmup_steps: int
    steps_per_epoch: int
    total_steps: int
    auto: tuple[str, ...] = ()  # which of epochs / batch_size / learning_rate were auto

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "eval_every": self.eval_every, "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "auto": list(self.auto)}

    @classmethod
    def from_dict(cls, d: dict) -> "Hyperparameters":
        return cls(epochs=int(d["epochs"]), batch_size=int(d["batch_size"]), learning_rate=float(d["learning_rate"]),
                   eval_every=int(d["eval_every"]), warmup_steps=int(d["warmup_steps"]),
                   steps_per_epoch=int(d["steps_per_epoch"]), total_steps=int(d["total_steps"]),
                   auto=tuple(d.get("auto", ())))


def auto_epochs(n_examples: int, tokens_per_epoch: int | None = None, facts: bool = False) -> int:
    """The epochs rule above; facts: the file is question/answer data whose answers repeat."""
    n = max(1, n_examples)
    target, most, budget = ((FACT_EXAMPLE_PASSES, FACT_MAX_EPOCHS, FACT_TOKEN_BUDGET) if facts
                            else (MIN_EXAMPLE_PASSES, MAX_EPOCHS, SMALL_SET_TOKEN_BUDGET))
    epochs = DEFAULT_EPOCHS
    if n * epochs < target:
        epochs = min(most, math.ceil(target / n))
        if tokens_per_epoch:
            epochs = min(epochs, max(DEFAULT_EPOCHS, budget // max(1, tokens_per_epoch)))
    elif n * epochs > MAX_EXAMPLE_PASSES:
        epochs = max(1, MAX_EXAMPLE_PASSES // n)
    return epochs


def auto_batch_size(n_examples: int, longest_tokens: int) -> int:
    b = int(round(BATCH_FRACTION * n_examples))
    b = max(MIN_BATCH, min(MAX_BATCH, b))
    b = min(b, max(1, n_examples))
    while b > 1 and b * max(1, longest_tokens) > MAX_BATCH_TOKENS:
        b //= 2
    return b


def auto_learning_rate(method: str, batch_size: int) -> float:
    base = LORA_LR if method == "lora" else FULL_LR
    return float(base * math.sqrt(batch_size / REF_BATCH))


def steps_in_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def resolve(config: TrainConfig, n_train: int, longest_tokens: int, steps_per_epoch: int | None = None,
            train_tokens: int | None = None, facts: bool = False) -> Hyperparameters:
    """Turn the config's `auto` values into numbers for a training set of n_train examples whose
    longest encoded example has longest_tokens tokens and all of which hold train_tokens tokens
    (None: unknown, no time cap on the extra epochs). steps_per_epoch may come from the batcher."""
    auto = []
    if config.epochs == "auto":
        epochs = auto_epochs(n_train, train_tokens, facts)
        auto.append("epochs")
    else:
        epochs = int(config.epochs)
    if config.batch_size == "auto":
        bs = auto_batch_size(n_train, longest_tokens)
        auto.append("batch_size")
    else:
        bs = int(config.batch_size)
    if config.learning_rate == "auto":
        lr = auto_learning_rate(config.method, bs)
        auto.append("learning_rate")
    else:
        lr = float(config.learning_rate)
    spe = steps_per_epoch if steps_per_epoch is not None else steps_in_epoch(n_train, bs)
    total = spe * epochs
    eval_every = config.eval_every if config.eval_every > 0 else max(1, round(total / EVALS_PER_RUN))
    warm = int(round(config.warmup_ratio * total))
    if config.warmup_ratio > 0:
        warm = max(1, warm)
    return Hyperparameters(epochs=epochs, batch_size=bs, learning_rate=lr, eval_every=eval_every,
                           warmup_steps=min(warm, total), steps_per_epoch=spe, total_steps=total, auto=tuple(auto))
