""""Did it learn?": ask a model questions (greedy) and judge each reply.

Two kinds of question file:

- a quiz file, JSONL, one question per line:
      {"question": "Where is the shop?", "expected": ["Tannery Lane"], "system": "optional"}
  A reply is right when it contains any of the expected strings (case-insensitive). This is how
  a person checks that a fine-tune carries a fact over to wordings it never saw.
- a training file (any format `validate` accepts): each example's last user message is asked,
  with the example's system message and earlier turns, and the reply is right when it
  reproduces the trained answer (see `reproduces`). This checks that the facts were learned.

Used by `finetune-desktop quiz`, by the app's quiz table, and by the training loop, which can
score a quiz file at every evaluation.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..data.textio import json_objects
from ..engine.errors import UserError
from .chat import ChatModel, GenerationSettings, reply_text

MAX_QUIZ_LINE_CHARS = 20_000
QUIZ_MAX_NEW_TOKENS = 96        # replies to FAQ questions are short; this bounds a quiz's time


class QuizFormatError(UserError):
    """A quiz file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class QuizItem:
    messages: tuple[dict, ...]     # the conversation up to the question (system message included)
    expected: tuple[str, ...]      # key strings (kind "keys") or the one trained answer (kind "answer")
    kind: str                      # "keys" or "answer"
    line: int                      # 1-based line in the source file

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages[0]["role"] == "system" else None


@dataclass(frozen=True)
class QuizResult:
    item: QuizItem
    reply: str
    correct: bool


@dataclass(frozen=True)
class QuizScore:
    correct: int
    total: int

    @property
    def fraction(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} ({100 * self.fraction:.0f}%)"


def score(results: Sequence[QuizResult]) -> QuizScore:
    return QuizScore(sum(r.correct for r in results), len(results))


# ----------------------------------------------------------------------------- judging
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})


def normalize(text: str) -> str:
    """Case-folded, NFKC, curly quotes and dashes made plain, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return re.sub(r"\s+", " ", t).strip()


def contains_any(reply: str, keys: Sequence[str]) -> bool:
    """The quiz rule: any expected string in the reply, case-insensitive."""
    r = normalize(reply)
    return any(normalize(k) in r for k in keys if k.strip())


def reproduces(reply: str, answer: str) -> bool:
    """The reply says the trained answer: after `normalize`, and ignoring the answer's final
    punctuation, the answer appears in the reply."""
    a = normalize(answer).rstrip(".!?。 ")
    return bool(a) and a in normalize(reply)


def judge(item: QuizItem, reply: str) -> bool:
    if item.kind == "answer":
        return reproduces(reply, item.expected[0])
    return contains_any(reply, item.expected)


# ----------------------------------------------------------------------------- reading
def looks_like_quiz_file(path) -> bool:
    """A JSONL file whose first record has a "question" key (else it is read as training data)."""
    try:
        for _, d in json_objects(path):
            return "question" in d
    except OSError:
        return False
    return False


def read_quiz_file(path) -> list[QuizItem]:
    """Items of a quiz JSONL file; every problem raises QuizFormatError naming file, line and field."""
    p = Path(path)
    items: list[QuizItem] = []
    try:
        f = open(p, encoding="utf-8-sig")
    except OSError as e:
        raise QuizFormatError(f"{p}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            where = f"{p}: line {n}"
            if len(s) > MAX_QUIZ_LINE_CHARS:
                raise QuizFormatError(f"{where}: the line is longer than {MAX_QUIZ_LINE_CHARS:,} characters")
            try:
                d = json.loads(s)
            except json.JSONDecodeError as e:
                raise QuizFormatError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise QuizFormatError(f"{where}: expected a JSON object with \"question\" and \"expected\"")
            q, exp, system = d.get("question"), d.get("expected"), d.get("system")
            if not isinstance(q, str) or not q.strip():
                raise QuizFormatError(f"{where}: question: must be a non-empty string")
            if isinstance(exp, str):
                exp = [exp]
            if not isinstance(exp, list) or not exp or not all(isinstance(x, str) and x.strip() for x in exp):
                raise QuizFormatError(f"{where}: expected: must be a list of non-empty strings")
            if system is not None and not isinstance(system, str):
                raise QuizFormatError(f"{where}: system: must be a string")
            unknown = sorted(set(d) - {"question", "expected", "system"})
            if unknown:
                raise QuizFormatError(f"{where}: {unknown[0]}: unknown key (a quiz line has question, "
                                      "expected and optionally system)")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            items.append(QuizItem(tuple(msgs), tuple(exp), "keys", n))
    if not items:
        raise QuizFormatError(f"{p}: no questions in the file")
    return items


def items_from_conversations(conversations) -> list[QuizItem]:
    """One item per training example that ends in a trained assistant reply: the conversation up
    to the last user message is asked, and the reply must reproduce that assistant message."""
    items = []
    seen = set()
    for conv in conversations:
        msgs = list(conv.messages)
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant" and m.weight), default=None)
        if last is None or last == 0 or msgs[last - 1].role != "user":
            continue
        ctx = tuple(m.as_template_dict() for m in msgs[:last])
        key = json.dumps(ctx, ensure_ascii=False, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        items.append(QuizItem(ctx, (msgs[last].content,), "answer", conv.line))
    return items


def load_questions(path) -> list[QuizItem]:
    """A quiz file or a training file (its own answers), told apart by the first record."""
    p = Path(path)
    if not p.is_file():
        raise QuizFormatError(f"{p}: no such file")
    if looks_like_quiz_file(p):
        return read_quiz_file(p)
    from ..data import read_conversations

    items = items_from_conversations(read_conversations(p))
    if not items:
        raise QuizFormatError(f"{p}: no example ends with a user question and a trained reply")
    return items


# ----------------------------------------------------------------------------- asking
def quiz_settings(max_new_tokens: int = QUIZ_MAX_NEW_TOKENS) -> GenerationSettings:
    """Greedy, as `chat --temperature 0` answers."""
    return GenerationSettings.greedy(max_new_tokens)


def ask(cm: ChatModel, items: Sequence[QuizItem], settings: GenerationSettings | None = None,
        should_stop: Callable[[], bool] | None = None) -> Iterator[QuizResult]:
    """Ask every item in turn and judge the reply (a generator, so callers can show progress)."""
    s = settings or quiz_settings()
    for item in items:
        if should_stop is not None and should_stop():
            return
        reply = reply_text(cm, item.messages, s)
        yield QuizResult(item, reply, judge(item, reply))


def run_quiz(cm: ChatModel, items: Sequence[QuizItem], settings: GenerationSettings | None = None) -> list[QuizResult]:
    return list(ask(cm, items, settings))
