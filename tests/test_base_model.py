"""The embedded base model that ships in finetune_desktop/resources/base_model."""
import json

import numpy as np
import pytest

from finetune_desktop.engine import Model, Tokenizer
from finetune_desktop.training.loading import base_model_dir, resolve_model_spec as resolve_model_path

FOLDER = base_model_dir()
pytestmark = pytest.mark.skipif(not (FOLDER / "model.safetensors").exists(), reason="no embedded base model")


@pytest.fixture(scope="module")
def base():
    return Model.from_pretrained(FOLDER), Tokenizer.from_pretrained(FOLDER)


def test_folder_is_a_complete_small_hf_model():
    names = {p.name for p in FOLDER.iterdir()}
    for need in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert need in names, f"{need} missing from {FOLDER}"
    total = sum(p.stat().st_size for p in FOLDER.iterdir())
    assert total < 40 * 2**20, f"base model folder is {total / 2**20:.1f} MB (limit 40 MB)"
    assert "chat_template" in json.loads((FOLDER / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert resolve_model_path("base") == FOLDER


def test_architecture_has_biases_and_tied_embeddings(base):
    m, tok = base
    c = m.config
    assert c.attention_bias and c.mlp_bias and c.tie_word_embeddings
    assert 4000 <= c.vocab_size <= 8192 and c.vocab_size == tok.vocab_size
    assert "model.layers.0.self_attn.q_proj.bias" in m.params and "lm_head.weight" not in m.params
    # pretrained, not random: trained norms are far from their initial value of 1
    assert np.abs(m.params["model.layers.0.input_layernorm.weight"] - 1).mean() > 0.05


def test_chat_template_renders_chatml(base):
    _, tok = base
    s = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "안녕!"}],
                                add_generation_prompt=True)
    assert s == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n안녕!<|im_end|>\n<|im_start|>assistant\n", s
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in tok.end_of_turn_ids
    assert tok.decode(tok.encode("경상도 사투리 and English")) == "경상도 사투리 and English"


def test_greedy_reply_to_hello_ends_within_128_tokens(base):
    m, tok = base
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True))
    gen = m.generate(ids, max_new_tokens=129, temperature=0, stop_ids=tok.end_of_turn_ids)
    out = list(gen)
    assert len(out) < 128, f"no end of turn within 128 tokens: {tok.decode(out)!r}"
    reply = tok.decode(out).strip()
    assert reply and all(ch.isprintable() for ch in reply), repr(reply)


def test_loads_in_transformers_with_the_same_logits(base):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m, tok = base
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(FOLDER), torch_dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    msgs = [{"role": "user", "content": "What should I eat for breakfast?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = m.logits(np.array([ids]))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"relative logit difference {err:.2e}"


def test_meets_the_issue_targets_on_held_out_dialogs_and_everyday_questions(base):
    """The shipped model's acceptance numbers, recomputed from the files: held-out bits per
    byte <= 2.0 over the 200 held-out dialogs, >= 95 % of greedy replies to the 40 everyday
    questions end within 128 tokens, distinct-2 of those replies >= 0.5."""
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    import eval_base

    model, tok = base
    r = eval_base.evaluate(model, tok, tools / "corpus" / "heldout_dialogs_en.jsonl", max_new=128)
    assert r["heldout_conversations"] == 200
    assert r["heldout_bpb"] <= 2.0, r["heldout_bpb"]
    assert r["ended_fraction"] >= 0.95, r["ended_fraction"]
    assert r["distinct_2"] >= 0.5, r["distinct_2"]
    # and no slide back: the shipped model measured 1.008; the first one (1.905) would fail here
    assert r["heldout_bpb"] <= 1.1, r["heldout_bpb"]
