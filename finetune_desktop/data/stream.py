"""Encoding many conversations at once, fast: StreamEncoder and encode_conversations.

The rules are encode.py's (the same ids and labels as encode_conversation gives one at a time);
this module adds the shortcuts that make a large file fast, described in encode.py's docstring,
and checks them against the plain way on samples as it goes.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Optional, Sequence

import numpy as np

from .encode import SpanFinder, _assemble, _backend, _eot, _Plan, _stop, template_messages
from .pieces import ByteLengths, Const, Layout, SplitRules, Tokens, byte_ranges, encode_texts, piece_counts
from .types import IGNORE_INDEX, Conversation, EncodedExample, Issue


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
