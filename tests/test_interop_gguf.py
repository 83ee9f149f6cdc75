"""GGUF export read back with gguf's own GGUFReader: every tensor (values equal after undoing the
llama Q/K permutation, the requested number format), every metadata key, the tokenizer; the
refusals for tokenizers llama.cpp cannot reproduce; the Ollama Modelfile; the hf/peft copies."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_interop_helpers import cli, model_folder_with, split_tokenizer, tiny_llama
from tinymodel import make_tiny_tokenizer

from finetune_desktop.engine import Model, ModelConfig, Tokenizer
from finetune_desktop.interop import InteropError
from finetune_desktop.interop.gguf_export import (LLAMA3_REGEX, QWEN2_REGEX, export_gguf, go_template, permute_qk,
                                                  unpermute_qk)

gguf = pytest.importorskip("gguf")
Q8 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("g") / "tiny")


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def values(t) -> np.ndarray:
    """A reader tensor as float32 in the HF (out, in) shape."""
    if t.tensor_type == Q8:
        return gguf.quants.dequantize(t.data, Q8).astype(np.float32)
    return np.asarray(t.data, dtype=np.float32)


HF_OF = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
         "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
         "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
         "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
         "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
         "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
         "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias"}


def hf_name(g: str) -> str:
    if g == "token_embd.weight":
        return "model.embed_tokens.weight"
    if g == "output_norm.weight":
        return "model.norm.weight"
    if g == "output.weight":
        return "lm_head.weight"
    _, l, rest = g.split(".", 2)
    return f"model.layers.{l}.{HF_OF[rest]}"


def check_tensors(path, folder, gguf_type, permuted: bool):
    m = Model.from_pretrained(folder)
    cfg = m.config
    _, tensors = read(path)
    expected = set(m.params) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert {hf_name(n) for n in tensors} == expected
    for name, t in tensors.items():
        ref = m.params[hf_name(name)]
        got = values(t)
        assert got.shape == ref.shape, name
        if permuted and (".attn_q." in name or ".attn_k." in name):
            got = unpermute_qk(got, cfg.num_attention_heads if ".attn_q." in name else cfg.n_kv_heads)
        if ref.ndim == 1 or gguf_type == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, ref, err_msg=name)
        elif gguf_type == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(got, ref.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            assert t.tensor_type == Q8, name
            # Q8_0: 32-value blocks with one f16 scale d = max|x| / 127 each: the error is at most half
            # a step plus the scale's f16 rounding (relative 2^-11) times 127 steps
            step = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127.0
            err = np.abs(got - ref).reshape(-1, 32)
            assert np.all(err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-12), name
            assert err.max() > 0, name  # really quantized
    return tensors


def test_permutation_round_trip_and_is_not_identity():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    p = permute_qk(w, 3)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 3), w)
    # within a head, HF's rotate-half pairs (i, i + hd/2) become adjacent rows (2i, 2i+1)
    hd = 8
    np.testing.assert_array_equal(p[0], w[0])
    np.testing.assert_array_equal(p[1], w[hd // 2])
    np.testing.assert_array_equal(p[2], w[1])


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_llama_export_reads_back(tiny, tmp_path, gguf_type):
    r = export_gguf(str(tiny), tmp_path / f"tiny-{gguf_type}.gguf", gguf_type)
    assert r.path.exists() and r.architecture == "llama" and r.notes == []
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place
    tensors = check_tensors(r.path, tiny, gguf_type, permuted=True)
    cfg = ModelConfig.from_json_file(tiny / "config.json")
    # embeddings + final norm; per layer 2 norms, 7 matrices and 7 biases (q,k,v,o,gate,up,down)
    assert r.num_tensors == len(tensors) == 2 + cfg.num_hidden_layers * 16
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_llama_metadata(tiny, tmp_path):
    r = export_gguf(str(tiny), tmp_path / "tiny.gguf", "q8_0")
    f, _ = read(r.path)
    cfg = ModelConfig.from_json_file(tiny / "config.json")
    tok = Tokenizer.from_pretrained(tiny)
    tj = json.loads((tiny / "tokenizer.json").read_text())
    expect = {
        "general.architecture": "llama", "general.name": "tiny", "general.file_type": 7,
        "llama.vocab_size": cfg.vocab_size, "llama.context_length": 512, "llama.embedding_length": 32,
        "llama.block_count": 2, "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 8, "llama.attention.value_length": 8,
        "llama.rope.dimension_count": 8, "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.ggml.eot_token_id": tok.token_to_id("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template,
    }
    for k, v in expect.items():
        assert f[k] == v, k
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert "tokenizer.ggml.bos_token_id" not in f  # the tokenizer has none
    assert "llama.rope.scaling.type" not in f
    # every key written is one we know about
    known = set(expect) | {"llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens",
                           "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "GGUF.version",
                           "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(f) == known
    vocab = tj["model"]["vocab"]
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size
    for t, i in vocab.items():
        assert tokens[i] == t
    for at in tj["added_tokens"]:
        assert tokens[at["id"]] == at["content"] and types[at["id"]] == 3  # CONTROL
    assert sum(1 for t in types if t == 1) == len(vocab) - len([a for a in tj["added_tokens"] if a["content"] in vocab])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges


def test_untied_model_writes_output_weight(tmp_path):
    folder = model_folder_with(tmp_path / "untied", make_tiny_tokenizer, tie=False)
    r = export_gguf(str(folder), tmp_path / "u.gguf", "f16")
    tensors = check_tensors(r.path, folder, "f16", permuted=True)
    assert "output.weight" in tensors


def test_qwen2_export_is_not_permuted_and_names_the_qwen2_pretokenizer(tmp_path):
    folder = model_folder_with(tmp_path / "qwen", lambda f: split_tokenizer(f, QWEN2_REGEX), model_type="qwen2")
    r = export_gguf(str(folder), tmp_path / "q.gguf", "f32")
    assert r.architecture == "qwen2"
    tensors = check_tensors(r.path, folder, "f32", permuted=False)
    assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_output.bias" not in tensors
    f, _ = read(r.path)
    assert f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["qwen2.attention.head_count_kv"] == 2


def test_llama3_regex_with_ignore_merges_is_llama_bpe(tmp_path):
    folder = model_folder_with(tmp_path / "l3", lambda f: split_tokenizer(f, LLAMA3_REGEX, ignore_merges=True),
                               model_type="llama",
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    r = export_gguf(str(folder), tmp_path / "l3.gguf", "f32")
    f, tensors = read(r.path)
    assert f["tokenizer.ggml.pre"] == "llama-bpe"
    cfg = ModelConfig.from_json_file(folder / "config.json")
    factors = values(tensors["rope_freqs.weight"])
    np.testing.assert_allclose(cfg.replace(rope_scaling=None).inv_freq() / factors, cfg.inv_freq(), rtol=1e-6)
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)


def test_mistral_exports_as_llama_with_the_window_as_context(tmp_path):
    folder = model_folder_with(tmp_path / "mis", make_tiny_tokenizer, model_type="mistral", sliding_window=128)
    r = export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    f, _ = read(r.path)
    assert f["general.architecture"] == "llama" and f["llama.context_length"] == 128
    assert any("sliding-window" in n for n in r.notes)
    check_tensors(r.path, folder, "f32", permuted=True)


def test_linear_rope_scaling_is_written(tmp_path):
    folder = model_folder_with(tmp_path / "lin", make_tiny_tokenizer, rope_scaling={"rope_type": "linear", "factor": 2.0})
    f, _ = read(export_gguf(str(folder), tmp_path / "lin.gguf").path)
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0


# ----------------------------------------------------------------------------- refusals
def _edit_tokenizer(folder, fn):
    tj = json.loads((folder / "tokenizer.json").read_text())
    fn(tj)
    (folder / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("case,match", [
    ("unknown_regex", "not one llama.cpp implements exactly"),
    ("llama3_without_ignore_merges", "ignore_merges=false"),
    ("byte_fallback", "byte_fallback"),
    ("normalizer", "normalizer 'Lowercase'"),
    ("nfc_on_gpt2", "normalizer 'NFC'"),
    ("lstrip", "lstrip=true"),
    ("prefix_space", "add_prefix_space=true"),
    ("metaspace", "'Metaspace'"),
    ("sentencepiece_only", "only a SentencePiece tokenizer.model"),
])
def test_refuses_tokenizers_llamacpp_cannot_reproduce(tmp_path, tiny, case, match):
    folder = tmp_path / case
    if case == "unknown_regex":
        model_folder_with(folder, lambda f: split_tokenizer(f, r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"))
    elif case == "llama3_without_ignore_merges":
        model_folder_with(folder, lambda f: split_tokenizer(f, LLAMA3_REGEX, ignore_merges=False))
    else:
        shutil.copytree(tiny, folder)
        edits = {
            "byte_fallback": lambda tj: tj["model"].__setitem__("byte_fallback", True),
            "normalizer": lambda tj: tj.__setitem__("normalizer", {"type": "Lowercase"}),
            "nfc_on_gpt2": lambda tj: tj.__setitem__("normalizer", {"type": "NFC"}),
            "lstrip": lambda tj: tj["added_tokens"][2].__setitem__("lstrip", True),
            "prefix_space": lambda tj: tj["pre_tokenizer"].__setitem__("add_prefix_space", True),
            "metaspace": lambda tj: tj.__setitem__("pre_tokenizer", {"type": "Metaspace", "replacement": "▁",
                                                                     "prepend_scheme": "first", "split": False}),
        }
        if case == "sentencepiece_only":
            (folder / "tokenizer.json").unlink()
            (folder / "tokenizer.model").write_bytes(b"\x00")
        else:
            _edit_tokenizer(folder, edits[case])
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(InteropError, match=match) as e:
        export_gguf(str(folder), out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_nfc_on_qwen2_is_exported_with_a_note(tmp_path):
    from tokenizers import normalizers

    folder = model_folder_with(tmp_path / "qn", lambda f: split_tokenizer(f, QWEN2_REGEX, normalizer=normalizers.NFC()),
                               model_type="qwen2")
    r = export_gguf(str(folder), tmp_path / "qn.gguf")
    assert any("NFC" in n for n in r.notes)


def test_bad_type_and_missing_model(tmp_path, tiny):
    with pytest.raises(InteropError, match="unknown GGUF type"):
        export_gguf(str(tiny), tmp_path / "x.gguf", "q4_0")
    with pytest.raises(InteropError, match="does not exist"):
        export_gguf(str(tmp_path / "nothing"), tmp_path / "x.gguf")


# ----------------------------------------------------------------------------- Modelfile
def test_modelfile_for_chatml(tiny, tmp_path):
    r = export_gguf(str(tiny), tmp_path / "tiny.gguf", "f32")
    text = r.modelfile.read_text()
    assert r.modelfile == tmp_path / "Modelfile"
    assert text.splitlines()[1] == "FROM ./tiny.gguf"
    tmpl = ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
            '{{ end }}{{ end }}<|im_start|>assistant\n')
    assert f'TEMPLATE """{tmpl}"""' in text
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text


def _fill_go(tmpl: str, msgs) -> str:
    """A tiny interpreter for exactly the Go template shape go_template writes (enough to check it)."""
    import re

    pre, rest = tmpl.split("{{ range .Messages }}", 1)
    body, gen = rest.rsplit("{{ end }}{{ end }}", 1)
    cases = dict(re.findall(r'{{ (?:else )?if eq \.Role "(\w+)" }}(.*?)(?={{ else if|\Z)', body, flags=re.S))
    out = ""
    if pre:
        m = re.match(r'{{ if or \(not \.Messages\) \(ne \(index \.Messages 0\)\.Role "system"\) }}(.*){{ end }}$',
                     pre, flags=re.S)
        assert m, pre
        if msgs[0]["role"] != "system":
            out += m.group(1)
    for msg in msgs:
        out += cases[msg["role"]].replace("{{ .Content }}", msg["content"])
    return out + gen


def test_go_template_matches_jinja_with_a_default_system_prompt():
    from finetune_desktop.engine.tokenizer import template_with_default_system
    from tinymodel import CHATML_TEMPLATE

    tok = Tokenizer.__new__(Tokenizer)
    tok.chat_template = template_with_default_system(CHATML_TEMPLATE, "You are kind.")
    tok._template = None
    tok.bos_token = tok.eos_token = tok.pad_token = tok.unk_token = None

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, add_generation_prompt=gen)

    tmpl = go_template(render)
    assert tmpl is not None and "You are kind." in tmpl
    for conv in ([{"role": "user", "content": "Hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                  {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]):
        assert _fill_go(tmpl, conv) == render(conv, True)


def test_untranslatable_template_gets_no_template_and_a_note(tmp_path, tiny):
    folder = tmp_path / "trim"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim "
                            "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                            "{{ '<|im_start|>assistant\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = export_gguf(str(folder), tmp_path / "out" / "t.gguf")
    text = r.modelfile.read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "")
    assert "# no TEMPLATE" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert any("no TEMPLATE" in n for n in r.notes)


# ----------------------------------------------------------------------------- CLI and copies
def test_cli_export_gguf_base_and_errors(tmp_path):
    p = cli("export", "base", "--format", "gguf", "--out", tmp_path / "base.gguf", "--gguf-type", "q8_0")
    assert p.returncode == 0, p.stderr
    assert f"wrote {tmp_path / 'base.gguf'} (llama, q8_0, 98 tensors" in p.stdout
    assert (tmp_path / "Modelfile").exists()
    p = cli("export", "base", "--format", "gguf", "--out", tmp_path / "x.gguf", "--gguf-type", "q4")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = cli("export", tmp_path / "missing", "--format", "hf", "--out", tmp_path / "hf")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "does not exist" in p.stderr


def test_hf_and_peft_copies(tmp_path, tiny):
    from test_training_helpers import conversations, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", conversations(8))
    run = tmp_path / "run"
    p = cli("train", data, "--out", run, "--base", tiny, "--epochs", 1, "--batch-size", 4, "--quiet")
    assert p.returncode == 0, p.stderr
    p = cli("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert p.returncode == 0, p.stderr
    names = sorted(x.name for x in (tmp_path / "hf").iterdir())
    assert names == sorted(x.name for x in (run / "model").iterdir())
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    p = cli("export", run, "--format", "peft", "--out", tmp_path / "peft")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    p = cli("export", run, "--format", "peft", "--out", tmp_path / "peft")
    assert p.returncode == 2 and "not empty" in p.stderr
    p = cli("export", tiny, "--format", "peft", "--out", tmp_path / "peft2")
    assert p.returncode == 2 and "not a run folder" in p.stderr
    # a full fine-tune has no adapter
    full = tmp_path / "full"
    shutil.copytree(run, full)
    shutil.rmtree(full / "adapter")
    p = cli("export", full, "--format", "peft", "--out", tmp_path / "peft3")
    assert p.returncode == 2 and "has no adapter" in p.stderr
    # the GGUF of the run is the merged model
    r = export_gguf(str(run), tmp_path / "run.gguf")
    check_tensors(r.path, run / "model", "f32", permuted=True)
