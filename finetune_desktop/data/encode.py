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

Tokenizing many conversations (StreamEncoder) takes three more shortcuts (pieces.py), each
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
from typing import Callable, Optional, Sequence

import numpy as np

from .pieces import ByteLengths, Const, Layout, SplitRules, Tokens, byte_ranges, encode_texts, piece_counts
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


class StreamEncoder:
    """Encodes conversations as they arrive, in chunks: the template rendering and label work of
    one chunk (Python) overlaps with the batch tokenization of the previous chunk (Rust threads,
    without the GIL). Issues go to on_issue from the calling thread.

        enc = StreamEncoder(tok, 512, on_issue=...); enc.add(conv) ...; examples = enc.finish()

    The shortcuts of pieces.py (renderings tokenized in pieces, several texts per tokenizer
    input, token positions from the ids) are checked: the first example that takes one (per role
    pattern) and every VERIFY_EVERY-th after it is also rendered again and tokenized whole, with
    offsets, and its ids and labels compared; a difference turns them all off for the rest of the
    run, and the chunk at hand is done again the plain way. plain=True never takes them: each
    rendering is tokenized whole, with offsets (the plain way, kept to compare against).
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
        self.rules = SplitRules.make(self.backend) if shortcuts else None
        self.split = self.rules is not None                          # tokenize in pieces where a layout allows
        self.bytes = ByteLengths.get(self.backend) if shortcuts else None  # token positions from the ids
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

    def _layout(self, plan: Optional[_Plan], msgs) -> Optional[Layout]:
        if plan is None or not self.split:
            return None
        layout = plan.layout
        if layout == 0:
            try:
                layout = Layout.make(plan, msgs, self.rules)
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
            ch.fut = self._pool.submit(encode_texts, self.backend, texts, need, *sep)
        else:
            ch.fut = encode_texts(self.backend, texts, need, *sep)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._process(pending)
        self._pending = ch

    def _process(self, ch: "_Chunk") -> None:
        if self.backend is None:
            tok = Tokens.from_pairs([self.tok.encode_with_offsets(t) for t in ch.texts])
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
            flat, labels, sizes = self._assemble(ch, encode_texts(self.backend, ch.texts, ch.need))
        else:
            self.byte_examples += ch.byte_examples
        self._keep(ch, flat, labels, sizes)

    def _assemble(self, ch: "_Chunk", tok: Tokens):
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
                    k0, stop = byte_ranges(flat, ex_base[e], ex_base[e] + pos[e], rows[:, 1], rows[:, 2],
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
            ending_by, starting_before = piece_counts(tok, texts, ch.need, consts, self.backend, by_bytes)
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
            examples.append(EncodedExample(flat[b:b + k], labels[b:b + k], conv.line, n - k))
        self.split_examples += sum(1 for m in ch.nrefs[:n_items] if m > 1)


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
        self.consts: list[Const] = []
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
