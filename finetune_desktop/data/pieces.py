"""Tokenizing many renderings fast, with the same tokens and positions as tokenizing each one
whole with character offsets (the plain way). Used by stream.StreamEncoder, which checks every
shortcut here against the plain way on samples as it goes.

  Layout       a role pattern's rendering as pieces cut at the template's own special tokens; a
               piece that repeats (a system prompt on every line) is tokenized once per chunk
  encode_texts several texts to one tokenizer input, joined by a special token, cut apart after
  ByteLengths  token positions from the ids alone, for byte-level BPE tokenizers; byte_ranges
               finds the trained token ranges of a whole chunk with a few numpy searches
  piece_counts the reference's offset bisects within one tokenized piece
"""
from __future__ import annotations

import json
import unicodedata
from bisect import bisect_left, bisect_right
from itertools import chain
from typing import Optional, Sequence

import numpy as np

from .types import Message

# A trained character span: (start of the reply, end of the reply text, end of the turn)
Span = tuple[int, int, int]


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
# token that cannot touch its neighbours (SplitRules._separator), and be cut apart at it after.
#
# This holds when (checked once per tokenizer and once per role pattern; otherwise the whole
# rendering is tokenized as before):
#   * no occurrence of any added token can reach across the edge of the template's special tokens
#     into the text next to them, whatever the contents (crossable);
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
    """Is the tokenizer component (normalizer, pre-tokenizer, post-processor) one of `allowed`, one
    that handles each piece on its own?"""
    if component is None:
        return True
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


class SplitRules:
    """What a tokenizer allows for tokenizing in pieces (None from make() when it allows nothing)."""

    __slots__ = ("first_pass", "contents", "backend", "sep", "sep_id")

    def __init__(self, backend, first_pass: dict, contents: list):
        self.backend = backend
        self.first_pass = first_pass  # content -> AddedToken, for tokens matched on the raw text
        self.contents = contents      # every added token's text
        self.sep, self.sep_id = self._separator()

    def _separator(self):
        """A special token that can stand between any two texts without touching them, so that
        several texts can go to the tokenizer as one input (encode_texts); (None, None) if none."""
        for content, t in sorted(self.first_pass.items()):
            if not t.special or t.lstrip or t.rstrip or content[0].isspace() or content[-1].isspace():
                continue
            if crossable(self.contents, "", True, content, True) or crossable(self.contents, content, True, "", True):
                continue
            ids = self.backend.encode(content, add_special_tokens=False).ids
            if len(ids) == 1:
                return content, ids[0]
        return None, None

    @classmethod
    def make(cls, backend) -> Optional["SplitRules"]:
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
        try:
            return cls(backend, first_pass, [t.content for t in added if t.content])
        except Exception:  # noqa: BLE001 - the tokenizer fails on its own special tokens: no shortcuts
            return None


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


def crossable(contents, left: str, left_open: bool, right: str, right_open: bool) -> bool:
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


class ListPiece:
    """Counts over one tokenized piece from lists of its offsets: how many tokens end at or before
    character c, how many start before c (the reference's bisects)."""

    __slots__ = ("starts", "ends", "n")

    def __init__(self, starts, ends):
        self.starts, self.ends, self.n = starts, ends, len(starts)

    def ending_by(self, c: int) -> int:
        return bisect_right(self.ends, c)

    def starting_before(self, c: int) -> int:
        return bisect_left(self.starts, c)


class Const(ListPiece):
    """A fixed piece of template text, tokenized once: ids and character offsets."""

    __slots__ = ("text", "ids", "nbytes")

    def __init__(self, text: str, ids, offsets):
        super().__init__([o[0] for o in offsets], [o[1] for o in offsets])
        self.text = text
        self.ids = np.asarray(ids, dtype=np.int32)
        self.nbytes = len(text.encode("utf-8"))


class Layout:
    """A role pattern's rendering as pieces: `seq` holds Const pieces and unit numbers; unit k is
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
    def make(cls, plan, msgs: Sequence[Message], rules: SplitRules) -> Optional["Layout"]:
        """From a plan (encode._Plan: the template's fixed text around the messages of a role
        pattern); None where the rendering cannot be cut into pieces safely."""
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
                if crossable(rules.contents, g[:p], j > 0, g[p:], j < n) or \
                        crossable(rules.contents, g[:q], j > 0, g[q:], j < n):
                    return None
                if p:
                    parts.append(g[:p])
                close()
                enc = rules.backend.encode(g[p:q], add_special_tokens=False)
                const = Const(g[p:q], enc.ids, enc.offsets)
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
        if not any(isinstance(x, Const) for x in seq):
            return None  # nothing to split at: tokenize the whole rendering
        return cls(seq, units, plan.tails)

    def pieces(self, msgs: Sequence[Message], want_bytes: bool = False):
        """-> (pieces: unit texts and Const pieces in order, trained spans in the whole text, the
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


class ByteLengths:
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

    _cache: dict = {}   # id(backend) -> (backend, ByteLengths or None); a few tokenizers at most

    def __init__(self, lengths: list[int], nfc: bool):
        self.lengths = lengths   # token id -> bytes (-1: not a byte-level token)
        self.nfc = nfc
        self.array = np.array(lengths, dtype=np.int64)

    @classmethod
    def get(cls, backend) -> Optional["ByteLengths"]:
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
    def _make(cls, backend) -> Optional["ByteLengths"]:
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
        for i in range(max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)):
            if i in added:
                lengths.append(added[i])
                continue
            tok = backend.id_to_token(i)
            lengths.append(len(tok) if tok is not None and all(ch in alphabet for ch in tok) else -1)
        return cls(lengths, norm is not None)

    def usable(self, text: str) -> bool:
        if not self.nfc or text.isascii():
            return True
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


def byte_ranges(flat, first, last, start, cend, tend, lengths, eot: frozenset):
    """Token ranges [k0, stop) of trained spans, all at once, for examples whose token offsets
    follow from the token lengths in bytes (ByteLengths). Per span: its example's tokens are
    flat[first:last]; the reply starts at byte `start` and ends at `cend` of the example's text,
    its turn at `tend`. The same numbers as _ranges_from_offsets: k0 the first token ending after
    the reply starts, then up to the first end-of-turn token among those from the reply's end to
    the turn's end (_stop)."""
    if flat.size and flat.max() >= len(lengths):
        raise LookupError("a token id beyond the vocabulary")
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


class Tokens:
    """The tokens of a chunk's texts: all ids in one array (texts[i]'s are src[start[i]:start[i] +
    length[i]]), and for the texts tokenized with offsets, looks[i]: their tokenizers.Encoding
    (or a ListPiece)."""

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
    def from_pairs(cls, pairs) -> "Tokens":
        """From (ids, offsets) per text (a tokenizer without a batch backend)."""
        lists = [p[0] for p in pairs]
        start, length, n = [], [], 0
        for x in lists:
            start.append(n)
            length.append(len(x))
            n += len(x)
        src = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=n)
        looks = {i: ListPiece([o[0] for o in p[1]], [o[1] for o in p[1]]) for i, p in enumerate(pairs)}
        return cls(src, start, length, looks)


def encode_texts(backend, texts: list[str], need: list[bool], sep: Optional[str] = None,
                  sep_id: Optional[int] = None) -> Tokens:
    """Tokenize texts. Those whose character offsets are needed go through encode_batch, one
    input each; the others through encode_batch_fast (tokenizers >= 0.21), which skips the
    offsets, joined by `sep` (a special token that keeps them apart: see SplitRules) several to
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
    return Tokens(src, start, length, looks)


def piece_counts(tok: Tokens, texts, need, consts, backend, by_bytes=None):
    """-> (ending_by(r, c), starting_before(r, c)): of piece r's tokens, how many end at or before
    its character c, how many start before c (the reference's bisects over the whole text's
    offsets, within one piece). Pieces r < len(texts) are texts[r], tokenized: tok.looks[r] is
    its tokenizers.Encoding (asked through char_to_token, without materialising all offsets; all
    offsets only for a character no token covers) or a ListPiece; where the batch left offsets
    out, counted from the token lengths (by_bytes) or encoded again with offsets. The others are
    consts."""
    n_texts = len(texts)
    full: dict[int, ListPiece] = {}
    again: dict[int, object] = {}
    looks = tok.looks

    def offsets(r: int) -> ListPiece:
        p = full.get(r)
        if p is None:
            offs = encoding(r).offsets
            p = full[r] = ListPiece([o[0] for o in offs], [o[1] for o in offs])
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
            except LookupError:  # (IndexError too: an id beyond the table)
                pass
        enc = encoding(r)
        if type(enc) is ListPiece:
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
            except LookupError:  # (IndexError too: an id beyond the table)
                pass
        enc = encoding(r)
        if type(enc) is ListPiece:
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
