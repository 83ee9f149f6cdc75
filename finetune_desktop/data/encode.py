"""Conversation -> token ids + loss labels.

Rendering: the model's own chat template (tokenizer.apply_chat_template), so training sees
exactly the text the model sees when chatting.

Labels: -100 everywhere except the tokens of assistant messages with weight 1. Each trained
assistant turn includes its end-of-turn token (e.g. <|im_end|>), so the tuned model learns to
stop; the template's text after that token (e.g. the newline) is not trained. Spans are found
by rendering prefixes of the conversation (the text before an assistant reply is
render(messages[:i], add_generation_prompt=True); the turn ends where render(messages[:i+1])
ends) and mapping character spans to tokens with the tokenizer's character offsets.

A fast path gives the same spans with one render per example: for each pattern of roles it
renders the template once with placeholder contents, learns the template's fixed text between
messages, and checks that each real rendering is exactly that text with the contents in
between; anything else (a template that changes content, e.g. trims it) goes the reference way.

Tokenizing many conversations (stream.py: StreamEncoder) takes three more shortcuts (pieces.py), each
checked against the plain way (every rendering tokenized whole, with character offsets) on
samples as it goes: renderings are tokenized in pieces, cut at the template's own special tokens,
so that a piece that repeats (a system prompt on every line) is tokenized once per chunk
(Layout); several pieces go to the tokenizer as one input, joined by a special token
(encode_texts); and for byte-level BPE tokenizers the token positions follow from the ids, so the
tokenizer skips the offsets (ByteLengths).

Messages after the last assistant reply are left out: nothing after the last trained token can
change a causal model's loss.

Truncation policy at max_seq_len: keep the start (system prompt and first turns), cut the end.
`truncated_by` says how many tokens were cut; an example whose trained tokens are all cut away is
dropped (with a warning) by encode_conversations / validate_file, and skipped by make_batches.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Optional, Sequence

import numpy as np

from .report import DataError
from .types import IGNORE_INDEX, Conversation, EncodedExample, Issue, Message

# A trained character span: (start of the reply, end of the reply text, end of the turn)
Span = tuple[int, int, int]


def template_messages(conv: Conversation) -> list[Message]:
    """The messages that are rendered: all up to and including the last assistant message."""
    msgs = list(conv.messages)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
    return msgs[: last + 1] if last >= 0 else msgs


def _render(tok, dicts, gen=False) -> Optional[str]:
    try:
        return tok.apply_chat_template(dicts, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 - some templates refuse partial conversations
        return None


def _find_content(full: str, content: str, base: int, limit: int) -> tuple[int, int]:
    """Where a message's text starts and ends in the rendering, searching from `base` (the end of
    the rendered prefix) up to `limit` (the end of this message's turn). Templates may trim it."""
    stripped = content.strip()
    for c in (content, stripped):
        if full.startswith(c, base):
            return base, base + len(c)
    for c in (content, stripped):
        j = full.find(c, base, limit)
        if j >= 0:
            return j, j + len(c)
    raise ValueError("the chat template changes the text of an assistant message, so its tokens cannot be found")


def spans_by_prefixes(tok, msgs: Sequence[Message], full: Optional[str] = None) -> tuple[str, list[Span]]:
    """Reference method: render the conversation and its prefixes; return the text and the
    character spans of the trained assistant messages."""
    dicts = [m.as_template_dict() for m in msgs]
    if full is None:
        full = tok.apply_chat_template(dicts)
    spans: list[Span] = []
    prev_end = 0
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        base = prev_end
        before = _render(tok, dicts[:i], gen=True)
        if before is not None and full.startswith(before) and len(before) >= prev_end:
            base = len(before)
        else:
            plain = _render(tok, dicts[:i])
            if plain is not None and full.startswith(plain) and len(plain) >= prev_end:
                base = len(plain)
        after = _render(tok, dicts[: i + 1])
        after_ok = after is not None and full.startswith(after) and len(after) > base
        start, cend = _find_content(full, m.content, base, len(after) if after_ok else len(full))
        end = len(after) if after_ok and len(after) >= cend else cend
        prev_end = max(cend, end)
        if m.weight:
            spans.append((start, cend, end))
    return full, spans


_SENT = "\ue000{}\ue001"  # placeholder contents (private-use characters)


class _Plan:
    """The fixed text a template writes around messages for one pattern of (role, name)."""

    __slots__ = ("glue", "tails", "layout")

    def __init__(self, glue: list[str], tails: dict[int, str]):
        self.glue = glue        # len(messages) + 1 pieces: glue[0] c0 glue[1] c1 ... glue[n]
        self.tails = tails      # assistant index -> text from the end of its content to the turn end
        self.layout = 0         # the Layout for tokenizing in pieces (None: not possible); 0: not made yet


def _make_plan(tok, msgs: Sequence[Message]) -> Optional[_Plan]:
    dicts = []
    for i, m in enumerate(msgs):
        d = m.as_template_dict()
        d["content"] = _SENT.format(i)
        dicts.append(d)
    s = _render(tok, dicts)
    if s is None:
        return None
    glue, ends, p = [], [], 0
    for i in range(len(dicts)):
        sent = _SENT.format(i)
        j = s.find(sent, p)
        if j < 0 or s.count(sent) != 1:
            return None
        glue.append(s[p:j])
        p = j + len(sent)
        ends.append(p)
    glue.append(s[p:])
    tails = {}
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        r = _render(tok, dicts[: i + 1])
        tails[i] = r[ends[i]:] if (r is not None and s.startswith(r) and len(r) >= ends[i]) else ""
        before = _render(tok, dicts[:i], gen=True)  # the reference finds the reply after this text
        if before is not None and s.startswith(before) and len(before) > ends[i] - len(_SENT.format(i)):
            return None
    return _Plan(glue, tails)


class SpanFinder:
    """Renders conversations and finds trained spans; caches one _Plan per role pattern.

    Three ways, fastest first:
      * the template copies contents verbatim (template_check): the text is the plan's fixed text
        with the contents in between, no rendering (every VERIFY_EVERY-th example is still rendered
        and compared; a difference switches this way off);
      * otherwise render once and, if the rendering is the plan's text with the contents in
        between, take the spans from the plan;
      * otherwise the reference: render the prefixes (spans_by_prefixes)."""

    VERIFY_EVERY = 64

    def __init__(self, tok, fast: bool = True):
        self.tok = tok
        self.fast = fast
        self.plans: dict[tuple, Optional[_Plan]] = {}
        self.verbatim = False
        self._count = 0
        if fast:
            from .template_check import copies_content_verbatim
            template = getattr(tok, "chat_template", None)
            self.verbatim = isinstance(template, str) and copies_content_verbatim(template)

    def _plan(self, msgs: Sequence[Message]) -> Optional[_Plan]:
        key = tuple((m.role, m.name) for m in msgs)
        plan = self.plans.get(key, 0)
        if plan == 0:
            plan = self.plans[key] = _make_plan(self.tok, msgs) if len(self.plans) < 4096 else None
        return plan

    def __call__(self, msgs: Sequence[Message]) -> tuple[str, list[Span]]:
        text, spans, _ = self.render(msgs)
        if text is None:
            text, spans = _assemble(self._plan(msgs), msgs)
        return text, spans

    def render(self, msgs: Sequence[Message], need_text: bool = True):
        """-> (text, spans, plan): plan is set when the text is exactly the plan's fixed text with
        the contents in between. With need_text=False, text and spans are None when they would
        only have been put together from the plan (the caller can use the plan directly)."""
        if not self.fast:
            text, spans = spans_by_prefixes(self.tok, msgs)
            return text, spans, None
        plan = self._plan(msgs)
        if self.verbatim and plan is not None:
            self._count += 1
            if self._count % self.VERIFY_EVERY != 1:
                if not need_text:
                    return None, None, plan
                text, spans = _assemble(plan, msgs)
                return text, spans, plan
            text, spans = _assemble(plan, msgs)
            full = self.tok.apply_chat_template([m.as_template_dict() for m in msgs])
            if full == text:
                return text, spans, plan
            self.verbatim = False  # the check was wrong about this template: render from now on
        else:
            full = self.tok.apply_chat_template([m.as_template_dict() for m in msgs])
        if plan is not None:
            spans = _spans_from_plan(plan, msgs, full)
            if spans is not None:
                return full, spans, plan
        text, spans = spans_by_prefixes(self.tok, msgs, full)
        return text, spans, None


def _assemble(plan: _Plan, msgs: Sequence[Message]) -> tuple[str, list[Span]]:
    glue = plan.glue
    parts = []
    spans = []
    p = 0
    for i, m in enumerate(msgs):
        g = glue[i]
        c = m.content
        parts.append(g)
        parts.append(c)
        p += len(g)
        if m.role == "assistant" and m.weight:
            spans.append((p, p + len(c), p + len(c) + len(plan.tails.get(i, ""))))
        p += len(c)
    parts.append(glue[-1])
    return "".join(parts), spans


def _spans_from_plan(plan: _Plan, msgs: Sequence[Message], full: str) -> Optional[list[Span]]:
    glue = plan.glue
    p = 0
    spans = []
    for i, m in enumerate(msgs):
        g = glue[i]
        if not full.startswith(g, p):
            return None
        p += len(g)
        c = m.content
        if not full.startswith(c, p):
            return None
        start = p
        p += len(c)
        if m.role == "assistant" and m.weight:
            spans.append((start, p, p + len(plan.tails.get(i, ""))))
    g = glue[-1]
    if not full.startswith(g, p) or p + len(g) != len(full):
        return None
    return spans


# ---------------------------------------------------------------------------------------------
# characters -> tokens: each trained span becomes a token range [k0, stop)

def _stop(ids, kc: int, ke: int, n: int, eot: frozenset) -> int:
    """Trained tokens end after the first end-of-turn token of the turn's trailing text; without
    one, at the turn end, plus an end-of-turn token right after it."""
    for k in range(kc, ke):
        if int(ids[k]) in eot:
            return k + 1
    if ke < n and int(ids[ke]) in eot:
        return ke + 1
    return ke


def _ranges_from_offsets(ids, offsets, spans: list[Span], eot: frozenset) -> list[tuple[int, int]]:
    """Reference: token ranges from the tokens' character offsets."""
    n = len(ids)
    starts = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    out = []
    for start, cend, end in spans:
        k0 = bisect_right(ends, start)                 # first token ending after the reply starts
        kc = bisect_left(starts, cend)                 # first token starting at/after the reply end
        ke = bisect_left(starts, max(end, cend))       # first token starting at/after the turn end
        out.append((k0, _stop(ids, kc, ke, n, eot)))
    return out


def _backend(tokenizer):
    """The HF `tokenizers.Tokenizer` behind our Tokenizer, for batch encoding (None if absent)."""
    b = getattr(tokenizer, "backend", None)
    if b is None:
        b = getattr(tokenizer, "_tok", None)
    return b if (b is not None and hasattr(b, "encode_batch")) else None


def _eot(tokenizer) -> frozenset:
    ids = set(getattr(tokenizer, "end_of_turn_ids", ()) or ())
    e = getattr(tokenizer, "eos_token_id", None)
    if e is not None:
        ids.add(int(e))
    return frozenset(int(i) for i in ids)


def _make_example(ids: np.ndarray, labels: np.ndarray, ranges, line: int, max_seq_len: int):
    """Fill labels from the ranges, truncate; -> (EncodedExample, trained tokens after truncation)."""
    n = len(ids)
    keep = min(n, max_seq_len)
    trained = 0
    for k0, stop in ranges:
        if stop > k0:
            labels[k0:stop] = ids[k0:stop]
            trained += max(0, min(stop, keep) - max(k0, 1))  # the shifted loss never counts position 0
    if keep < n:
        ids, labels = ids[:keep].copy(), labels[:keep].copy()
    return EncodedExample(ids, labels, line, n - keep), trained


def encode_conversation(tokenizer, conv: Conversation, max_seq_len: int) -> EncodedExample:
    """One conversation -> EncodedExample (input_ids and labels int32, -100 = not trained), by the
    reference method (prefix renders + the tokenizer's character offsets).

    Truncation: keeps the first max_seq_len tokens (the system prompt and first turns) and cuts
    the end; `truncated_by` is the number of tokens cut. If every trained token is cut, the
    example has num_trained_tokens == 0 (make_batches skips such examples).
    Raises DataError (naming the line) if the chat template fails on this conversation."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    msgs = template_messages(conv)
    try:
        text, spans = spans_by_prefixes(tokenizer, msgs)
    except Exception as e:  # noqa: BLE001 - template errors come from untrusted Jinja
        raise DataError("cannot encode", [Issue(conv.line, None, f"the chat template failed: {e}", "error",
                                                "template_error")]) from None
    ids, offsets = tokenizer.encode_with_offsets(text)
    arr = np.asarray(ids, dtype=np.int32)
    labels = np.full(len(arr), IGNORE_INDEX, dtype=np.int32)
    ex, _ = _make_example(arr, labels, _ranges_from_offsets(ids, offsets, spans, _eot(tokenizer)), conv.line,
                          max_seq_len)
    return ex
