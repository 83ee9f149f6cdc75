"""Chatting with a model: load it by name, render the conversation with its chat template, stream
the reply as text. Used by `finetune-desktop chat` and usable from the app."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..engine import Model
from .loading import open_model


class ChatError(Exception):
    """A model cannot be used for chat; the message says why."""


@dataclass
class ChatModel:
    model: Model
    tokenizer: object
    folder: Path
    run_dir: Path | None = None


def load_chat_model(spec: str) -> ChatModel:
    """spec: a model folder, a run folder, or 'base' (the embedded model)."""
    model, tok, folder, run_dir = open_model(spec, ChatError)
    return ChatModel(model, tok, folder, run_dir)


def prompt_ids(tokenizer, messages: Sequence[dict], max_len: int | None = None, reserve: int = 0) -> list[int]:
    """Render with the chat template (generation prompt added) and encode. With max_len, the
    oldest non-system turns are dropped until prompt + reserve fits."""
    msgs = [dict(m) for m in messages]
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        if max_len is None or len(ids) + reserve <= max_len:
            return ids
        first = 1 if msgs and msgs[0].get("role") == "system" else 0
        if len(msgs) - first <= 1:
            return ids[-max(1, max_len - reserve):]
        n = 2 if len(msgs) - first > 2 else 1  # a user turn and its reply
        del msgs[first: first + n]


def stream_reply(cm: ChatModel, messages: Sequence[dict], temperature: float = 0.7, top_p: float | None = 0.9,
                 top_k: int | None = None, repetition_penalty: float = 1.1, max_new_tokens: int = 200,
                 seed: int | None = None) -> Iterator[str]:
    """Yield the reply as text pieces, stopping at the end-of-turn token."""
    maxpos = cm.model.config.max_position_embeddings
    max_new = max(1, min(max_new_tokens, maxpos - 1))
    ids = prompt_ids(cm.tokenizer, messages, maxpos, max_new)
    dec = cm.tokenizer.stream_decoder(skip_special_tokens=True)
    for t in cm.model.generate(ids, max_new_tokens=max_new, temperature=temperature,
                               top_k=top_k if top_k and top_k > 0 else None,
                               top_p=top_p if top_p and 0 < top_p < 1 else None,
                               repetition_penalty=repetition_penalty, seed=seed,
                               stop_ids=cm.tokenizer.end_of_turn_ids):
        piece = dec.push(t)
        if piece:
            yield piece
