"""Shared helpers for the interop tests (no tests here): tiny model folders of each family and
tokenizer kind, and the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tinymodel import CHATML_TEMPLATE, _TEXT, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "finetune_desktop", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=str(ROOT), **kw)


def split_tokenizer(folder, regex: str, ignore_merges: bool = False, normalizer=None, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer with a Split(regex) + ByteLevel(use_regex=False) pre-tokenizer
    (how Llama-3 and Qwen2 tokenizers are built), ChatML special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 5, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "model_max_length": 512, "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def model_folder_with(folder, tokenizer_fn, model_type: str = "llama", tie: bool = True, seed: int = 0,
                      qk_scale: float = 20.0, **cfg_kw) -> Path:
    """A tiny random model of `model_type` over the tokenizer tokenizer_fn(folder) writes. q/k
    weights are scaled up (qk_scale) so attention is sharp and depends on RoPE: with the usual
    0.02 init every score is near zero and a wrong rotation would not show in the logits."""
    from finetune_desktop.engine import Model, ModelConfig, Tokenizer

    folder = Path(folder)
    tokenizer_fn(folder)
    tok = Tokenizer.from_pretrained(folder)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=512,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, model_type=model_type)
    if model_type == "qwen2":
        kw["qkv_bias"] = True
    elif model_type == "llama":
        kw.update(attention_bias=True, mlp_bias=True)
    kw.update(cfg_kw)
    m = Model.from_config(ModelConfig(**kw), seed=seed)
    # random norms and biases too, so a swapped or dropped tensor shows in every comparison
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    for k, v in m.params.items():
        if ".q_proj." in k or ".k_proj." in k:
            m.params[k] = (v * qk_scale).astype(np.float32)
        elif v.ndim == 1:
            m.params[k] = (v + rng.standard_normal(v.shape).astype(np.float32) * 0.1).astype(np.float32)
    tmp = folder.with_name(folder.name + ".weights")
    m.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(folder / f.name)
    tmp.rmdir()
    return folder


def tiny_llama(folder, **kw) -> Path:
    """The tests' usual tiny model (tests/tinymodel.py): Llama with biases, tied embeddings, GQA."""
    return make_tiny_model_folder(folder, **kw)


def sharp_llama(folder, **kw) -> Path:
    """The same shape with sharp attention and random norms/biases (see model_folder_with)."""
    from tinymodel import make_tiny_tokenizer

    return model_folder_with(folder, make_tiny_tokenizer, **kw)
