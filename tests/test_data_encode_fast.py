"""The encoder's shortcuts (tokenizing renderings in pieces, one tokenizer input for several
texts, token positions from the token lengths) against the plain way (each rendering tokenized
whole, with character offsets) and the prefix-rendering reference, on the sample files and on
made-up conversations: Korean text, weight-0 messages, several turns, truncation, special-token
text inside a message, text that Unicode normalization would change."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from finetune_desktop.data import Conversation, Message, encode_conversation, encode_conversations, validate_file
from finetune_desktop.data import stream as E
from finetune_desktop.data import pieces as P
from finetune_desktop.engine import Tokenizer
from finetune_desktop.training.loading import base_model_dir
from tinymodel import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["pirate_captain.jsonl", "pirate_captain_valid.jsonl", "gyeongsang_ajumma.jsonl",
           "gyeongsang_ajumma_valid.jsonl", "pirate_prompt_completion.jsonl", "pirate_qa.csv", "with_mistakes.jsonl"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def base():
    return Tokenizer.from_pretrained(base_model_dir())


def encode_both(tok, convs, max_seq_len, chunk=1024):
    """-> (fast encoder, plain encoder, fast issues, plain issues), each run to the end."""
    out = []
    for plain in (False, True):
        issues, lengths = [], []
        enc = E.StreamEncoder(tok, max_seq_len, on_issue=issues.append, lengths_out=lengths, chunk=chunk,
                              plain=plain)
        for c in convs:
            enc.add(c)
        enc.finish()
        out.append((enc, issues))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def assert_same(a, b, context=""):
    assert [e.line for e in a] == [e.line for e in b], context
    for x, y in zip(a, b):
        assert x.truncated_by == y.truncated_by, (context, x.line)
        assert np.array_equal(x.input_ids, y.input_ids), (context, x.line)
        assert np.array_equal(x.labels, y.labels), (context, x.line)
        assert x.input_ids.dtype == y.input_ids.dtype == np.int32 and x.labels.dtype == np.int32


def assert_matches_reference(tok, convs, examples, max_seq_len):
    ref = [encode_conversation(tok, c, max_seq_len) for c in convs]
    assert_same(examples, [r for r in ref if r.num_trained_tokens > 0], "reference")


def mixed(convs, seed=0):
    """The sample conversations, and some joined into several turns with a weight-0 reply."""
    rng = random.Random(seed)
    out = list(convs)
    for k in range(0, len(convs) - 1, 2):
        a, b = convs[k].messages, convs[k + 1].messages
        body = [m for m in a if m.role != "system"]
        body[-1] = Message("assistant", body[-1].content, weight=int(rng.random() < 0.5))
        out.append(Conversation(tuple(a[:1]) + tuple(body[1:] if a[0].role != "system" else body)
                                + tuple(m for m in b if m.role != "system"), 10_000 + k))
    return out


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("max_seq_len", [24, 512])
def test_shortcuts_match_plain_on_sample_files(name, max_seq_len, base, tiny):
    rep = validate_file(ROOT / "sample_data" / name)
    convs = mixed(rep.conversations)
    assert convs
    for tok in (base, tiny):
        fast, plain, fi, pi = encode_both(tok, convs, max_seq_len, chunk=64)
        assert_same(fast.examples, plain.examples, name)
        assert fast.lengths_out == plain.lengths_out
        assert [(i.line, i.code, i.message) for i in fi] == [(i.line, i.code, i.message) for i in pi]
        assert_matches_reference(tok, convs, fast.examples, max_seq_len)
        assert fast.split and fast.split_examples > 0          # the shortcuts were taken (and kept)
        assert plain.split_examples == 0 and plain.byte_examples == 0
    assert fast.bytes is not None and fast.byte_examples > 0  # the tiny tokenizer is byte-level too


def test_validate_file_is_the_same_with_and_without_shortcuts(base, tmp_path, monkeypatch):
    """The report a user sees, on a file with Korean, a weight-0 reply and a long example."""
    rows = [json.loads(x) for x in (ROOT / "sample_data" / "gyeongsang_ajumma.jsonl").read_text().splitlines()]
    rows[3]["messages"][2]["weight"] = 0
    rows[3]["messages"] += [{"role": "user", "content": "또 뭐 해요?"},
                            {"role": "assistant", "content": "밥 묵자! " * 40}]
    p = tmp_path / "k.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    fast = validate_file(p, tokenizer=base, max_seq_len=48)
    monkeypatch.setattr(E.StreamEncoder, "__init__", _plain_init(E.StreamEncoder.__init__))
    plain = validate_file(p, tokenizer=base, max_seq_len=48)
    assert fast.to_dict() == plain.to_dict()
    assert_same(fast.examples, plain.examples)
    assert any(w.code in ("too_long", "dropped") and w.line == 4 for w in fast.warnings)


def _plain_init(init):
    def plain_init(self, *a, **k):
        k["plain"] = True
        init(self, *a, **k)
    return plain_init


TEXTS = ["Hello! How are you today?", "안녕하세요. 밥 뭇나? 억수로 좋다 아이가.", "  spaces around  ", "\nnewline first",
         "a", "tabs\tand\r\nwindows lines", "<|endoftext|> typed in a message", "ends with a special <|im_end|>",
         "<|im_start|>user\nfake turn", "emoji 🙂 and café", "cafe\u0301 (decomposed)", "x" * 300]


def random_convs(seed, n=120):
    rng = random.Random(seed)
    system = "You are a kind assistant. " * 5
    out = []
    for k in range(n):
        msgs = [Message("system", system if rng.random() < 0.7 else rng.choice(TEXTS))] if rng.random() < 0.8 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append(Message("user", rng.choice(TEXTS)))
            msgs.append(Message("assistant", rng.choice(TEXTS), weight=int(rng.random() < 0.8)))
        if rng.random() < 0.2:
            msgs.append(Message("user", rng.choice(TEXTS)))
        out.append(Conversation(tuple(msgs), k + 1))
    return out


@pytest.mark.parametrize("max_seq_len", [16, 40, 10_000])
def test_shortcuts_match_plain_on_random_conversations(base, tiny, max_seq_len):
    convs = random_convs(max_seq_len)
    for tok in (base, tiny):
        fast, plain, fi, pi = encode_both(tok, convs, max_seq_len, chunk=17)
        assert_same(fast.examples, plain.examples)
        assert fast.lengths_out == plain.lengths_out
        assert [(i.line, i.code) for i in fi] == [(i.line, i.code) for i in pi]
        assert_matches_reference(tok, convs, fast.examples, max_seq_len)
        assert fast.split and fast.bytes is not None


def test_repeated_pieces_are_tokenized_once(base):
    """A long system prompt on every line goes to the tokenizer once per chunk."""
    system = "You are Captain Marigold Finch, a cheerful pirate captain who answers kindly. " * 8
    convs = [Conversation((Message("system", system), Message("user", f"Question {i}?"),
                           Message("assistant", f"Answer {i}, matey!")), i + 1) for i in range(300)]
    seen = []

    class Counting:
        def __init__(self, b):
            self.b = b

        def __getattr__(self, name):
            return getattr(self.b, name)

        def encode_batch_fast(self, texts, **k):
            seen.extend(texts)
            return self.b.encode_batch_fast(texts, **k)

        def encode_batch(self, texts, **k):
            seen.extend(texts)
            return self.b.encode_batch(texts, **k)

    tok = Tokenizer(Counting(base.backend), base.config, base.chat_template)
    fast = encode_conversations(tok, convs, 512, chunk=100)
    checked = 1 + 300 // E.StreamEncoder.VERIFY_EVERY   # tokenized whole as well, to check the shortcuts
    assert sum(x.count(system) for x in seen) <= 3 + checked   # once per chunk
    assert_same(fast, encode_conversations(base, convs, 512, plain=True))


def test_a_disagreeing_check_turns_the_shortcuts_off(base, monkeypatch):
    """If a shortcut ever gave other tokens than the plain way, the check catches it, the chunk is
    done again the plain way and the run goes on without shortcuts."""
    convs = random_convs(3, n=60)
    real = P.Layout.pieces

    def wrong(self, msgs, want_bytes=False):
        out, spans, trained, bspans = real(self, msgs, want_bytes)
        out = [x + " " if type(x) is str else x for x in out]   # every unit one character longer
        return out, spans, trained, bspans

    monkeypatch.setattr(P.Layout, "pieces", wrong)
    enc = E.StreamEncoder(base, 512, chunk=16)
    for c in convs:
        enc.add(c)
    got = enc.finish()
    assert not enc.split and enc.bytes is None and enc.split_examples == 0
    assert_same(got, encode_conversations(base, convs, 512, plain=True))


def test_wrong_token_lengths_are_caught(base, monkeypatch):
    convs = random_convs(4, n=40)
    real = P.ByteLengths.get

    def off_by_one(backend):
        b = real(backend)
        lengths = [x + 1 if x > 0 else x for x in b.lengths]
        return P.ByteLengths(lengths, b.nfc)

    monkeypatch.setattr(P.ByteLengths, "get", off_by_one)
    enc = E.StreamEncoder(base, 512, chunk=8)
    for c in convs:
        enc.add(c)
    got = enc.finish()
    assert enc.bytes is None
    assert_same(got, encode_conversations(base, convs, 512, plain=True))


def test_crossable():
    toks = ["<|im_start|>", "<|im_end|>"]
    assert not P.crossable(toks, "", True, "<|im_end|>\n<|im_start|>user\n", True)
    assert not P.crossable(toks, "<|im_end|>\n<|im_start|>", True, "user\n", True)
    # "<|im_" before the edge and "end|>" after it could be read as one token
    assert P.crossable(toks, "", True, "end|>\n", True)
    assert P.crossable(toks + ["\nX"], "<|im_end|>\n", True, "", True)
    assert not P.crossable(toks, "", False, "end|>", True)   # nothing before the start of the text


def test_tokenizers_that_look_at_positions_get_no_pieces(tiny):
    from tokenizers import Tokenizer as HF, normalizers, pre_tokenizers
    b = HF.from_str(tiny.backend.to_str())
    assert P.SplitRules.make(b) is not None and P.ByteLengths.get(b) is not None
    b.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first")])
    assert P.SplitRules.make(b) is None      # prepends only at the very start of a text
    b2 = HF.from_str(tiny.backend.to_str())
    b2.normalizer = normalizers.Lowercase()
    assert P.SplitRules.make(b2) is not None and P.ByteLengths.get(b2) is None  # changes the text
    b3 = HF.from_str(tiny.backend.to_str())
    b3.normalizer = normalizers.NFC()
    bl = P.ByteLengths.get(b3)
    assert bl is not None and bl.usable("café") and not bl.usable("cafe\u0301")


@pytest.mark.parametrize("normalizer", ["NFC", "Lowercase"])
def test_normalizing_tokenizers_match_plain(tiny, normalizer):
    from tokenizers import Tokenizer as HF, normalizers
    b = HF.from_str(tiny.backend.to_str())
    b.normalizer = getattr(normalizers, normalizer)()
    tok = Tokenizer(b, tiny.config, tiny.chat_template)
    convs = random_convs(5, n=80)
    fast, plain, _, _ = encode_both(tok, convs, 10_000, chunk=32)
    assert_same(fast.examples, plain.examples)
    assert_matches_reference(tok, convs, fast.examples, 10_000)


def _trained_tokenizer(kind: str) -> Tokenizer:
    """A small tokenizer of another family, trained on the sample files, with a ChatML template."""
    from tokenizers import Regex, Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [m.content for name in ("pirate_captain.jsonl", "gyeongsang_ajumma.jsonl")
             for c in validate_file(ROOT / "sample_data" / name).conversations for m in c.messages]
    texts += TEXTS * 3
    if kind == "llama3_style":      # regex split, then byte-level without its own regex
        tok = HF(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                       r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace_always":  # sentencepiece-like, a "▁" before every piece
        tok = HF(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials + ["<unk>"], show_progress=False)
    elif kind == "metaspace_first":   # a "▁" only at the very start: no pieces
        tok = HF(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials + ["<unk>"], show_progress=False)
    elif kind == "wordpiece_lower":   # BERT-like: lower-cases and splits on whitespace and punctuation
        tok = HF(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials + ["<unk>"], show_progress=False)
    else:                             # unigram
        tok = HF(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=1200, special_tokens=specials + ["<unk>"], unk_token="<unk>",
                                          show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    return Tokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, template)


@pytest.mark.parametrize("kind,pieces,by_bytes", [("llama3_style", True, True), ("metaspace_always", True, False),
                                                  ("metaspace_first", False, False), ("wordpiece_lower", True, False),
                                                  ("unigram", True, False)])
def test_other_tokenizer_families_match_plain(kind, pieces, by_bytes):
    tok = _trained_tokenizer(kind)
    convs = random_convs(7, n=100) + mixed(validate_file(ROOT / "sample_data" / "gyeongsang_ajumma.jsonl").conversations)
    for max_seq_len in (40, 10_000):
        fast, plain, fi, pi = encode_both(tok, convs, max_seq_len, chunk=32)
        assert_same(fast.examples, plain.examples, kind)
        assert fast.lengths_out == plain.lengths_out
        assert [(i.line, i.code) for i in fi] == [(i.line, i.code) for i in pi]
        assert_matches_reference(tok, convs, fast.examples, max_seq_len)
        assert (fast.split_examples > 0) == pieces and fast.split == pieces
        assert (fast.bytes is not None) == by_bytes
