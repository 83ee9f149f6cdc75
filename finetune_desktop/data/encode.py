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

Tokenizing many conversations (StreamEncoder) takes three more shortcuts, each checked against
the plain way (every rendering tokenized whole, with character offsets) on samples as it goes:
renderings are tokenized in pieces, cut at the template's own special tokens, so that a piece
that repeats (a system prompt on every line) is tokenized once per chunk (_Layout); several
pieces go to the tokenizer as one input, joined by a special token (_encode_texts); and for
byte-level BPE tokenizers the token positions follow from the ids, so the tokenizer skips the
offsets (_ByteLengths).

Messages after the last assistant reply are left out: nothing after the last trained token can
change a causal model's loss.

Truncation policy at max_seq_len: keep the start (system prompt and first turns), cut the end.
`truncated_by` says how many tokens were cut; an example whose trained tokens are all cut away is
dropped (with a warning) by encode_conversations / validate_file, and skipped by make_batches.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import chain
from typing import Callable, Optional, Sequence

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
        self.layout = 0         # the _Layout for tokenizing in pieces (None: not possible); 0: not made yet


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


# ---------------------------------------------------------------------------------------------
# Tokenizing in pieces
#
# A `tokenizers` tokenizer first finds the added (special) tokens in its input (leftmost-longest,
# on the raw text), then normalizes, pre-tokenizes and tokenizes the text between them one piece
# at a time. A template's rendering such as
#     <|im_start|>system\n{c0}<|im_end|>\n<|im_start|>user\n{c1}<|im_end|>\n<|im_start|>assistant\n{c2}<|im_end|>\n
# therefore gives the same tokens as its pieces tokenized one by one: the fixed text from the
# first to the last special token of each piece of template text ("<|im_end|>\n<|im_start|>",
# tokenized once per role pattern) and the "units" between them ("system\n" + c0, "user\n" + c1,
# ...). A unit that repeats, such as a system prompt on every line, is tokenized once per chunk.
# For the same reason several texts can go to the tokenizer as one input, joined by a special
# token that cannot touch its neighbours (_SplitRules._separator), and be cut apart at it after.
#
# This holds when (checked once per tokenizer and once per role pattern; otherwise the whole
# rendering is tokenized as before):
#   * no occurrence of any added token can reach across the edge of the template's special tokens
#     into the text next to them, whatever the contents (_crossable);
#   * those special tokens are matched on the raw text (normalized=False) and do not strip the
#     whitespace around them (lstrip/rstrip), no added token is single_word, and special tokens
#     are split at all (encode_special_tokens off);
#   * each component handles a piece without looking at where it sits in the whole text (the
#     known components, minus Metaspace's prepend_scheme "first"); no padding or truncation;
#     no BPE dropout.
# The first example of each role pattern and every VERIFY_EVERY-th after it are also tokenized
# whole and compared; a difference switches the shortcuts off for the rest of the run, and the
# chunk at hand is done again the plain way.

_NORMALIZER_TYPES = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace", "Prepend",
                     "BertNormalizer", "Nmt", "Precompiled", "ByteLevel", "Sequence"}
_PRE_TOKENIZER_TYPES = {"ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Punctuation", "Digits",
                        "Split", "CharDelimiterSplit", "UnicodeScripts", "Metaspace", "FixedLength", "Sequence"}
_POST_PROCESSOR_TYPES = {"ByteLevel", "RobertaProcessing", "BertProcessing", "TemplateProcessing", "Sequence"}
_MODEL_TYPES = {"BPE", "WordPiece", "WordLevel", "Unigram"}


def _components_ok(component, allowed: set) -> bool:
    if component is None:
        return True
    import json
    try:
        state = json.loads(component.__getstate__())
    except Exception:  # noqa: BLE001 - a component we cannot inspect: do not rely on it
        return False

    def ok(d) -> bool:
        if not isinstance(d, dict) or d.get("type") not in allowed:
            return False
        if d["type"] == "Metaspace" and (d.get("prepend_scheme") == "first"):
            return False  # prepends only at the start of the whole text: depends on the position
        if d["type"] == "Sequence":
            subs = [v for k, v in d.items() if k != "type" and isinstance(v, list)]
            return len(subs) == 1 and all(ok(x) for x in subs[0])
        return True
    return ok(state)


class _SplitRules:
    """What a tokenizer allows for tokenizing in pieces (None from make() when it allows nothing)."""

    __slots__ = ("first_pass", "contents", "backend", "sep", "sep_id")

    def __init__(self, backend, first_pass: dict, contents: list):
        self.backend = backend
        self.first_pass = first_pass  # content -> AddedToken, for tokens matched on the raw text
        self.contents = contents      # every added token's text
        self.sep, self.sep_id = self._separator()

    def _separator(self):
        """A special token that can stand between any two texts without touching them, so that
        several texts can go to the tokenizer as one input (_encode_texts); (None, None) if none."""
        for content, t in sorted(self.first_pass.items()):
            if not t.special or t.lstrip or t.rstrip or content[0].isspace() or content[-1].isspace():
                continue
            if _crossable(self.contents, "", True, content, True) or _crossable(self.contents, content, True, "", True):
                continue
            ids = self.backend.encode(content, add_special_tokens=False).ids
            if len(ids) == 1:
                return content, ids[0]
        return None, None

    @classmethod
    def make(cls, backend) -> Optional["_SplitRules"]:
        try:
            if backend.padding is not None or backend.truncation is not None:
                return None
            if getattr(backend, "encode_special_tokens", False):
                return None
            model = backend.model
            if type(model).__name__ not in _MODEL_TYPES or getattr(model, "dropout", None):
                return None
            if not (_components_ok(backend.normalizer, _NORMALIZER_TYPES)
                    and _components_ok(backend.pre_tokenizer, _PRE_TOKENIZER_TYPES)
                    and _components_ok(backend.post_processor, _POST_PROCESSOR_TYPES)):
                return None
            added = list(backend.get_added_tokens_decoder().values())
        except Exception:  # noqa: BLE001 - an unusual backend: tokenize whole renderings
            return None
        if not added or any(t.single_word for t in added):
            return None
        first_pass = {t.content: t for t in added if t.content and not t.normalized}
        return cls(backend, first_pass, [t.content for t in added if t.content])


def _first_pass_matches(text: str, tokens: dict) -> list[tuple[int, int]]:
    """Leftmost-longest occurrences of the added tokens in text, as the tokenizer finds them."""
    out = []
    lengths = sorted({len(c) for c in tokens}, reverse=True)
    i, n = 0, len(text)
    while i < n:
        for L in lengths:
            if text[i:i + L] in tokens:
                out.append((i, i + L))
                i += L
                break
        else:
            i += 1
    return out


def _crossable(contents, left: str, left_open: bool, right: str, right_open: bool) -> bool:
    """Could an occurrence of one of `contents` start before an edge and end after it? `left` is
    the text known to stand just before the edge (with anything before it when left_open),
    `right` the text just after it (with anything after it when right_open)."""
    for t in contents:
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if (left.endswith(a) or (left_open and a.endswith(left))) and \
                    (right.startswith(b) or (right_open and b.startswith(right))):
                return True
    return False


class _ListPiece:
    """Counts over one tokenized piece from lists of its offsets: how many tokens end at or before
    character c, how many start before c (the reference's bisects)."""

    __slots__ = ("starts", "ends", "n")

    def __init__(self, starts, ends):
        self.starts, self.ends, self.n = starts, ends, len(starts)

    def ending_by(self, c: int) -> int:
        return bisect_right(self.ends, c)

    def starting_before(self, c: int) -> int:
        return bisect_left(self.starts, c)


class _Const(_ListPiece):
    """A fixed piece of template text, tokenized once: ids and character offsets."""

    __slots__ = ("text", "ids", "nbytes")

    def __init__(self, text: str, ids, offsets):
        super().__init__([o[0] for o in offsets], [o[1] for o in offsets])
        self.text = text
        self.ids = np.asarray(ids, dtype=np.int32)
        self.nbytes = len(text.encode("utf-8"))


class _Layout:
    """A role pattern's rendering as pieces: `seq` holds _Const pieces and unit numbers; unit k is
    the concatenation of `units[k]`, whose parts are fixed strings or message numbers."""

    __slots__ = ("seq", "units", "tails", "verified", "nbytes")

    def __init__(self, seq: list, units: list, tails: dict):
        self.seq = seq
        self.units = units
        self.tails = tails
        self.verified = False
        self.nbytes = {x: len(x.encode("utf-8")) for x in (*tails.values(), *(p for u in units for p in u
                                                                             if type(p) is str))}

    @classmethod
    def make(cls, plan: _Plan, msgs: Sequence[Message], rules: _SplitRules) -> Optional["_Layout"]:
        glue, n = plan.glue, len(msgs)
        seq: list = []
        units: list = []
        parts: list = []

        def close():
            if parts:
                seq.append(len(units))
                units.append(tuple(parts))
                parts.clear()

        for j, g in enumerate(glue):
            matches = _first_pass_matches(g, rules.first_pass)
            if matches:
                p, q = matches[0][0], matches[-1][1]
                first, last = rules.first_pass[g[p:matches[0][1]]], rules.first_pass[g[matches[-1][0]:q]]
                if first.lstrip or last.rstrip or g[p].isspace() or g[q - 1].isspace():
                    return None
                if _crossable(rules.contents, g[:p], j > 0, g[p:], j < n) or \
                        _crossable(rules.contents, g[:q], j > 0, g[q:], j < n):
                    return None
                if p:
                    parts.append(g[:p])
                close()
                enc = rules.backend.encode(g[p:q], add_special_tokens=False)
                const = _Const(g[p:q], enc.ids, enc.offsets)
                if not const.n or const.starts[0] != 0 or const.ends[-1] != q - p:
                    return None
                seq.append(const)
                if q < len(g):
                    parts.append(g[q:])
            elif g:
                parts.append(g)
            if j < n:
                parts.append(j)
        close()
        if not any(isinstance(x, _Const) for x in seq):
            return None  # nothing to split at: tokenize the whole rendering
        return cls(seq, units, plan.tails)

    def pieces(self, msgs: Sequence[Message], want_bytes: bool = False):
        """-> (pieces: unit texts and _Const pieces in order, trained spans in the whole text, the
        positions in pieces of the units that hold trained text, and with want_bytes the spans in
        UTF-8 bytes)."""
        out = []
        spans = []
        bspans = [] if want_bytes else None
        trained = []
        pos = bpos = 0
        units = self.units
        tails = self.tails
        nbytes = self.nbytes
        for item in self.seq:
            if type(item) is int:
                texts = []
                for part in units[item]:
                    if type(part) is int:
                        m = msgs[part]
                        c = m.content
                        n = len(c)
                        if want_bytes:
                            nb = n if c.isascii() else len(c.encode("utf-8"))
                        if m.weight and m.role == "assistant":
                            tail = tails.get(part, "")
                            spans.append((pos, pos + n, pos + n + len(tail)))
                            if want_bytes:
                                bspans.append((bpos, bpos + nb, bpos + nb + nbytes.get(tail, 0)))
                            if not trained or trained[-1] != len(out):
                                trained.append(len(out))
                        texts.append(c)
                        pos += n
                        if want_bytes:
                            bpos += nb
                    else:
                        texts.append(part)
                        pos += len(part)
                        bpos += nbytes[part]
                out.append("".join(texts))
            else:
                out.append(item)
                pos += len(item.text)
                bpos += item.nbytes
        return out, spans, trained, bspans


def _byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode): character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _ByteLengths:
    """Token positions from the ids alone, for byte-level BPE tokenizers that keep the text as it
    is: every token stands for a fixed run of the text's UTF-8 bytes (an added token for its own
    text, any other for one byte per character of its vocabulary entry), so a token's offsets are
    the sum of the lengths before it, and the batch can skip computing offsets
    (encode_batch_fast). Counting at a character boundary in bytes gives the same answer as the
    character offsets the tokenizer reports (a token that ends inside a character ends after
    it). Conditions: a BPE model without dropout, byte fallback or word affixes whose vocabulary
    has all 256 byte characters; no normalizer, or NFC on text that is NFC already; pre-
    tokenizers that only split (ByteLevel without a prefix space, Split, Digits, Punctuation,
    none removing text); offsets not trimmed afterwards."""

    __slots__ = ("lengths", "nfc", "array")

    _cache: dict = {}   # id(backend) -> (backend, _ByteLengths or None); a few tokenizers at most

    def __init__(self, lengths: list[int], nfc: bool):
        self.lengths = lengths   # token id -> bytes (-1: not a byte-level token)
        self.nfc = nfc
        self.array = np.array(lengths, dtype=np.int64)

    @classmethod
    def get(cls, backend) -> Optional["_ByteLengths"]:
        hit = cls._cache.get(id(backend))
        if hit is not None and hit[0] is backend:
            return hit[1]
        try:
            made = cls._make(backend)
        except Exception:  # noqa: BLE001 - an unusual tokenizer: ask for offsets instead
            made = None
        if len(cls._cache) >= 8:
            cls._cache.clear()
        cls._cache[id(backend)] = (backend, made)
        return made

    @classmethod
    def _make(cls, backend) -> Optional["_ByteLengths"]:
        import json
        if not hasattr(backend, "encode_batch_fast"):
            return None
        model = backend.model
        if type(model).__name__ != "BPE" or getattr(model, "dropout", None) or getattr(model, "byte_fallback", False) \
                or getattr(model, "continuing_subword_prefix", None) or getattr(model, "end_of_word_suffix", None):
            return None
        state = (lambda c: None if c is None else json.loads(c.__getstate__()))
        norm = state(backend.normalizer)
        if norm is not None and norm.get("type") != "NFC":
            return None
        seen_byte_level = []

        def pre_ok(d) -> bool:
            t = d.get("type")
            if t == "Sequence":
                return all(pre_ok(x) for x in d.get("pretokenizers", []))
            if t == "ByteLevel":
                seen_byte_level.append(True)
                return not d.get("add_prefix_space", False)
            return t in ("Split", "Digits", "Punctuation") and str(d.get("behavior", "Isolated")) != "Removed"

        pre = state(backend.pre_tokenizer)
        if pre is None or not pre_ok(pre) or not seen_byte_level:
            return None

        def post_ok(d) -> bool:
            if d is None:
                return True
            t = d.get("type")
            if t == "Sequence":
                return all(post_ok(x) for x in d.get("processors", []))
            if t in ("ByteLevel", "RobertaProcessing"):
                return not d.get("trim_offsets", False)
            return t in ("TemplateProcessing", "BertProcessing")

        if not post_ok(state(backend.post_processor)):
            return None
        alphabet = _byte_alphabet()
        if any(backend.token_to_id(c) is None for c in alphabet):
            return None
        added = {i: len(t.content.encode("utf-8")) for i, t in backend.get_added_tokens_decoder().items()}
        lengths = []
        for i in range(backend.get_vocab_size(with_added_tokens=True)):
            if i in added:
                lengths.append(added[i])
                continue
            tok = backend.id_to_token(i)
            lengths.append(len(tok) if tok is not None and all(ch in alphabet for ch in tok) else -1)
        return cls(lengths, norm is not None)

    def usable(self, text: str) -> bool:
        if not self.nfc or text.isascii():
            return True
        import unicodedata
        return unicodedata.is_normalized("NFC", text)

    @staticmethod
    def spans(text: str, spans: list[Span]) -> list[Span]:
        """Character spans of text -> UTF-8 byte spans."""
        if text.isascii():
            return spans
        b = lambda c: len(text[:c].encode("utf-8"))  # noqa: E731
        return [(b(s), b(c), b(t)) for s, c, t in spans]

    def ending_by(self, ids, text: str, c: int) -> int:
        """How many of the tokens (ids) of text end at or before its character c."""
        L = self.lengths
        b, total = _bytes_at(text, c)
        n = len(ids)
        if b <= total - b:
            s = 0
            for k in range(n):
                x = L[ids[k]]
                if x < 0:
                    raise LookupError(ids[k])
                s += x
                if s > b:
                    return k
            return n
        k, e = n, total
        while k > 0 and e > b:
            k -= 1
            x = L[ids[k]]
            if x < 0:
                raise LookupError(ids[k])
            e -= x
        return k

    def starting_before(self, ids, text: str, c: int) -> int:
        """How many of the tokens of text start before its character c."""
        L = self.lengths
        b, total = _bytes_at(text, c)
        n = len(ids)
        if b <= total - b:
            k = s = 0
            while k < n and s < b:
                x = L[ids[k]]
                if x < 0:
                    raise LookupError(ids[k])
                s += x
                k += 1
            return k
        k, s = n, total
        while k > 0:
            x = L[ids[k - 1]]
            if x < 0:
                raise LookupError(ids[k - 1])
            if s - x < b:
                break
            s -= x
            k -= 1
        return k


def _bytes_at(text: str, c: int) -> tuple[int, int]:
    """(UTF-8 bytes before character c, UTF-8 bytes in all) of text."""
    if text.isascii():
        return c, len(text)
    return len(text[:c].encode("utf-8")), len(text.encode("utf-8"))


class StreamEncoder:
    """Encodes conversations as they arrive, in chunks: the template rendering and label work of
    one chunk (Python) overlaps with the batch tokenization of the previous chunk (Rust threads,
    without the GIL). Issues go to on_issue from the calling thread.

        enc = StreamEncoder(tok, 512, on_issue=...); enc.add(conv) ...; examples = enc.finish()

    Two shortcuts, each checked (see above): renderings tokenized in pieces (_Layout), and token
    positions from the ids (_ByteLengths). The first example that takes a shortcut and every
    VERIFY_EVERY-th after it is also tokenized whole, with offsets, and compared; a difference
    turns both off for the rest of the run (and the chunk is done again). plain=True never takes
    them: each rendering is tokenized whole, with offsets (the plain way, kept to compare against).
    """

    VERIFY_EVERY = 64

    def __init__(self, tokenizer, max_seq_len: int, on_issue: Optional[Callable[[Issue], None]] = None,
                 lengths_out: Optional[list] = None, chunk: int = 1024, threaded: bool = True, plain: bool = False):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.emit = on_issue or (lambda issue: None)
        self.lengths_out = lengths_out
        self.chunk = chunk
        self.finder = SpanFinder(tokenizer)
        self.eot = _eot(tokenizer)
        self.backend = _backend(tokenizer)
        shortcuts = not plain and self.backend is not None
        self.rules = _SplitRules.make(self.backend) if shortcuts else None
        self.split = self.rules is not None                          # tokenize in pieces where a layout allows
        self.bytes = _ByteLengths.get(self.backend) if shortcuts else None  # token positions from the ids
        self.trained_tokens = 0            # of the examples kept: tokens the loss counts
        self.kept_tokens = 0               # ... and all their tokens (after truncation)
        self.split_examples = 0            # examples encoded from pieces
        self.byte_examples = 0             # examples whose labels came from token lengths
        self._off = False                  # a check disagreed: no shortcuts any more
        self.examples: list[EncodedExample] = []
        self._buf: list[Conversation] = []
        self._pending = None
        self._pool = None
        self._checked = 0
        self._first_whole_checked = False
        if threaded and self.backend is not None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def add(self, conv: Conversation) -> None:
        self._buf.append(conv)
        if len(self._buf) >= self.chunk:
            self._flush()

    def finish(self) -> list[EncodedExample]:
        try:
            if self._buf:
                self._flush()
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._process(pending)
        finally:
            self.close()
        return self.examples

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- one chunk: render (now), tokenize (in the background), labels (when the next chunk is sent)

    def _layout(self, plan: Optional[_Plan], msgs) -> Optional[_Layout]:
        if plan is None or not self.split:
            return None
        layout = plan.layout
        if layout == 0:
            try:
                layout = _Layout.make(plan, msgs, self.rules)
            except Exception:  # noqa: BLE001 - anything unexpected: tokenize whole renderings
                layout = None
            plan.layout = layout
        return layout

    def _check_now(self) -> bool:
        self._checked += 1
        return self._checked % self.VERIFY_EVERY == 0

    def _flush(self) -> None:
        convs, self._buf = self._buf, []
        ch = _Chunk()
        texts, index, consts, const_ref, need = ch.texts, ch.index, ch.consts, ch.const_ref, ch.need
        items, refs_out, nrefs, byte_spans, slow = ch.items, ch.refs, ch.nrefs, ch.byte_spans, ch.slow
        shadows = []   # (position of an example to check, its whole text)
        by_bytes = self.bytes
        render = self.finder.render
        for conv in convs:
            msgs = conv.messages
            if msgs[-1].role != "assistant":
                msgs = template_messages(conv)
            try:
                text, spans, plan = render(msgs, need_text=not self.split)
                layout = self._layout(plan, msgs) if plan is not None else None
                if layout is None and text is None:
                    text, spans = _assemble(plan, msgs)
                whole = (text, spans)
            except Exception as e:  # noqa: BLE001 - untrusted Jinja
                self.emit(Issue(conv.line, None, f"the chat template failed on this example: {e}", "error",
                                "template_error"))
                items.append((conv, None))
                nrefs.append(0)
                continue
            if layout is None:
                k = index.get(text)
                if k is None:
                    k = index[text] = len(texts)
                    texts.append(text)
                    need.append(False)
                if spans:
                    if not need[k] and by_bytes is not None and by_bytes.usable(text):
                        for sp in by_bytes.spans(text, spans):
                            byte_spans += (len(items), *sp)
                        ch.shortcuts = True
                        ch.byte_examples += 1
                        if not self._first_whole_checked or self._check_now():
                            self._first_whole_checked = True
                            shadows.append((len(items), whole))
                    else:
                        need[k] = True
                        slow.append(len(items))
                refs_out.append(k)
                items.append((conv, spans))
                nrefs.append(1)
                continue
            pieces, spans, trained, bspans = layout.pieces(msgs, by_bytes is not None)
            ch.shortcuts = True
            m = 0
            for j, x in enumerate(pieces):
                if type(x) is str:
                    if not x:
                        continue
                    k = index.get(x)
                    if k is None:
                        k = index[x] = len(texts)
                        texts.append(x)
                        need.append(False)
                    if bspans is not None and by_bytes.nfc and not by_bytes.usable(x):
                        bspans = None      # labels the slower way, from the offsets of the trained pieces
                    if trained and j in trained and not need[k] and (by_bytes is None or not by_bytes.usable(x)):
                        need[k] = True
                else:
                    k = const_ref.get(id(x))
                    if k is None:
                        k = const_ref[id(x)] = -1 - len(consts)
                        consts.append(x)
                refs_out.append(k)
                m += 1
            nrefs.append(m)
            if spans:
                if bspans is not None:
                    for sp in bspans:
                        byte_spans += (len(items), *sp)
                    ch.byte_examples += 1
                else:
                    slow.append(len(items))
            if not layout.verified or self._check_now():
                layout.verified = True
                shadows.append((len(items), whole if whole[0] is not None else _assemble(plan, msgs)))
            items.append((conv, spans))
        n_items = len(items)
        for pos, (text, spans) in shadows:  # the checked examples again, tokenized whole with offsets, at the end
            refs_out.append(len(texts))
            texts.append(text)
            need.append(True)
            if spans:
                slow.append(len(items))
            items.append((None, spans))
            nrefs.append(1)
        ch.checks = [(pos, n_items + i) for i, (pos, _) in enumerate(shadows)]
        # several texts to a tokenizer input: checked along with the other shortcuts, so only with them
        sep = (self.rules.sep, self.rules.sep_id) if (self.rules is not None and ch.shortcuts and not self._off) \
            else (None, None)
        if self.backend is None:
            ch.fut = None
        elif self._pool is not None:
            ch.fut = self._pool.submit(_encode_texts, self.backend, texts, need, *sep)
        else:
            ch.fut = _encode_texts(self.backend, texts, need, *sep)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._process(pending)
        self._pending = ch

    def _process(self, ch: "_Chunk") -> None:
        if self.backend is None:
            tok = _Tokens.from_pairs([self.tok.encode_with_offsets(t) for t in ch.texts])
        else:
            tok = ch.fut.result() if hasattr(ch.fut, "result") else ch.fut
            ch.fut = None
        flat, labels, sizes = self._assemble(ch, tok)
        if ch.checks and not self._off:
            bases = np.concatenate(([0], np.cumsum(np.maximum(sizes, 0))))
            for a, b in ch.checks:
                if not (sizes[a] == sizes[b] and
                        np.array_equal(flat[bases[a]:bases[a + 1]], flat[bases[b]:bases[b + 1]]) and
                        np.array_equal(labels[bases[a]:bases[a + 1]], labels[bases[b]:bases[b + 1]])):
                    self._off = True     # a shortcut disagrees with the plain way: none from now on
                    self.split = False
                    self.bytes = None
                    break
        if ch.shortcuts and self._off:
            ch = ch.as_whole(lambda conv: self.finder(template_messages(conv)))   # this chunk again, the plain way
            flat, labels, sizes = self._assemble(ch, _encode_texts(self.backend, ch.texts, ch.need))
        else:
            self.byte_examples += ch.byte_examples
        self._keep(ch, flat, labels, sizes)

    def _assemble(self, ch: "_Chunk", tok: _Tokens):
        """The chunk's token ids and labels, all examples one after another: each example's pieces
        gathered in one go, the trained ranges marked. -> (ids, labels, tokens per example, -1 where
        the template failed)."""
        consts = ch.consts
        n_texts = len(ch.texts)
        src = np.concatenate([tok.src] + [c.ids for c in consts]) if consts else tok.src
        const_at = np.cumsum([len(tok.src)] + [c.n for c in consts])[:-1].tolist() if consts else []
        lens = np.array(tok.length + [c.n for c in consts], dtype=np.int64)
        starts = np.array(tok.start + const_at, dtype=np.int64)
        refs = np.array(ch.refs, dtype=np.int64)
        if consts:
            refs = np.where(refs < 0, n_texts - 1 - refs, refs)            # const j -> n_texts + j
        seg_len = lens[refs]
        seg_dst = np.cumsum(seg_len) - seg_len                            # first token of each piece
        total = int(seg_len.sum())
        flat = src[np.repeat(starts[refs] - seg_dst, seg_len) + np.arange(total)]
        nrefs = np.array(ch.nrefs, dtype=np.int64)
        first = np.cumsum(nrefs) - nrefs
        ok = nrefs > 0
        sizes = np.full(len(nrefs), -1, dtype=np.int64)
        if total:
            sizes[ok] = np.add.reduceat(seg_len, first[ok])
        else:
            sizes[ok] = 0

        # trained spans -> token ranges [k0, stop) in the chunk
        range_starts: list = []
        range_stops: list = []
        by_bytes = self.bytes
        pos = np.maximum(sizes, 0)
        ex_base = np.cumsum(pos) - pos                     # each example's first token in the chunk
        slow = list(ch.slow)                               # examples labelled through offsets
        if ch.byte_spans:                                  # the others, all at once from the token lengths
            rows = np.array(ch.byte_spans, dtype=np.int64).reshape(-1, 4)
            if by_bytes is not None:
                try:
                    e = rows[:, 0]
                    k0, stop = _byte_ranges(flat, ex_base[e], ex_base[e] + pos[e], rows[:, 1], rows[:, 2],
                                            rows[:, 3], by_bytes.array, self.eot)
                except LookupError:  # a token that is not byte-level: through the offsets instead
                    by_bytes = None
                else:
                    kept = stop > k0
                    range_starts.append(k0[kept])
                    range_stops.append(stop[kept])
            if by_bytes is None:
                slow += sorted(set(rows[:, 0].tolist()))
        if slow:
            texts = ch.texts
            n_texts = len(texts)
            ending_by, starting_before = _piece_counts(tok, texts, ch.need, consts, self.backend, by_bytes)
            eot = self.eot
            starts_l, stops_l = [], []
            for x in slow:
                tok_base, size, f, m, spans = int(ex_base[x]), int(sizes[x]), int(first[x]), ch.nrefs[x], ch.items[x][1]
                refs_l = refs[f:f + m].tolist()
                seg_dst_l = seg_dst[f:f + m].tolist()
                seg_len_l = seg_len[f:f + m].tolist()
                cs = [0]                       # first character of each piece of this example
                for r in refs_l[:-1]:
                    cs.append(cs[-1] + (len(texts[r]) if r < n_texts else len(consts[r - n_texts].text)))
                for start, cend, tend in spans:
                    i = bisect_right(cs, start) - 1   # the first token that ends after the reply starts
                    k0 = seg_dst_l[i] + ending_by(refs_l[i], start - cs[i])
                    kc = ke = 0                # the first tokens that start at or after the reply's / turn's end
                    for c in (cend, max(tend, cend)):
                        i = bisect_right(cs, c) - 1
                        k = None
                        if i and c == cs[i]:   # at a piece's edge: the one before may end in empty tokens
                            k = starting_before(refs_l[i - 1], c - cs[i - 1])
                            k = seg_dst_l[i - 1] + k if k < seg_len_l[i - 1] else None
                        if k is None:
                            k = seg_dst_l[i] + starting_before(refs_l[i], c - cs[i])
                        kc, ke = ke, k
                    stop = _stop(flat, kc, ke, tok_base + size, eot)
                    if stop > k0:
                        starts_l.append(k0)
                        stops_l.append(stop)
            range_starts.append(np.array(starts_l, dtype=np.int64))
            range_stops.append(np.array(stops_l, dtype=np.int64))
        range_starts = np.concatenate(range_starts) if range_starts else np.zeros(0, dtype=np.int64)
        range_stops = np.concatenate(range_stops) if range_stops else np.zeros(0, dtype=np.int64)
        mark = np.bincount(range_starts, minlength=total + 1)[:total + 1] - \
            np.bincount(range_stops, minlength=total + 1)[:total + 1]
        labels = np.where(np.cumsum(mark[:total], dtype=np.int32) > 0, flat, np.int32(IGNORE_INDEX))
        return flat, labels, sizes

    def _keep(self, ch: "_Chunk", flat, labels, sizes) -> None:
        """Truncate, count the trained tokens, keep the examples that have some; report the rest."""
        n_items = len(ch.items) - len(ch.checks)
        sizes = sizes[:n_items]
        pos = np.maximum(sizes, 0)
        base = np.cumsum(pos) - pos
        keep = np.minimum(pos, self.max_seq_len)
        counted = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int32)))
        hi = base + keep
        trained = counted[hi] - counted[np.minimum(base + 1, hi)]   # the (shifted) loss never counts position 0
        max_len = self.max_seq_len
        examples = self.examples
        lengths_out = self.lengths_out
        if lengths_out is not None:
            lengths_out.extend(sizes.tolist())
        kept = trained > 0
        self.trained_tokens += int(trained.sum())
        self.kept_tokens += int(keep[kept].sum())
        for (conv, _), n, b, k, t in zip(ch.items, sizes.tolist(), base.tolist(), keep.tolist(), trained.tolist()):
            if t == 0:
                if 0 <= k < n:
                    self.emit(Issue(conv.line, None, f"{n} tokens: after truncation to {max_len} "
                                                     f"tokens no assistant tokens are left, so the example is skipped",
                                    "warning", "dropped"))
                continue
            examples.append(_example(flat[b:b + k], labels[b:b + k], conv.line, n - k))
        self.split_examples += sum(1 for m in ch.nrefs[:n_items] if m > 1)


def _example(input_ids, labels, line: int, truncated_by: int) -> EncodedExample:
    """EncodedExample(...), without the frozen dataclass __init__'s overhead (the same fields, set
    the same way; there is no __post_init__)."""
    ex = _new(EncodedExample)
    _set(ex, "input_ids", input_ids)
    _set(ex, "labels", labels)
    _set(ex, "line", line)
    _set(ex, "truncated_by", truncated_by)
    return ex


_new = object.__new__
_set = object.__setattr__


class _Chunk:
    """One chunk on its way: the texts to tokenize (each once; `need`: with offsets), the fixed
    pieces, and for each example (items) its conversation and trained spans, and its pieces
    (refs: i >= 0 is texts[i], i < 0 is consts[-1 - i]; nrefs pieces per example, 0 where the
    template failed). The trained spans are found from the token lengths (byte_spans: example,
    start, reply end, turn end in bytes, flat) or through offsets (slow: the examples). `checks`
    pairs an example with a copy of it tokenized whole, with offsets (added at the end)."""

    __slots__ = ("texts", "need", "index", "consts", "const_ref", "items", "refs", "nrefs", "checks", "fut",
                 "shortcuts", "byte_examples", "byte_spans", "slow")

    def __init__(self):
        self.texts: list[str] = []
        self.need: list[bool] = []
        self.index: dict[str, int] = {}
        self.consts: list[_Const] = []
        self.const_ref: dict[int, int] = {}
        self.items: list = []
        self.refs: list[int] = []
        self.nrefs: list[int] = []
        self.checks: list[tuple[int, int]] = []
        self.fut = None
        self.shortcuts = False   # some example is made of pieces, or its labels come from token lengths
        self.byte_examples = 0   # examples whose labels come from token lengths
        self.byte_spans: list[int] = []
        self.slow: list[int] = []

    def as_whole(self, render) -> "_Chunk":
        """The same examples, each rendered again (render(conv) -> (text, spans)) and tokenized
        whole, with offsets where it has trained text."""
        out = _Chunk()
        n_items = len(self.items) - len(self.checks)
        for (conv, _), m in zip(self.items[:n_items], self.nrefs):
            if m == 0:
                out.items.append((conv, None))
                out.nrefs.append(0)
                continue
            text, spans = render(conv)
            out.refs.append(len(out.texts))
            out.texts.append(text)
            out.need.append(bool(spans))
            if spans:
                out.slow.append(len(out.items))
            out.items.append((conv, spans))
            out.nrefs.append(1)
        return out


def _byte_ranges(flat, first, last, start, cend, tend, lengths, eot: frozenset):
    """Token ranges [k0, stop) of trained spans, all at once, for examples whose token offsets
    follow from the token lengths in bytes (_ByteLengths). Per span: its example's tokens are
    flat[first:last]; the reply starts at byte `start` and ends at `cend` of the example's text,
    its turn at `tend`. The same numbers as _ranges_from_offsets: k0 the first token ending after
    the reply starts, then up to the first end-of-turn token among those from the reply's end to
    the turn's end (_stop)."""
    tb = lengths[flat]
    if tb.size and tb.min() < 0:
        raise LookupError("a token that is not byte-level")
    ends = np.cumsum(tb)
    starts = ends - tb
    total = len(flat)
    base = np.where(first < total, starts[np.minimum(first, max(total - 1, 0))], ends[-1] if total else 0)
    k0 = np.clip(np.searchsorted(ends, base + start, "right"), first, last)
    kc = np.clip(np.searchsorted(starts, base + cend, "left"), first, last)
    ke = np.clip(np.searchsorted(starts, base + np.maximum(tend, cend), "left"), first, last)
    is_eot = np.isin(flat, np.array(sorted(eot), dtype=np.int32)) if eot else np.zeros(total, dtype=bool)
    count = np.cumsum(is_eot, dtype=np.int32)
    before = np.where(kc > 0, count[np.maximum(kc - 1, 0)] if total else 0, 0)
    j = np.searchsorted(count, before + 1, "left")            # the first end-of-turn token at or after kc
    after = (ke < last) & (is_eot[np.minimum(ke, max(total - 1, 0))] if total else False)
    stop = np.where(j < ke, j + 1, np.where(after, ke + 1, ke))
    return k0, stop


GROUP_TEXTS = 8        # texts joined into one tokenizer input (fewer Encoding objects to make and free)
GROUP_CHARS = 2048    # ... up to about this many characters


class _Tokens:
    """The tokens of a chunk's texts: all ids in one array (texts[i]'s are src[start[i]:start[i] +
    length[i]]), and for the texts tokenized with offsets, looks[i]: their tokenizers.Encoding
    (or a _ListPiece)."""

    __slots__ = ("src", "start", "length", "looks", "_lists")

    def __init__(self, src, start: list[int], length: list[int], looks: dict):
        self.src, self.start, self.length, self.looks = src, start, length, looks
        self._lists: dict[int, list] = {}

    def ids(self, i: int) -> list[int]:
        x = self._lists.get(i)
        if x is None:
            x = self._lists[i] = self.src[self.start[i]:self.start[i] + self.length[i]].tolist()
        return x

    @classmethod
    def from_pairs(cls, pairs) -> "_Tokens":
        """From (ids, offsets) per text (a tokenizer without a batch backend)."""
        lists = [p[0] for p in pairs]
        start, length, n = [], [], 0
        for x in lists:
            start.append(n)
            length.append(len(x))
            n += len(x)
        src = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=n)
        looks = {i: _ListPiece([o[0] for o in p[1]], [o[1] for o in p[1]]) for i, p in enumerate(pairs)}
        return cls(src, start, length, looks)


def _encode_texts(backend, texts: list[str], need: list[bool], sep: Optional[str] = None,
                  sep_id: Optional[int] = None) -> _Tokens:
    """Tokenize texts. Those whose character offsets are needed go through encode_batch, one
    input each; the others through encode_batch_fast (tokenizers >= 0.21), which skips the
    offsets, joined by `sep` (a special token that keeps them apart: see _SplitRules) several to
    an input, then cut apart at the separator tokens."""
    fast = getattr(backend, "encode_batch_fast", None)
    n_texts = len(texts)
    alone = [i for i in range(n_texts) if need[i] or fast is None]
    inputs: list[str] = []
    members: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in range(n_texts):
        if need[i] or fast is None:
            continue
        t = texts[i]
        if sep is None or sep in t:
            inputs.append(t)
            members.append([i])
            continue
        cur.append(i)
        size += len(t)
        if len(cur) >= GROUP_TEXTS or size >= GROUP_CHARS:
            inputs.append(sep.join([texts[j] for j in cur]))
            members.append(cur)
            cur, size = [], 0
    if cur:
        inputs.append(sep.join([texts[j] for j in cur]))
        members.append(cur)
    encs = fast(inputs, add_special_tokens=False) if inputs else []
    slow = backend.encode_batch([texts[i] for i in alone], add_special_tokens=False) if alone else []
    lists = [e.ids for e in encs]
    del encs
    lists += [e.ids for e in slow]
    total = sum(map(len, lists))
    src = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=total)
    start = [0] * n_texts
    length = [0] * n_texts
    seps = np.flatnonzero(src == sep_id).tolist() if sep is not None else []
    at = 0          # index into seps
    pos = 0
    redo: list[int] = []
    for ids, mem in zip(lists, members):
        end = pos + len(ids)
        if len(mem) == 1:
            start[mem[0]], length[mem[0]] = pos, len(ids)
        else:
            while at < len(seps) and seps[at] < pos:
                at += 1
            cuts = []
            while at < len(seps) and seps[at] < end:
                cuts.append(seps[at])
                at += 1
            if len(cuts) != len(mem) - 1:   # not cut where expected: these texts again, one by one
                redo += mem
            else:
                b = pos
                for i, c in zip(mem, cuts + [end]):
                    start[i], length[i] = b, c - b
                    b = c + 1
        pos = end
    looks = {}
    for i, e in zip(alone, slow):
        n = len(e.ids)
        start[i], length[i] = pos, n
        looks[i] = e
        pos += n
    if redo:
        extra = [e.ids for e in fast([texts[i] for i in redo], add_special_tokens=False)]
        for i, ids in zip(redo, extra):
            start[i], length[i] = pos, len(ids)
            pos += len(ids)
        src = np.concatenate([src, np.fromiter(chain.from_iterable(extra), dtype=np.int32,
                                               count=sum(map(len, extra)))])
    return _Tokens(src, start, length, looks)


def _piece_counts(tok: _Tokens, texts, need, consts, backend, by_bytes=None):
    """-> (ending_by(r, c), starting_before(r, c)): of piece r's tokens, how many end at or before
    its character c, how many start before c (the reference's bisects over the whole text's
    offsets, within one piece). Pieces r < len(texts) are texts[r], tokenized: tok.looks[r] is
    its tokenizers.Encoding (asked through char_to_token, without materialising all offsets; all
    offsets only for a character no token covers) or a _ListPiece; where the batch left offsets
    out, counted from the token lengths (by_bytes) or encoded again with offsets. The others are
    consts."""
    n_texts = len(texts)
    full: dict[int, _ListPiece] = {}
    again: dict[int, object] = {}
    looks = tok.looks

    def offsets(r: int) -> _ListPiece:
        p = full.get(r)
        if p is None:
            offs = encoding(r).offsets
            p = full[r] = _ListPiece([o[0] for o in offs], [o[1] for o in offs])
        return p

    def encoding(r: int):
        e = looks.get(r)
        if e is None:
            e = again.get(r)
            if e is None:
                e = again[r] = backend.encode(texts[r], add_special_tokens=False)
        return e

    def ending_by(r: int, c: int) -> int:
        if r >= n_texts:
            return bisect_right(consts[r - n_texts].ends, c)
        if c >= len(texts[r]):
            return tok.length[r]
        if by_bytes is not None and r not in looks and r not in again:
            try:
                return by_bytes.ending_by(tok.ids(r), texts[r], c)
            except LookupError:
                pass
        enc = encoding(r)
        if type(enc) is _ListPiece:
            return bisect_right(enc.ends, c)
        t = enc.char_to_token(c)  # the first token that covers c: with ordered offsets, the first ending after c
        return t if t is not None else bisect_right(offsets(r).ends, c)

    def starting_before(r: int, c: int) -> int:
        if r >= n_texts:
            return bisect_left(consts[r - n_texts].starts, c)
        if c <= 0:
            return 0
        if by_bytes is not None and r not in looks and r not in again:
            try:
                return by_bytes.starting_before(tok.ids(r), texts[r], c)
            except LookupError:
                pass
        enc = encoding(r)
        if type(enc) is _ListPiece:
            return bisect_left(enc.starts, c)
        to_chars = enc.token_to_chars
        n = tok.length[r]
        if c >= len(texts[r]):
            t = n
        else:
            t = enc.char_to_token(c)
            if t is None:
                return bisect_left(offsets(r).starts, c)
            if to_chars(t)[0] < c:
                t += 1
                while t < n and to_chars(t)[0] < c:
                    t += 1
                return t
        while t > 0 and to_chars(t - 1)[0] >= c:   # empty tokens at c
            t -= 1
        return t

    return ending_by, starting_before


def encode_conversations(tokenizer, conversations: Sequence[Conversation], max_seq_len: int,
                         on_issue: Optional[Callable[[Issue], None]] = None, chunk: int = 1024,
                         lengths_out: Optional[list] = None, plain: bool = False) -> list[EncodedExample]:
    """Encode many conversations fast (one template render each, pipelined batch tokenization,
    renderings tokenized in pieces where the tokenizer allows it). Gives the same arrays as
    encode_conversation. Returns the examples that have trained tokens after truncation; the
    others, and conversations the template cannot render, are reported through on_issue and left
    out. lengths_out, if given, receives each conversation's full token length before truncation
    (-1 if the template failed), in order. plain=True takes no shortcut (StreamEncoder)."""
    enc = StreamEncoder(tokenizer, max_seq_len, on_issue, lengths_out, chunk, plain=plain)
    try:
        for conv in conversations:
            enc.add(conv)
        return enc.finish()
    finally:
        enc.close()
