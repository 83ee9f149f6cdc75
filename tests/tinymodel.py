"""A tiny but real model folder for tests: a byte-level BPE tokenizer trained on a few sentences
(English and Korean) with ChatML special tokens, and a small random Llama-family model with
attention/MLP biases and tied embeddings. Built with the same libraries the app uses."""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = [
    "Hello! How are you today? I am fine, thank you.",
    "Arr, matey! The sea be calm and the wind be fair.",
    "What is the weather like? It is sunny and warm.",
    "Please tell me a short story about a cat and a boat.",
    "안녕하세요. 오늘 날씨가 좋네요. 밥 뭇나? 억수로 좋다 아이가.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "You are a helpful assistant. Answer in one short sentence.",
]


def make_tiny_tokenizer(folder, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 5, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 512,
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def make_tiny_model_folder(folder, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                           kv_heads: int = 2, intermediate: int = 64, vocab_size: int = 400) -> Path:
    """Write a complete HF folder (config, weights, tokenizer) and return its path."""
    from finetune_desktop.engine import Model, ModelConfig, Tokenizer

    folder = Path(folder)
    make_tiny_tokenizer(folder, vocab_size=vocab_size)
    tok = Tokenizer.from_pretrained(folder)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    m = Model.from_config(cfg, seed=seed)
    tmp = folder.with_name(folder.name + ".weights")
    m.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(folder / f.name)
    tmp.rmdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}), encoding="utf-8")
    return folder
