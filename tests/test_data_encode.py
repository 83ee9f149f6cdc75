"""Encoding: chat template rendering, loss masks (assistant tokens + their end-of-turn token),
weight-0 masking, truncation, and the fast path agreeing with the prefix-rendering reference
on several real-world-shaped chat templates."""
import json
import random
import zlib

import numpy as np
import pytest

from finetune_desktop.data import (Conversation, DataError, Message, encode_conversation, encode_conversations,
                                   validate_file)
from finetune_desktop.data.encode import SpanFinder, spans_by_prefixes, template_messages
from finetune_desktop.engine import Tokenizer
from tinymodel import make_tiny_tokenizer

CHATML = None  # the tiny tokenizer's own template

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

MISTRAL = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
           "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
           "{% for message in msgs %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
           "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")

QWEN_DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
                       "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                       "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

PLAIN = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '### User: ' + message['content'] + '\n' }}"
         "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + '\n' }}"
         "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}")

EXTRA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<s>", "</s>",
                  "<start_of_turn>", "<end_of_turn>", "<bos>"]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


def make_tok(folder, template=None, bos=None, eos="<|im_end|>"):
    t = Tokenizer.from_pretrained(folder)
    if template is None:
        return t
    from tokenizers import Tokenizer as HF
    backend = HF.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens(EXTRA_SPECIALS)
    cfg = dict(t.config, bos_token=bos, eos_token=eos)
    return Tokenizer(backend, cfg, template)


@pytest.fixture(scope="module")
def tok(tok_folder):
    return make_tok(tok_folder)


def conv(*pairs, system=None, line=1):
    msgs = [Message("system", system)] if system else []
    for p in pairs:
        msgs.append(Message(*p) if isinstance(p, tuple) else p)
    return Conversation(tuple(msgs), line)


def trained_segments(tok, ex):
    segs, cur = [], []
    for i, lab in zip(ex.input_ids.tolist(), ex.labels.tolist()):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return [tok.decode(s) for s in segs]


# ------------------------------------------------------------------ ChatML basics

def test_labels_are_assistant_tokens_plus_end_of_turn(tok):
    c = conv(("user", "Hello! How are you today?"), ("assistant", "I am fine, thank you."), system="Be kind.")
    ex = encode_conversation(tok, c, 512)
    assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32
    assert tok.decode(ex.input_ids.tolist()) == tok.apply_chat_template([m.as_template_dict() for m in c.messages])
    assert trained_segments(tok, ex) == ["I am fine, thank you.<|im_end|>"]
    im_end = tok.token_to_id("<|im_end|>")
    pos = int(np.flatnonzero(ex.labels == im_end)[0])
    assert ex.labels[pos + 1:].tolist() == [-100] * (len(ex) - pos - 1)  # the newline after it is not trained
    assert ex.truncated_by == 0 and ex.line == 1
    assert ex.num_trained_tokens == int((ex.labels != -100).sum())


def test_multi_turn_weight_zero_is_masked(tok):
    c = conv(("user", "Hi"), Message("assistant", "Old answer.", 0), ("user", "What is the weather like?"),
             ("assistant", "It is sunny and warm."))
    ex = encode_conversation(tok, c, 512)
    assert trained_segments(tok, ex) == ["It is sunny and warm.<|im_end|>"]
    c2 = conv(("user", "Hi"), ("assistant", "Old answer."), ("user", "What is the weather like?"),
              ("assistant", "It is sunny and warm."))
    assert trained_segments(tok, encode_conversation(tok, c2, 512)) == ["Old answer.<|im_end|>",
                                                                       "It is sunny and warm.<|im_end|>"]


def test_messages_after_last_assistant_are_left_out(tok):
    base = conv(("user", "Hi"), ("assistant", "Hello there."))
    tail = Conversation(base.messages + (Message("user", "And then?"),), 1)
    assert template_messages(tail) == list(base.messages)
    a, b = encode_conversation(tok, base, 512), encode_conversation(tok, tail, 512)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)


def test_all_weight_zero_trains_nothing(tok):
    ex = encode_conversation(tok, conv(("user", "Hi"), Message("assistant", "Hello.", 0)), 512)
    assert ex.num_trained_tokens == 0
    warnings = []
    assert encode_conversations(tok, [conv(("user", "Hi"), Message("assistant", "Hello.", 0))], 512,
                                on_issue=warnings.append) == []


# ------------------------------------------------------------------ truncation

def test_truncation_keeps_the_start(tok):
    c = conv(("user", "Tell me a story about a cat."), ("assistant", "The cat sat on a boat. " * 20),
             system="You are a helpful assistant.")
    full = encode_conversation(tok, c, 10_000)
    n = int(np.flatnonzero(full.labels != -100)[0]) + 10  # ten reply tokens survive
    cut = encode_conversation(tok, c, n)
    assert len(cut) == n and cut.truncated_by == len(full) - n
    assert np.array_equal(cut.input_ids, full.input_ids[:n])
    assert np.array_equal(cut.labels, full.labels[:n])
    assert cut.num_trained_tokens == 10


def test_example_with_all_trained_tokens_cut_is_dropped_with_warning(tok, tmp_path):
    long_user = "The quick brown fox jumps over the lazy dog. " * 10
    c = conv(("user", long_user), ("assistant", "Yes."), line=3)
    issues = []
    out = encode_conversations(tok, [conv(("user", "Hi"), ("assistant", "Hello there.")), c], 30, on_issue=issues.append)
    assert len(out) == 1
    assert [(i.line, i.code, i.severity) for i in issues] == [(3, "dropped", "warning")]
    assert "30" in issues[0].message
    # through validate_file: the dropped example and a truncated one are reported by line
    lines = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
             {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Yes."}]},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_user}]}]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = validate_file(p, tokenizer=tok, max_seq_len=30)
    assert r.ok
    by = {(w.line, w.code) for w in r.warnings}
    assert (2, "dropped") in by and (3, "too_long") in by
    too_long = next(w for w in r.warnings if w.code == "too_long")
    n = len(encode_conversation(tok, conv(("user", "Hi"), ("assistant", long_user)), 10_000))
    assert f"{n} tokens" in too_long.message and f"last {n - 30} tokens" in too_long.message
    s = r.stats
    assert s["truncated_examples"] == 2 and s["dropped_examples"] == 1 and len(r.examples) == 2
    assert s["trained_tokens"] == sum(e.num_trained_tokens for e in r.examples)


def test_validate_with_tokenizer_stats(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Answer " * (i + 1)}]} for i in range(12)]
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r = validate_file(p, tokenizer=tok, max_seq_len=512, batch_size=4, tokens_per_second=100.0)
    s = r.stats
    exs = [encode_conversation(tok, c, 512) for c in r.conversations]
    assert s["length_unit"] == "tokens"
    assert s["total_tokens"] == sum(len(e) for e in exs)
    assert s["trained_tokens"] == sum(e.num_trained_tokens for e in exs)
    assert s["length_max"] == max(len(e) for e in exs)
    assert s["steps_per_epoch"] == 3
    assert s["seconds_per_epoch"] == pytest.approx(s["padded_tokens_per_epoch"] / 100.0)
    assert s["padded_tokens_per_epoch"] >= s["total_tokens"]
    json.dumps(r.to_dict())


# ------------------------------------------------------------------ templates: fast path == reference

TEXTS = ["Hello! How are you today?", "Arr, matey! The sea be calm.", "안녕하세요. 밥 뭇나? 억수로 좋다 아이가.",
         "  leading and trailing spaces  ", "\nnewline first", "user", "assistant", "a", "0123456789",
         "What is the weather like?\n\nIt is sunny.", "<not a special token>"]


def random_convs(seed, n=40, alternate=False):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append(Message("system", rng.choice(TEXTS)))
        for _ in range(rng.randint(1, 3)):
            msgs.append(Message("user", rng.choice(TEXTS)))
            msgs.append(Message("assistant", rng.choice(TEXTS), weight=int(rng.random() < 0.8)))
        if not alternate and rng.random() < 0.2:
            msgs.append(Message("user", rng.choice(TEXTS)))
        out.append(Conversation(tuple(msgs), k + 1))
    return out


@pytest.mark.parametrize("name,template,bos,eos", [
    ("chatml", CHATML, None, "<|im_end|>"),
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    ("mistral", MISTRAL, "<s>", "</s>"),
    ("qwen_default_system", QWEN_DEFAULT_SYSTEM, None, "<|im_end|>"),
    ("gemma", GEMMA, "<bos>", "<end_of_turn>"),
    ("plain", PLAIN, None, "<|endoftext|>"),
])
def test_fast_path_matches_reference(tok_folder, name, template, bos, eos):
    t = make_tok(tok_folder, template, bos, eos)
    convs = random_convs(zlib.crc32(name.encode()), n=60, alternate=(name == "mistral"))
    fast = encode_conversations(t, convs, 10_000)
    ref = [encode_conversation(t, c, 10_000) for c in convs]
    ref = [e for e in ref if e.num_trained_tokens > 0]
    assert [e.line for e in fast] == [e.line for e in ref]
    for a, b in zip(fast, ref):
        assert np.array_equal(a.input_ids, b.input_ids), (name, a.line)
        assert np.array_equal(a.labels, b.labels), (name, a.line)
    eot_text = {"plain": "\n"}.get(name, eos)
    for c, e in zip([c for c in convs if any(m.role == "assistant" and m.weight for m in template_messages(c))], ref):
        want = [m.content for m in template_messages(c) if m.role == "assistant" and m.weight]
        got = trained_segments(t, e)
        if name in ("llama3", "gemma"):
            want = [w.strip() for w in want]
        joined = "".join(got)
        for w in want:
            assert w + eot_text in joined, (name, w, got)
        assert joined.count(eot_text) >= len(want)
        for g in got:  # each trained run ends with the end-of-turn text and has no template text before the reply
            assert g.endswith(eot_text), (name, got)
            assert "[INST]" not in g and "<|im_start|>" not in g and "### User" not in g and "<start_of_turn>" not in g


def test_fast_path_uses_one_plan_per_role_pattern(tok):
    f = SpanFinder(tok)
    for c in random_convs(1, 30):
        text, spans = f(template_messages(c))
        assert (text, spans) == spans_by_prefixes(tok, template_messages(c))
    assert 0 < len(f.plans) <= 30
    assert all(p is not None for p in f.plans.values())


def test_template_error_names_the_line(tok_folder, tmp_path):
    t = make_tok(tok_folder, MISTRAL, "<s>", "</s>")
    bad = conv(("user", "one"), ("user", "two"), ("assistant", "three"), line=5)
    with pytest.raises(DataError) as ei:
        encode_conversation(t, bad, 512)
    assert "line 5" in str(ei.value) and "alternate" in str(ei.value)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
            {"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"},
                          {"role": "assistant", "content": "three"}]}]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r = validate_file(p, tokenizer=t)
    assert not r.ok and [(e.line, e.code) for e in r.errors] == [(2, "template_error")]


def test_encode_without_batch_backend_matches(tok):
    """A tokenizer without a `tokenizers` backend (only encode_with_offsets) gives the same result."""
    class Bare:
        def __init__(self, t):
            self.t = t
            self.end_of_turn_ids = t.end_of_turn_ids
            self.eos_token_id = t.eos_token_id
            self.chat_template = t.chat_template

        def apply_chat_template(self, *a, **k):
            return self.t.apply_chat_template(*a, **k)

        def encode_with_offsets(self, text):
            return self.t.encode_with_offsets(text)

    convs = random_convs(7, 20)
    a = encode_conversations(tok, convs, 64)
    b = encode_conversations(Bare(tok), convs, 64)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
        assert x.truncated_by == y.truncated_by


# ------------------------------------------------------------------ template check (no rendering per example)

@pytest.mark.parametrize("template,verbatim", [
    (None, True),                      # the tiny ChatML template
    (QWEN_DEFAULT_SYSTEM, True),
    (PLAIN, True),
    ("{% set ms = messages[1:] %}{% for m in ms %}{{ m.role + ': ' + m.content }}{% endfor %}", True),
    ("{% for m in messages %}{{ m['content'] ~ '\n' }}{% endfor %}{{ messages|length }}", True),
    (LLAMA3, False),                   # |trim changes the content
    (GEMMA, False),
    (MISTRAL, False),                  # the system content goes through a variable
    ("{{ messages | tojson }}", False),
    ("{% for m in messages %}{% if m['content'] %}{{ m['content'] }}{% endif %}{% endfor %}", False),
    ("{% for m in messages %}{{ m.get('content') }}{% endfor %}", False),
    ("{% for m in messages %}{{ m['content'].strip() }}{% endfor %}", False),
    ("{% for m in messages if m['content'] != 'x' %}{{ m['content'] }}{% endfor %}", False),
    ("{% set ns = namespace(x=messages) %}{% for m in ns.x %}{{ m['content']|trim }}{% endfor %}", False),
    ("{% for m in messages %}{% set m = 'x' %}{{ m }}{% endfor %}", False),
    ("{% for m in messages %}{{ m[key] }}{% endfor %}", False),
    ("{% macro f(message) %}{{ message['content']|upper }}{% endmacro %}{% for m in messages %}{{ f(m) }}{% endfor %}",
     False),
    ("{% for m in messages %", False),  # does not parse
])
def test_template_check(tok_folder, template, verbatim):
    from finetune_desktop.data.template_check import copies_content_verbatim
    source = template if template is not None else make_tok(tok_folder).chat_template
    assert copies_content_verbatim(source) is verbatim


def test_verbatim_mode_is_spot_checked(tok_folder, monkeypatch):
    """If the check wrongly calls a template verbatim, the rendered spot check turns the shortcut off."""
    import finetune_desktop.data.template_check as tc
    t = make_tok(tok_folder, LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    monkeypatch.setattr(tc, "copies_content_verbatim", lambda source: True)
    f = SpanFinder(t)
    assert f.verbatim
    c = conv(("user", "  padded  "), ("assistant", "  also padded  "))
    assert f(template_messages(c)) == spans_by_prefixes(t, template_messages(c))
    assert not f.verbatim


def test_template_check_accepts_an_injected_default_system_prompt(tok_folder):
    """The training code prepends a constant system message when a conversation has none."""
    from finetune_desktop.data.template_check import copies_content_verbatim
    base = make_tok(tok_folder).chat_template
    head = ("{%- set messages = messages if (messages and messages[0]['role'] == 'system') "
            "else [{'role': 'system', 'content': \"Be a pirate.\"}] + messages %}")
    assert copies_content_verbatim(head + base)
    assert not copies_content_verbatim("{{ messages or '' }}" + base)   # prints the list itself
    assert not copies_content_verbatim("{% set messages = messages if messages else 'x' %}" + base)
    t = make_tok(tok_folder, head + base)
    convs = random_convs(11, 40)
    fast = encode_conversations(t, convs, 10_000)
    ref = [e for e in (encode_conversation(t, c, 10_000) for c in convs) if e.num_trained_tokens > 0]
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert SpanFinder(t).verbatim
