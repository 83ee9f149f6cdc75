"""The exported GGUF in llama.cpp itself (llama-cpp-python, the optional `gguf-check` extra; these
tests skip cleanly without it): prompt token ids equal ours, greedy generation agrees with our
engine's, and llama.cpp's chat completion with the GGUF's own template stops at the end-of-turn
token. Run with -s to see the agreement numbers for f32, f16 and q8_0."""
from __future__ import annotations

import numpy as np
import pytest
from test_interop_helpers import sharp_llama

from finetune_desktop.interop.gguf_export import export_gguf
from finetune_desktop.training.loading import open_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[gguf-check]')")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "system", "content": "You are a cheerful pirate captain."},
     {"role": "user", "content": "What should I cook tonight?"}],
    [{"role": "user", "content": "오늘 점심 뭐 먹을지 모르겠어요."}],
    [{"role": "user", "content": "밥 뭇나? 날씨가 억수로 좋다 아이가."}],
    [{"role": "user", "content": "Tell me a short story about a cat and a boat."},
     {"role": "assistant", "content": "A cat sailed a boat.\n\nThe end!"},
     {"role": "user", "content": "  And then?  1234567 ... don't stop!!"}],
    [{"role": "user", "content": "Numbers 3.14159, code x_y = f(z) + 42; emoji 🙂 and tabs\tend."}],
]
NEW_TOKENS = 32


def load(path):
    # logits_all: every position's logits land in llm.scores (rows by position)
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0,
                           logits_all=True)


def llama_argmax_after(llm, ids) -> int:
    llm.reset()
    llm.eval(ids)
    return int(np.argmax(llm.scores[llm.n_tokens - 1]))


def llama_greedy(llm, prompt, n, stop):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if t in stop:
            break
        out.append(t)
        llm.eval([t])
    return out


def teacher_forced_agreement(llm, prompt, ours, stop):
    """Feed our greedy tokens; count the positions where llama.cpp's argmax is our next token."""
    llm.reset()
    llm.eval(prompt)
    target = list(ours) + ([min(stop)] if len(ours) < NEW_TOKENS else [])
    agree = 0
    for k, t in enumerate(target):
        if int(np.argmax(llm.scores[llm.n_tokens - 1])) == t:
            agree += 1
        if k + 1 < len(target):
            llm.eval([t])
    return agree, len(target)


def parity(spec, tmp_path, gguf_type):
    model, tok, _, _ = open_model(spec)
    path = export_gguf(spec, tmp_path / f"m-{gguf_type}.gguf", gguf_type).path
    llm = load(path)
    stop = set(tok.end_of_turn_ids)
    tok_equal = 0
    agree = total = same_seq = 0
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, add_generation_prompt=True)
        ours_ids = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tok_equal += theirs == ours_ids
        ours = list(model.generate(ours_ids, max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0,
                                   stop_ids=tuple(stop)))
        a, n = teacher_forced_agreement(llm, ours_ids, ours, stop)
        agree, total = agree + a, total + n
        same_seq += llama_greedy(llm, ours_ids, NEW_TOKENS, stop) == ours
    return tok_equal, agree / total, same_seq, llm, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sharp_llama(tmp_path_factory.mktemp("lc") / "tiny")


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("which", ["tiny", "base"])
def test_llamacpp_matches_our_engine(which, gguf_type, tiny, tmp_path):
    spec = str(tiny) if which == "tiny" else "base"
    tok_equal, agreement, same_seq, _, _ = parity(spec, tmp_path, gguf_type)
    print(f"\n{which} {gguf_type}: prompt ids equal {tok_equal}/{len(CONVERSATIONS)}, greedy next-token agreement "
          f"{agreement:.1%}, identical greedy replies {same_seq}/{len(CONVERSATIONS)}")
    assert tok_equal == len(CONVERSATIONS)
    if gguf_type == "f32":
        assert agreement >= 0.9
        assert same_seq >= len(CONVERSATIONS) - 1
    else:
        assert agreement >= 0.75  # rounding may flip near-ties of a tiny random model


def test_llamacpp_chat_completion_stops_at_end_of_turn(tmp_path):
    model, tok, _, _ = open_model("base")
    path = export_gguf("base", tmp_path / "base.gguf", "f32").path
    llm = load(path)
    meta = llm.metadata
    assert meta.get("tokenizer.chat_template") == tok.chat_template
    stop = set(tok.end_of_turn_ids)
    stopped = 0
    for conv in CONVERSATIONS:
        ours_ids = tok.encode(tok.apply_chat_template(conv, add_generation_prompt=True))
        ours = list(model.generate(ours_ids, max_new_tokens=200, temperature=0.0, stop_ids=tuple(stop)))
        if len(ours) == 200:
            continue  # our engine did not end this turn either
        r = llm.create_chat_completion(messages=conv, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=240)
        choice = r["choices"][0]
        text = tok.decode(ours, skip_special_tokens=True)
        print(f"\nllama.cpp: {choice['message']['content']!r}\nours:      {text!r}")
        assert choice["finish_reason"] == "stop", choice
        assert "<|im_end|>" not in choice["message"]["content"]
        assert choice["message"]["content"] == text
        stopped += 1
    assert stopped >= 3


def _variant(kind, folder):
    from test_interop_helpers import model_folder_with, split_tokenizer
    from tinymodel import make_tiny_tokenizer

    from finetune_desktop.interop.gguf_export import LLAMA3_REGEX, QWEN2_REGEX

    if kind == "qwen2":
        return model_folder_with(folder, lambda f: split_tokenizer(f, QWEN2_REGEX), model_type="qwen2", tie=False)
    if kind == "llama3":
        return model_folder_with(folder, lambda f: split_tokenizer(f, LLAMA3_REGEX, ignore_merges=True),
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "linear_rope":
        return model_folder_with(folder, make_tiny_tokenizer, rope_scaling={"rope_type": "linear", "factor": 4.0})
    if kind == "mistral":
        return model_folder_with(folder, make_tiny_tokenizer, model_type="mistral", sliding_window=256, tie=False)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "linear_rope", "mistral"])
def test_llamacpp_matches_our_engine_on_each_family(kind, tmp_path):
    """Random tiny models of each family, norms and biases randomised too: every position's
    logits of llama.cpp against ours on every prompt, and the prompt token ids."""
    folder = _variant(kind, tmp_path / kind)
    model, tok, _, _ = open_model(str(folder))
    llm = load(export_gguf(str(folder), tmp_path / f"{kind}.gguf", "f32").path)
    worst = 0.0
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, add_generation_prompt=True)
        ids = tok.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, kind
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: llm.n_tokens])
        ours = model.logits(np.asarray([ids]))[0]
        worst = max(worst, float(np.abs(theirs - ours).max()))
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95, kind
    print(f"\n{kind}: max |logit difference| {worst:.2e}")
    assert worst < 1e-3
