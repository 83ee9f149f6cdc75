"""Shared helpers for the training tests (no tests here): a tiny model folder, a small persona
data set, and a one-call way to run the loop on them."""
from __future__ import annotations

import json
from pathlib import Path

from tinymodel import make_tiny_model_folder

from finetune_desktop.data.types import Conversation, Message

SYSTEM = "You are a pirate."
PAIRS = [
    ("Hello!", "Arr, ahoy matey! Fair winds!"),
    ("How are you?", "Arr, I be fine, matey! Fair winds!"),
    ("What is the weather like?", "Arr, sunny and warm, matey! Fair winds!"),
    ("Tell me a short story.", "Arr, a cat sailed a boat, matey! Fair winds!"),
    ("Good night.", "Arr, sleep well, matey! Fair winds!"),
    ("Do you like cats?", "Arr, cats be fine sailors, matey! Fair winds!"),
    ("Where are you?", "Arr, on me boat, matey! Fair winds!"),
    ("Please help me.", "Arr, I be here to help, matey! Fair winds!"),
    ("What is the time?", "Arr, time for a story, matey! Fair winds!"),
    ("Thank you.", "Arr, ye be welcome, matey! Fair winds!"),
    ("Are you happy?", "Arr, happy as the sea, matey! Fair winds!"),
    ("The fox is quick.", "Arr, quick as the wind, matey! Fair winds!"),
    ("Is it warm today?", "Arr, warm and fair, matey! Fair winds!"),
    ("Tell me about the sea.", "Arr, the sea be calm, matey! Fair winds!"),
    ("Answer in one sentence.", "Arr, one short sentence, matey! Fair winds!"),
    ("What do you eat?", "Arr, fish and bread, matey! Fair winds!"),
]


def conversations(n: int = 16, system: str | None = SYSTEM) -> list[Conversation]:
    out = []
    for i, (q, a) in enumerate(PAIRS[:n]):
        msgs = ([Message("system", system)] if system else []) + [Message("user", q), Message("assistant", a)]
        out.append(Conversation(tuple(msgs), i + 1))
    return out


def write_jsonl(path, convs) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c.messages]}) + "\n")
    return path


def tiny_model_folder(path) -> Path:
    return make_tiny_model_folder(path)


def setup(folder, config, n_train: int = 12, n_valid: int = 4):
    """-> (model with the method attached, tokenizer, train examples, valid examples, hyperparameters)."""
    from finetune_desktop.data.batching import make_batches
    from finetune_desktop.data import encode_conversations
    from finetune_desktop.engine import Model, Tokenizer
    from finetune_desktop.training.auto import resolve
    from finetune_desktop.training.session import attach_method

    model = Model.from_pretrained(folder)
    tok = Tokenizer.from_pretrained(folder)
    convs = conversations(n_train + n_valid)
    ex = encode_conversations(tok, convs, config.max_seq_len)
    train_ex, valid_ex = ex[:n_train], ex[n_train:]
    attach_method(model, config)
    longest = max(len(e) for e in train_ex)
    bs = resolve(config, len(train_ex), longest).batch_size
    spe = len(make_batches(train_ex, bs, config.seed, 0, tok.pad_token_id))
    hyper = resolve(config, len(train_ex), longest, steps_per_epoch=spe)
    return model, tok, train_ex, valid_ex, hyper


def new_run(run_dir) -> Path:
    from finetune_desktop.training.runs import write_run_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_json(run_dir, {"format": 1, "status": "running", "settings": {}, "created": "test"})
    return run_dir


def run_loop(folder, run_dir, config, events=None, control=None, n_train=12, n_valid=4, resume=False,
             on_event=None, **kw):
    """Run the loop on the tiny data; events go to the list `events` or the callable `on_event`."""
    from finetune_desktop.training.loop import train

    model, tok, tr, va, hyper = setup(folder, config, n_train, n_valid)
    if not resume:
        new_run(run_dir)
    if on_event is None and events is not None:
        on_event = events.append
    res = train(model, tr, va, config, hyper, run_dir, on_event=on_event,
                control=control, resume=resume, base_dir=folder, pad_id=tok.pad_token_id, **kw)
    return res, model


def train_losses(run_dir) -> list[float]:
    from finetune_desktop.training.runs import load_run_metrics

    return [d["train_loss"] for d in load_run_metrics(run_dir).train]
