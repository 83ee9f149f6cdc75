"""The numpy engine against Hugging Face transformers (and PEFT) on small random checkpoints.

Every case builds a tiny transformers model with every parameter randomised (norm weights and
biases too), saves it with save_pretrained (safetensors), loads the folder with
Model.from_pretrained and compares logits, the loss with -100 labels and EVERY gradient, each
to better than 1e-4 relative (max |ours - theirs| / max |theirs| per tensor).

Skips cleanly where torch / transformers / peft are not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finetune_desktop.engine import LoraConfig, Model, ModelConfig  # noqa: E402
from finetune_desktop.engine.model import expected_shapes  # noqa: E402

TOL = 1e-4
V = 61
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
ARCH = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM")}


def rel(ours, theirs) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"shape {ours.shape} != {theirs.shape}"
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def build_hf(arch: str, seed: int = 0, **kw):
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCH[arch])
    config = cfg_cls(**{**SMALL, **kw}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith(".bias"):
                p.copy_(0.2 * r)
            else:
                p.copy_(0.2 * r)
    return model


def save_hf(model, folder: Path, dtype=torch.float32):
    """Save with the given storage dtype; return a float32 model holding exactly the stored values."""
    if dtype == torch.float32:
        model.save_pretrained(folder, safe_serialization=True)
        return model
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    # reload in float32 (rather than model.float()) so buffers such as the RoPE inv_freq are
    # recomputed in float32 instead of keeping their half-precision rounding
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()


def ids_and_labels(T=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(2, T))
    labels = ids.copy()
    labels[0, :3] = -100  # an untrained prompt
    labels[1, 5] = -100
    return ids, labels


def hf_loss_logits_grads(model, ids, labels, attention_mask=None):
    model.zero_grad(set_to_none=True)
    kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
    out = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels), **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), out.logits.detach().numpy(), grads


def compare_all(ours: Model, model, ids, labels, attention_mask=None, what=""):
    hloss, hlogits, hgrads = hf_loss_logits_grads(model, ids, labels, attention_mask)
    logits = ours.logits(ids, attention_mask=attention_mask)
    if attention_mask is not None:  # padding positions are undefined: compare real tokens only
        real = attention_mask.astype(bool)
        logits, hlogits = logits[real], hlogits[real]
    e = rel(logits, hlogits)
    assert e < TOL, f"{what}: logits differ by {e:.2e} (relative)"
    loss, grads = ours.loss_and_grads(ids, labels, attention_mask=attention_mask)
    assert abs(loss - hloss) < TOL * abs(hloss), f"{what}: loss {loss} != transformers {hloss}"
    assert set(grads) == set(hgrads), (
        f"{what}: gradient names differ: only ours {sorted(set(grads) - set(hgrads))[:3]}, "
        f"only transformers {sorted(set(hgrads) - set(grads))[:3]}")
    bad = {k: rel(grads[k], hgrads[k]) for k in hgrads}
    bad = {k: v for k, v in bad.items() if not v < TOL}
    assert not bad, f"{what}: gradients differ (relative): " + ", ".join(f"{k}: {v:.2e}" for k, v in bad.items())


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama_gqa_biases_tied": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True)),
    "llama_untied_mha_rope_theta": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 300.0})),
    "llama_mlp_bias_only_G4": ("llama", dict(num_key_value_heads=1, mlp_bias=True, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_tied_G4": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral_sliding_window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "llama_head_dim_not_C_over_H": ("llama", dict(num_key_value_heads=2, head_dim=16, attention_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_every_gradient_match_transformers(tmp_path, case):
    arch, kw = CASES[case]
    model = save_hf(build_hf(arch, seed=len(case), **kw), tmp_path)
    ours = Model.from_pretrained(tmp_path)
    assert ours.config.model_type == arch
    ids, labels = ids_and_labels()
    compare_all(ours, model, ids, labels, what=case)


def test_right_padding_attention_mask_matches_transformers(tmp_path):
    arch, kw = CASES["llama_gqa_biases_tied"]
    model = save_hf(build_hf(arch, seed=3, **kw), tmp_path)
    ours = Model.from_pretrained(tmp_path)
    ids, labels = ids_and_labels()
    am = np.ones_like(ids)
    am[1, 6:] = 0
    labels[1, 6:] = -100
    compare_all(ours, model, ids, labels, attention_mask=am, what="right padding")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_files_read_into_float32(tmp_path, dtype):
    arch, kw = CASES["llama_gqa_biases_tied"]
    model = save_hf(build_hf(arch, seed=9, **kw), tmp_path, dtype=getattr(torch, dtype))
    from finetune_desktop.engine.checkpoint import read_safetensors
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    stored = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert stored == {"BF16" if dtype == "bfloat16" else "F16"}, stored
    ours = Model.from_pretrained(tmp_path)
    assert ours.dtype == np.float32
    raw = read_safetensors(tmp_path / "model.safetensors")
    w = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach().numpy()
    np.testing.assert_array_equal(raw["model.layers.0.self_attn.q_proj.weight"], w)
    ids, labels = ids_and_labels()
    compare_all(ours, model, ids, labels, what=f"{dtype} file")


def test_sharded_checkpoint_from_transformers_loads(tmp_path):
    arch, kw = CASES["qwen2_untied"]
    model = build_hf(arch, seed=1, **kw)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = Model.from_pretrained(tmp_path)
    ids, _ = ids_and_labels()
    e = rel(ours.logits(ids), model(input_ids=torch.tensor(ids)).logits.detach().numpy())
    assert e < TOL, f"sharded checkpoint logits differ by {e:.2e}"


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(**SMALL, rope_parameters=LLAMA3)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = ModelConfig.from_hf_dict(json.loads(config.to_json_string())).inv_freq()
    e = rel(ours, theirs.numpy())
    assert e < 1e-6, f"llama3 inv_freq differs by {e:.2e}: ours {ours}, transformers {theirs.numpy()}"
    assert not np.allclose(ours, 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)), "the scaling must change something"


@pytest.mark.parametrize("arch", list(ARCH))
def test_minimal_config_json_is_read_like_transformers(arch):
    """Optional keys left out of config.json must get transformers' defaults, not our own."""
    d = {"architectures": [ARCH[arch][1]], "model_type": arch, "vocab_size": V, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    theirs = getattr(transformers, ARCH[arch][0]).from_dict(dict(d))
    ours = ModelConfig.from_hf_dict(dict(d))
    got = dict(rms_norm_eps=ours.rms_norm_eps, rope_theta=ours.rope_theta,
               tie_word_embeddings=ours.tie_word_embeddings, sliding_window=ours.sliding_window)
    layer_types = getattr(theirs, "layer_types", None) or []
    expect = dict(rms_norm_eps=theirs.rms_norm_eps, rope_theta=theirs.rope_parameters["rope_theta"],
                  tie_word_embeddings=theirs.tie_word_embeddings,
                  sliding_window=None if "full_attention" in layer_types else getattr(theirs, "sliding_window", None))
    assert got == expect, f"{arch}: ours {got} != transformers {expect}"


# ---------------------------------------------------------------- Qwen2 sliding window semantics
QWEN2_WINDOW_BUG = (
    "engine bug, config.py:171-179 (read) and 250-252 (write): transformers slides only on layers "
    "i >= max_window_layers (or per config.json 'layer_types'); we slide on all layers when "
    "max_window_layers >= num_hidden_layers (transformers: none -> silently wrong logits) and refuse "
    "max_window_layers=0 (transformers: all); to_hf_dict writes max_window_layers=num_hidden_layers, "
    "which transformers reads as no sliding window")



@pytest.mark.parametrize("max_window_layers", [0, 2])
def test_qwen2_use_sliding_window_matches_transformers(tmp_path, max_window_layers):
    """transformers: layer i uses the sliding window iff use_sliding_window and i >= max_window_layers.
    So max_window_layers=0 slides on every layer and max_window_layers=num_hidden_layers on none."""
    model = save_hf(build_hf("qwen2", seed=2, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                             max_window_layers=max_window_layers), tmp_path)
    ours = Model.from_pretrained(tmp_path)
    ids, labels = ids_and_labels(T=9)
    compare_all(ours, model, ids, labels, what=f"qwen2 use_sliding_window, max_window_layers={max_window_layers}")


# ---------------------------------------------------------------- our files in transformers
def our_model(arch="llama", seed=0, **kw) -> Model:
    cfg = ModelConfig(**{**SMALL, "model_type": arch, "qkv_bias": arch == "qwen2", **kw})
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        params[name] = (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return Model(cfg, params)


SAVE_CASES = {
    "llama_tied_biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=True, rope_theta=2000.0)),
    "qwen2": ("qwen2", dict(num_key_value_heads=1)),
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "llama3_scaling": ("llama", dict(rope_theta=500.0, rope_scaling={k: v for k, v in LLAMA3.items()
                                                                       if k != "rope_theta"})),
}


@pytest.mark.parametrize("case,dtype", [(c, "F32") for c in SAVE_CASES]
                         + [("llama_tied_biases", "F16"), ("llama_tied_biases", "BF16")])
def test_our_save_pretrained_loads_in_transformers(tmp_path, case, dtype):
    arch, kw = SAVE_CASES[case]
    m = our_model(arch, **kw)
    m.save_pretrained(tmp_path / "out", dtype=dtype)
    ids, _ = ids_and_labels(T=11)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == m.config.architecture
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    back = Model.from_pretrained(tmp_path / "out")
    e = rel(back.logits(ids), theirs)
    assert e < TOL, f"{case} {dtype}: transformers logits differ from ours (same file) by {e:.2e}"
    if dtype == "F32":
        e = rel(m.logits(ids), theirs)
        assert e < TOL, f"{case}: transformers logits differ from the saved model's by {e:.2e}"
    else:  # the rounding is real but small
        assert rel(m.logits(ids), theirs) < 5e-2



def test_qwen2_sliding_window_survives_save_pretrained(tmp_path):
    m = our_model("qwen2", num_key_value_heads=2, sliding_window=3)
    m.save_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, _ = ids_and_labels(T=9)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    e = rel(m.logits(ids), theirs)
    assert e < TOL, f"qwen2 with sliding_window=3 saved by us: transformers logits differ by {e:.2e}"


def test_tiny_model_folder_matches_transformers(tmp_path):
    from tinymodel import make_tiny_model_folder
    folder = make_tiny_model_folder(tmp_path / "tiny")
    ours = Model.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, size=(2, 10))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel(ours.logits(ids), theirs) < TOL


# ---------------------------------------------------------------- greedy generate vs transformers
def test_greedy_generate_matches_transformers(tmp_path):
    arch, kw = CASES["llama_gqa_biases_tied"]
    model = build_hf(arch, seed=5, **kw)
    with torch.no_grad():  # sharper logits so float32 rounding cannot flip an argmax
        model.lm_head.weight.mul_(3.0)
    model = save_hf(model, tmp_path)
    ours = Model.from_pretrained(tmp_path)
    prompt = [5, 9, 2, 33]
    got = list(ours.generate(prompt, max_new_tokens=12))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


# ---------------------------------------------------------------- PEFT
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj", "down_proj")])
def test_our_lora_adapter_loads_in_peft(tmp_path, targets):
    peft = pytest.importorskip("peft")
    m = our_model("llama", num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "base")
    kw = {} if targets is None else {"target_modules": targets}
    m.add_lora(LoraConfig(r=4, alpha=8.0, dropout=0.1, **kw), seed=1)
    rng = np.random.default_rng(0)
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v[...] = 0.2 * rng.standard_normal(v.shape)
    m.save_adapter(tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids, _ = ids_and_labels(T=10)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids)).logits.numpy()
    merged = Model(m.config, m.merged_params())
    e = rel(merged.logits(ids), theirs)
    assert e < TOL, f"PEFT logits differ from our merged model by {e:.2e}"
    assert rel(m.logits(ids), theirs) < TOL
    base_logits = Model.from_pretrained(tmp_path / "base").logits(ids)
    assert rel(base_logits, theirs) > 1e-3, "the adapter must matter for this test to mean anything"


def test_peft_adapter_loads_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    m = our_model("qwen2", num_key_value_heads=2)
    m.save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pcfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()
    ids, _ = ids_and_labels(T=10)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids)).logits.numpy()
    m.load_adapter(tmp_path / "adapter")
    assert m.lora_config.r == 2 and m.lora_config.scale == 3.0
    e = rel(m.logits(ids), theirs)
    assert e < TOL, f"PEFT-saved adapter in our engine: logits differ by {e:.2e}"


# ---------------------------------------------------------------- tokenizer
MESSAGES = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello! 밥 뭇나?"},
    {"role": "assistant", "content": "Arr, matey."},
    {"role": "user", "content": "What is the weather like?"},
]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    from tinymodel import make_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


@pytest.mark.parametrize("gen_prompt", [False, True])
def test_chat_template_renders_like_transformers(tok_folder, gen_prompt):
    from finetune_desktop.engine import Tokenizer
    ours = Tokenizer.from_pretrained(tok_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(tok_folder)
    a = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt)
    b = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt)
    assert a == b, f"ours:\n{a!r}\ntransformers:\n{b!r}"


@pytest.mark.parametrize("text", [
    "Hello! How are you today?",
    "안녕하세요. 오늘 날씨가 좋네요.",
    "<|im_start|>user\nArr, matey!<|im_end|>\n",
    "  spaces\tand\nnewlines  ",
    "emoji 🦜 and unseen bytes ÿ",
])
def test_encode_decode_match_transformers(tok_folder, text):
    from finetune_desktop.engine import Tokenizer
    ours = Tokenizer.from_pretrained(tok_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(tok_folder)
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False) == text
    assert ours.eos_token_id == theirs.eos_token_id
