"""Checkpoints and safety: every broken model folder gets an error naming the file and the problem,
nothing is ever unpickled or executed, sharded and half-precision files load, configs in
transformers v4 and v5 styles agree, the chat template runs sandboxed, and writes are atomic."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from finetune_desktop.engine import LoraConfig, Model, ModelConfig, ModelFormatError
from finetune_desktop.engine import checkpoint as ckpt
from finetune_desktop.engine import model as model_module

CFG = ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                  tie_word_embeddings=True, max_position_embeddings=64)


def tiny_model(cfg=CFG, seed=0) -> Model:
    m = Model.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for k, v in m.params.items():  # biases and norms random too
        v += 0.1 * rng.standard_normal(v.shape).astype(v.dtype)
    return m


@pytest.fixture
def saved(tmp_path) -> tuple[Model, Path]:
    m = tiny_model()
    m.save_pretrained(tmp_path / "m")
    return m, tmp_path / "m"


def write_header_file(path: Path, header: dict, data: bytes = b"") -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


IDS = np.array([[1, 5, 9, 2, 30, 7]])


# ----------------------------------------------------------------------------- loading works
def test_save_and_load_round_trip_f32(saved):
    m, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = Model.from_pretrained(folder)
    assert back.config.to_hf_dict() == m.config.to_hf_dict()
    for k, v in m.params.items():
        np.testing.assert_array_equal(back.params[k], v, err_msg=k)
    cfgd = json.loads((folder / "config.json").read_text())
    assert cfgd["architectures"] == ["LlamaForCausalLM"] and cfgd["torch_dtype"] == "float32"
    assert "lm_head.weight" not in ckpt.read_safetensors(folder / "model.safetensors")  # tied: not stored


@pytest.mark.parametrize("dtype,np_dtype", [("F16", np.float16), ("BF16", None)])
def test_save_half_precision_round_trip(tmp_path, dtype, np_dtype):
    m = tiny_model()
    m.save_pretrained(tmp_path / "h", dtype=dtype)
    back = Model.from_pretrained(tmp_path / "h")
    assert back.dtype == np.float32
    w = m.params["model.layers.0.mlp.up_proj.weight"]
    got = back.params["model.layers.0.mlp.up_proj.weight"]
    if np_dtype is not None:
        np.testing.assert_array_equal(got, w.astype(np_dtype).astype(np.float32))
    else:
        rel = np.abs(got - w).max() / np.abs(w).max()
        assert 0 < rel < 2 ** -8, f"BF16 rounding error {rel:.2e}"
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == \
        {"F16": "float16", "BF16": "bfloat16"}[dtype]


def test_bf16_writer_rounds_to_nearest_even(tmp_path):
    one = 1.0
    vals = np.array([one, one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20, -2.5, 0.0, 3e38, -1e-40],
                    dtype=np.float32)
    ckpt.write_safetensors_bf16(tmp_path / "b.safetensors", {"x": vals, "m": vals.reshape(2, 4)})
    got = ckpt.read_safetensors(tmp_path / "b.safetensors")
    expect = np.array([1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, -2.5, 0.0, 2.9999e38, 0.0], np.float32)
    np.testing.assert_allclose(got["x"][:7], expect[:7], rtol=2 ** -9)
    assert got["x"][1] == 1.0, "a tie (1 + 2^-8) rounds to the even neighbour 1.0"
    assert got["x"][2] == 1.0 + 2 ** -6, "1 + 3*2^-8 is a tie that rounds up to the even 1 + 2^-6"
    assert got["m"].shape == (2, 4)


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import save_file
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5, -2.0], np.float16),
         "c": np.arange(5, dtype=np.int64), "s": np.array(3.0, dtype=np.float64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    got = ckpt.read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], t["a"])
    assert got["b"].dtype == np.float32 and got["b"].tolist() == [1.5, -2.0]
    assert got["c"].dtype == np.int64 and got["c"].tolist() == [0, 1, 2, 3, 4]
    assert got["s"].shape == () and got["s"] == 3.0


def test_sharded_checkpoint_with_index_loads(saved, tmp_path):
    m, _ = saved
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(m.params)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    wm = {}
    for shard, keys in shards.items():
        ckpt.write_safetensors(folder / shard, {k: m.params[k] for k in keys})
        wm.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (folder / "config.json").write_text(json.dumps(m.config.to_hf_dict()))
    back = Model.from_pretrained(folder)
    np.testing.assert_array_equal(back.logits(IDS), m.logits(IDS))

    # an index naming a tensor its shard does not hold
    wm2 = dict(wm, **{"model.layers.9.ghost.weight": "model-00001-of-00002.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm2}))
    with pytest.raises(ModelFormatError, match=r"model\.safetensors\.index\.json.*ghost"):
        Model.from_pretrained(folder)
    # an index pointing outside the folder
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(ModelFormatError, match="not a plain file name"):
        Model.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="weight_map"):
        Model.from_pretrained(folder)


def test_run_folder_model_subfolder_is_found(saved, tmp_path):
    m, folder = saved
    run = tmp_path / "run"
    run.mkdir()
    folder.rename(run / "model")
    back = Model.from_pretrained(run)
    np.testing.assert_array_equal(back.logits(IDS), m.logits(IDS))


# ----------------------------------------------------------------------------- broken folders
class _Payload:
    """Unpickling this would create a marker file: proves nothing was unpickled."""
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_only_pytorch_model_bin_is_refused_and_never_unpickled(saved, tmp_path):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    p = _Payload()
    p.marker = str(marker)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(p))
    with pytest.raises(ModelFormatError) as ei:
        Model.from_pretrained(folder)
    msg = str(ei.value)
    assert str(folder) in msg and ".bin" in msg and "never unpickle" in msg, msg
    assert "safetensors" in msg, f"the message should say what to do: {msg}"
    assert not marker.exists(), "the pickle was executed!"


def test_adapter_bin_only_is_refused(saved, tmp_path):
    m, _ = saved
    m.add_lora(LoraConfig(r=2))
    m.save_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(ModelFormatError, match=r"adapter_model\.bin.*pickle"):
        m.load_adapter(tmp_path / "ad")


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(ModelFormatError, match="no such folder"):
        Model.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(ModelFormatError, match=r"no model\.safetensors"):
        Model.from_pretrained(tmp_path / "empty")


def test_missing_config_json(saved):
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json.*missing") as ei:
        Model.from_pretrained(folder)
    assert str(folder) in str(ei.value)


def test_config_json_not_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{'vocab_size': 37,}")
    with pytest.raises(ModelFormatError, match=r"config\.json: not valid JSON"):
        Model.from_pretrained(folder)
    (folder / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelFormatError, match=r"config\.json: not valid JSON"):
        Model.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelFormatError, match="JSON object"):
        Model.from_pretrained(folder)


def test_unknown_architecture(saved):
    _, folder = saved
    d = json.loads((folder / "config.json").read_text())
    d["architectures"] = ["GPT2LMHeadModel"]
    d["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelFormatError, match=r"config\.json: architecture 'GPT2LMHeadModel' is not supported"):
        Model.from_pretrained(folder)


@pytest.mark.parametrize("change,pattern", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(pretraining_tp=2), "pretraining_tp"),
])
def test_unsupported_options_are_refused(saved, change, pattern):
    _, folder = saved
    d = json.loads((folder / "config.json").read_text())
    d.update(change)
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelFormatError, match=pattern):
        Model.from_pretrained(folder)


def test_missing_required_config_key(saved):
    _, folder = saved
    d = json.loads((folder / "config.json").read_text())
    del d["hidden_size"]
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelFormatError, match="hidden_size"):
        Model.from_pretrained(folder)


def test_truncated_safetensors(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: the file is truncated: tensor .* needs bytes"):
        Model.from_pretrained(folder)
    f.write_bytes(data[:5])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt safetensors file"):
        Model.from_pretrained(folder)


def test_garbage_header_length(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt safetensors header \(header length"):
        Model.from_pretrained(folder)


def test_header_not_json(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt safetensors header \(not valid JSON"):
        Model.from_pretrained(folder)
    write_header_file(f, [1, 2])
    with pytest.raises(ModelFormatError, match="not a JSON object"):
        Model.from_pretrained(folder)




@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},            # size does not match the shape
    {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},            # runs past the end of the data
    {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]},             # unknown dtype
    {"dtype": "F32", "shape": [4]},                                     # no offsets
    {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},       # negative dimensions
    {"dtype": "F32", "shape": ["a", 4], "data_offsets": [0, 16]},       # non-integer dimension
    {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]},        # non-integer offsets
    {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]},
])
def test_bad_header_entries_name_the_file(tmp_path, entry):
    f = tmp_path / "bad.safetensors"
    write_header_file(f, {"w": entry}, b"\0" * 16)
    with pytest.raises(ModelFormatError) as ei:
        ckpt.read_safetensors(f)
    assert str(f) in str(ei.value) and "'w'" in str(ei.value), str(ei.value)


def _rewrite_weights(folder: Path, fn):
    t = ckpt.read_safetensors(folder / "model.safetensors")
    fn(t)
    ckpt.write_safetensors(folder / "model.safetensors", t)


def test_tensor_with_wrong_shape(saved):
    _, folder = saved
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(folder, lambda t: t.__setitem__(name, np.zeros((16, 16), np.float32)))
    with pytest.raises(ModelFormatError) as ei:
        Model.from_pretrained(folder)
    msg = str(ei.value)
    assert str(folder) in msg and name in msg and "(16, 16)" in msg and "(8, 16)" in msg, msg


def test_missing_tensor(saved):
    _, folder = saved
    name = "model.layers.0.mlp.down_proj.bias"
    _rewrite_weights(folder, lambda t: t.pop(name))
    with pytest.raises(ModelFormatError, match=rf"{name.replace('.', '[.]')}' is missing"):
        Model.from_pretrained(folder)


def test_extra_unexpected_tensor(saved):
    _, folder = saved
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", np.ones(4, np.float32)))
    with pytest.raises(ModelFormatError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        Model.from_pretrained(folder)


def test_rotary_inv_freq_buffers_and_tied_lm_head_are_accepted(saved):
    m, folder = saved

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()  # some exporters store the tied copy

    _rewrite_weights(folder, add)
    back = Model.from_pretrained(folder)
    assert "lm_head.weight" not in back.params and not any("inv_freq" in k for k in back.params)
    np.testing.assert_array_equal(back.logits(IDS), m.logits(IDS))


# ----------------------------------------------------------------------------- config styles
BASE_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 37, "hidden_size": 64,
           "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.mark.parametrize("v4,v5", [
    ({"rope_theta": 5000.0},
     {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}),
    ({"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
     {"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0}}),
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_v5_rope_parameters_equal_v4_keys(v4, v5):
    a = ModelConfig.from_hf_dict({**BASE_HF, **v4})
    b = ModelConfig.from_hf_dict({**BASE_HF, **v5})
    assert a.rope_theta == b.rope_theta
    np.testing.assert_array_equal(a.inv_freq(), b.inv_freq())
    plain = 1.0 / a.rope_theta ** (np.arange(0, 32, 2) / 32)
    if "rope_scaling" in v4:
        assert not np.allclose(a.inv_freq(), plain), "the scaling must change the frequencies"
    else:
        np.testing.assert_allclose(a.inv_freq(), plain, rtol=1e-12)


def test_linear_and_llama3_scaling_values():
    lin = ModelConfig.from_hf_dict({**BASE_HF, "rope_theta": 100.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    plain = 1.0 / 100.0 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(lin.inv_freq(), plain / 2.0, rtol=1e-12)
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    l3 = ModelConfig.from_hf_dict({**BASE_HF, "rope_theta": 10000.0, "rope_scaling": sc}).inv_freq()
    plain = 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32)
    wl = 2 * np.pi / plain
    hi = wl < 64 / 4  # short wavelengths untouched
    lo = wl > 64 / 1  # long wavelengths divided by the factor
    assert hi.any() and lo.any() and (~hi & ~lo).any(), "pick a config that exercises all three bands"
    np.testing.assert_allclose(l3[hi], plain[hi], rtol=1e-12)
    np.testing.assert_allclose(l3[lo], plain[lo] / 8.0, rtol=1e-12)
    mid = ~hi & ~lo
    assert np.all(l3[mid] < plain[mid]) and np.all(l3[mid] > plain[mid] / 8.0)


def test_config_round_trip_keeps_unknown_keys():
    d = {**BASE_HF, "rope_theta": 123.0, "my_custom_key": [1, 2], "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf_dict(d)
    back = cfg.to_hf_dict()
    assert back["my_custom_key"] == [1, 2] and back["rope_theta"] == 123.0 and back["tie_word_embeddings"] is True
    again = ModelConfig.from_hf_dict(back)
    assert again.to_hf_dict() == back and again.hd == cfg.hd


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_without_tokenizer_json(tmp_path):
    from finetune_desktop.engine import Tokenizer
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json: tokenizer file is missing"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ModelFormatError, match="SentencePiece"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json: cannot be read"):
        Tokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    from tinymodel import make_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


def _tok_with_template(folder, template):
    from finetune_desktop.engine import Tokenizer
    t = Tokenizer.from_pretrained(folder)
    t.chat_template, t._template = template, None
    return t


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
])
def test_chat_template_sandbox_blocks_attribute_access(tok_folder, tmp_path, monkeypatch, template):
    from jinja2.exceptions import SecurityError, UndefinedError
    monkeypatch.chdir(tmp_path)
    t = _tok_with_template(tok_folder, template)
    try:
        out = t.apply_chat_template([{"role": "user", "content": "hi"}])
    except (SecurityError, ModelFormatError, UndefinedError):
        out = None
    assert not (tmp_path / "MARKER").exists(), "the template executed code"
    if out is not None:  # rendered as an empty Undefined: nothing of Python's internals leaks out
        assert "class" not in out and "function" not in out and "module" not in out, out


def test_chat_template_from_jinja_file_and_generation_prompt(tok_folder, tmp_path):
    import shutil
    from finetune_desktop.engine import Tokenizer
    folder = tmp_path / "t2"
    shutil.copytree(tok_folder, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    t = Tokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "hi"}]
    assert t.apply_chat_template(msgs) == "[user]hi"
    assert t.apply_chat_template(msgs, add_generation_prompt=True) == "[user]hi[assistant]"
    t0 = Tokenizer.from_pretrained(tok_folder)
    assert t0.apply_chat_template(msgs, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t0.eos_token_id == t0.token_to_id("<|im_end|>") and t0.eos_token_id in t0.end_of_turn_ids


def test_stream_decoder_never_splits_korean(tok_folder):
    from finetune_desktop.engine import Tokenizer
    t = Tokenizer.from_pretrained(tok_folder)
    text = "밥 뭇나? 억수로 좋다 아이가. 🦜"
    ids = t.encode(text)
    assert len(ids) > len(text) / 2  # byte-level pieces: some characters span several tokens
    sd = t.stream_decoder()
    pieces = [sd.push(i) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


# ----------------------------------------------------------------------------- atomic writes
def test_failed_save_pretrained_leaves_previous_model_intact(saved, monkeypatch):
    m, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    m2 = tiny_model(seed=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        m2.save_pretrained(folder)
    monkeypatch.undo()
    # a real failure half way through (an extra file in a folder that does not exist)
    with pytest.raises(OSError):
        m2.save_pretrained(folder, extra_files={"README.md": b"x", "no/such/dir/file.txt": b"y"})
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before, "a failed save changed the existing model folder"
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temp folders left behind: {leftovers}"
    np.testing.assert_array_equal(Model.from_pretrained(folder).logits(IDS), m.logits(IDS))
    # and a successful save replaces it completely
    m2.save_pretrained(folder, extra_files={"README.md": b"hello"})
    assert (folder / "README.md").read_bytes() == b"hello"
    np.testing.assert_array_equal(Model.from_pretrained(folder).logits(IDS), m2.logits(IDS))
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_failed_safetensors_write_keeps_old_file(tmp_path):
    f = tmp_path / "w.safetensors"
    ckpt.write_safetensors(f, {"a": np.ones(3, np.float32)})
    old = f.read_bytes()
    with pytest.raises(Exception):
        ckpt.write_safetensors(f, {"a": np.ones(3, np.float32), "b": np.array([object()])})
    assert f.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"], "temp file left behind"


def test_atomic_write_json_and_text(tmp_path):
    p = tmp_path / "sub" / "x.json"
    ckpt.atomic_write_json(p, {"a": "한국어"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": "한국어"}
    with pytest.raises(TypeError):
        ckpt.atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": "한국어"}
    ckpt.atomic_write_text(p, "plain")
    assert p.read_text() == "plain"
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


def test_failed_save_adapter_leaves_previous_adapter_intact(saved, tmp_path, monkeypatch):
    m, _ = saved
    m.add_lora(LoraConfig(r=2), seed=0)
    m.save_adapter(tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "atomic_write_json", boom)
    with pytest.raises(OSError):
        m.save_adapter(tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ad")]
