"""Plain data types of the data pipeline: messages, conversations, issues, encoded examples and
batches. Frozen dataclasses; no behaviour beyond formatting."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..engine.ops import IGNORE_INDEX  # noqa: F401 - the label value the loss ignores (HF convention)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str                      # "system", "user" or "assistant"
    content: str
    weight: int = 1                # 0: an assistant message that is context only (not trained on)
    name: Optional[str] = None     # optional speaker name (OpenAI format); passed to the template

    def as_template_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    line: int                      # 1-based line (or CSV row start line) in the source file

    @property
    def trained_messages(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.role == "assistant" and m.weight)


@dataclass(frozen=True)
class Issue:
    line: Optional[int]            # 1-based source line; None for whole-file issues
    field: Optional[str]           # e.g. "messages[1].role"; None when it is about the whole line
    message: str
    severity: str = "error"        # "error" or "warning"
    code: str = ""                 # machine-readable kind, e.g. "not_json", "duplicate"

    def __str__(self) -> str:
        parts = []
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)

    def to_dict(self) -> dict:
        return {"line": self.line, "field": self.field, "message": self.message,
                "severity": self.severity, "code": self.code, "text": str(self)}


@dataclass(frozen=True)
class EncodedExample:
    input_ids: np.ndarray          # (T,) int32 token ids of the rendered conversation, T <= max_seq_len
    labels: np.ndarray             # (T,) int32: the id where the loss counts, -100 elsewhere (HF style, unshifted)
    line: int                      # source line of the conversation
    truncated_by: int = 0          # tokens cut from the end to fit max_seq_len

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained_tokens(self) -> int:
        """Tokens the loss counts: labels are shifted inside the loss, so position 0 never counts."""
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray          # (B, T) int64, right-padded with pad_id
    labels: np.ndarray             # (B, T) int64, -100 on padding and on untrained tokens
    attention_mask: np.ndarray     # (B, T) int8, 1 on real tokens, 0 on padding
    num_trained_tokens: int        # tokens the (shifted) loss counts in this batch
    lines: tuple[int, ...] = field(default=())  # source lines of the rows, for debugging and the GUI

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
