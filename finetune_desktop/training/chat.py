"""Chatting with a model: load it by name, render the conversation with its chat template, stream
the reply as text. The one implementation behind `finetune-desktop chat`, `quiz` and the app's
chat panel."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..engine import Model
from ..engine.errors import UserError
from .loading import open_model


class ChatError(UserError):
    """A model cannot be used for chat; the message says why."""


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7          # 0 = greedy (always the most likely token)
    top_p: float = 0.9                # nucleus sampling; 1.0 = off
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.1   # > 1 discourages tokens already in the conversation
    max_new_tokens: int = 200
    seed: int | None = None           # None = a fresh random seed

    @classmethod
    def greedy(cls, max_new_tokens: int = 200) -> "GenerationSettings":
        """What `chat --temperature 0` does (the repetition penalty stays as in chat)."""
        return cls(temperature=0.0, max_new_tokens=max_new_tokens)


@dataclass
class ChatModel:
    model: Model
    tokenizer: object
    folder: Path
    run_dir: Path | None = None


def load_chat_model(spec: str) -> ChatModel:
    """spec: a model folder, a run folder, 'base' (the embedded model) or a cached repo id."""
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


def stream_reply(cm: ChatModel, messages: Sequence[dict], settings: GenerationSettings = GenerationSettings(),
                 should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
    """Yield the reply as text pieces, stopping at the end-of-turn token, after max_new_tokens,
    or as soon as should_stop() is true. The oldest turns of a long chat are dropped so that the
    prompt and the reply fit the model's context."""
    s = settings
    maxpos = cm.model.config.max_position_embeddings
    max_new = max(1, min(s.max_new_tokens, maxpos - 1))
    ids = prompt_ids(cm.tokenizer, messages, maxpos, max_new)
    max_new = max(1, min(max_new, maxpos - len(ids)))
    dec = cm.tokenizer.stream_decoder(skip_special_tokens=True)
    for t in cm.model.generate(ids, max_new_tokens=max_new, temperature=s.temperature,
                               top_k=s.top_k if s.top_k > 0 else None,
                               top_p=s.top_p if 0 < s.top_p < 1 else None,
                               repetition_penalty=s.repetition_penalty, seed=s.seed,
                               stop_ids=cm.tokenizer.end_of_turn_ids):
        piece = dec.push(t)
        if piece:
            yield piece
        if should_stop is not None and should_stop():
            return


def reply_text(cm: ChatModel, messages: Sequence[dict], settings: GenerationSettings = GenerationSettings()) -> str:
    """The whole reply as one string (stripped)."""
    return "".join(stream_reply(cm, messages, settings)).strip()
