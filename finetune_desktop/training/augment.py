"""Helping a fine-tune learn facts rather than exact questions: question-token dropout, and
more wordings of each training question written by the base model itself.

Question-token dropout (TrainConfig.question_dropout): at every step, each token of the context
(the system message and the questions, never the trained reply, the special tokens or the chat
template's role markers) is replaced by a random token with this probability. A model that can
no longer count on every word of a question being there has to learn what each of its words
says about the answer, so a question worded differently still points to the right fact.
Measured with tools/content_eval.py on FAQ files of 20 facts in 3 wordings, 20 epochs, unseen
rewordings right without -> with 0.3: bike shop 2 -> 3, swimming pool 4 -> 4, and on a base
model given extra FAQ-style pretraining, driving school 5 -> 7, library 8 -> 4; training answers
reproduced fell from 60/60 to 53-59/60 (41/60 on one bike seed). Not a reliable gain, so "auto"
is 0 and it stays a setting to try.

More wordings (opt-in, TrainConfig.reword_questions / train --reword N):

A fine-tune learns a fact from the wordings it sees. Three wordings of a question teach the
model those three; a fourth, unseen wording often gets another fact's answer, because a small
model keys on the exact words. Seeing more wordings of the same question with the same answer
helps it carry the fact over. So, before training, the base model can be asked, for each
training question, to "ask this question another way", and each new wording is added as
another example with the original answer. The new examples are written to the run folder
(reworded.jsonl), so a person can read exactly what the model made up.

This needs a base model that can paraphrase (an instruction-tuned model such as a
Qwen2.5-Instruct). The embedded 4M-parameter model cannot: asked to reword, it mostly writes an
unrelated question, and training on those would tie answers to the wrong questions. So "auto"
never rewords; a person who brings a capable model asks for it with a count.

What is kept: a new wording that differs from every question in the file, is one line of
reasonable length, and was not also produced for a question with a different answer. Nothing
here changes the answers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..data.types import Conversation, Message
from .chat import ChatModel, GenerationSettings, reply_text
from .quiz import normalize

REWORD_PROMPT_EN = "Ask this question another way: "
REWORD_PROMPT_KO = "이 질문을 다른 말로 물어봐 줘: "
REPEATED_ANSWERS = 1 / 3  # question/answer data: at least this share of examples repeat another's answer
MAX_TRIES = 3             # samples per wanted wording before giving up
SETTINGS = GenerationSettings(temperature=0.9, top_p=0.95, repetition_penalty=1.0, max_new_tokens=40)




def question_dropout(setting, conversations) -> float:
    """The dropout probability for a TrainConfig.question_dropout setting ("auto" or a number).
    "auto" is 0: measured, it did not reliably help (see the module's text)."""
    if setting == "auto":
        return 0.0
    return float(setting or 0.0)


def drop_question_tokens(input_ids, labels, attention_mask, protected_ids, vocab_size: int, p: float, rng):
    """A copy of input_ids (B, T) with context tokens replaced by random ones with probability p.
    Kept: trained positions (labels != -100), padding, the protected (special) ids, the two tokens
    after each of them (role markers such as "user\\n") and the token just before a trained reply.
    Replacements are never protected ids."""
    import numpy as np

    from ..engine.ops import IGNORE_INDEX

    ids = np.array(input_ids, copy=True)
    lab = np.asarray(labels)
    prot = np.fromiter(sorted(protected_ids), dtype=np.int64)
    special = np.isin(ids, prot)
    keep = special.copy()
    for k in (1, 2):
        keep[:, k:] |= special[:, :-k]
    keep[:, :-1] |= (lab[:, 1:] != IGNORE_INDEX) & (lab[:, :-1] == IGNORE_INDEX)
    hit = (lab == IGNORE_INDEX) & (np.asarray(attention_mask) > 0) & ~keep & (rng.random(ids.shape) < p)
    n = int(hit.sum())
    if n:
        allowed = np.setdiff1d(np.arange(vocab_size), prot)
        ids[hit] = allowed[rng.integers(0, len(allowed), size=n)]
    return ids


@dataclass(frozen=True)
class RewordResult:
    conversations: list[Conversation]   # the new examples (each a copy of its original with a new question)
    asked: int                          # questions the model was asked to reword
    kept: int                           # new wordings kept


def _is_korean(text: str) -> bool:
    return any("\uac00" <= c <= "\ud7a3" for c in text)


def reword_prompt(question: str) -> str:
    return (REWORD_PROMPT_KO if _is_korean(question) else REWORD_PROMPT_EN) + question


def _single_question(conv: Conversation) -> tuple[str, str] | None:
    """(question, answer) of an example that is one user question and one trained reply (with
    an optional system message first), else None."""
    msgs = [m for m in conv.messages if m.role != "system"]
    if len(msgs) != 2 or msgs[0].role != "user" or msgs[1].role != "assistant" or not msgs[1].weight:
        return None
    return msgs[0].content, msgs[1].content


def repeated_answer_share(conversations) -> float:
    """The share of question/answer examples whose answer another example also gives."""
    pairs = [p for p in map(_single_question, conversations) if p is not None]
    if not pairs:
        return 0.0
    counts = Counter(normalize(a) for _, a in pairs)
    return sum(counts[normalize(a)] > 1 for _, a in pairs) / len(pairs)


def answers_repeat(conversations) -> bool:
    """Question/answer data that gives the same answer to several questions (an FAQ): it teaches
    facts rather than a style, and the automatic settings train it longer (training/auto.py)."""
    return repeated_answer_share(conversations) >= REPEATED_ANSWERS


def wanted(setting, conversations) -> int:
    """New wordings per question for a TrainConfig.reword_questions setting ("auto" or a count).
    "auto" is 0: only a base model that can paraphrase should be asked (see the module's text)."""
    if setting == "auto":
        return 0
    return max(0, int(setting or 0))


MAX_LENGTH_RATIO = 2.5   # a rewording at most this much longer than the question (and 200 characters)


def _clean(text: str, question: str) -> str | None:
    """The new wording tidied, or None when it does not look like a question of its own: empty,
    far longer than the original, several sentences, or an echo of the prompt."""
    t = " ".join(text.replace("\ufffd", " ").split())
    if not (3 <= len(t) <= min(200, max(40, MAX_LENGTH_RATIO * len(question)))):
        return None
    if REWORD_PROMPT_EN.strip() in t or REWORD_PROMPT_KO.strip() in t or not re.search(r"\w", t):
        return None
    if len(re.findall(r"[.!?。](?:\s|$)", t.rstrip(".!?。 "))) > 0:  # more than one sentence
        return None
    return t


def reword(model, tokenizer, conversations, per_question: int, seed: int = 0, should_stop=None) -> RewordResult:
    """New wordings for the question of every question/answer example (see the module docstring)."""
    if per_question <= 0:
        return RewordResult([], 0, 0)
    cm = ChatModel(model, tokenizer, None)
    existing = {normalize(q) for q, _ in filter(None, map(_single_question, conversations))}
    made: dict[str, set] = {}          # normalized new wording -> answers it was produced for
    found: list[tuple[Conversation, str]] = []
    asked = 0
    seen_q: set[str] = set()
    for ci, conv in enumerate(conversations):
        qa = _single_question(conv)
        if qa is None or normalize(qa[0]) in seen_q:
            continue
        seen_q.add(normalize(qa[0]))
        asked += 1
        got = 0
        for k in range(per_question * MAX_TRIES):
            if got >= per_question or (should_stop is not None and should_stop()):
                break
            s = GenerationSettings(temperature=SETTINGS.temperature, top_p=SETTINGS.top_p,
                                   repetition_penalty=SETTINGS.repetition_penalty,
                                   max_new_tokens=SETTINGS.max_new_tokens, seed=seed * 1_000_003 + ci * 97 + k)
            new = _clean(reply_text(cm, [{"role": "user", "content": reword_prompt(qa[0])}], s), qa[0])
            if new is None:
                continue
            key = normalize(new)
            if key in existing:
                continue
            answers = made.setdefault(key, set())
            first = not answers
            answers.add(normalize(qa[1]))
            if first:
                found.append((conv, new))
                got += 1
    out = []
    for conv, new in found:
        if len(made[normalize(new)]) > 1:  # the same words for two different answers: ambiguous
            continue
        msgs = tuple(Message(m.role, new, m.weight, m.name) if m.role == "user" else m for m in conv.messages)
        out.append(Conversation(msgs, conv.line))
    return RewordResult(out, asked, len(out))
