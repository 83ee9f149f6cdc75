"""Train the base model's byte-level BPE tokenizer with the `tokenizers` library.

Input: tools/_build/plain.txt (from build_corpus.py), tools/_build/chat_thirdparty.jsonl and the
original dialogs tools/corpus/dialogs_*.jsonl (English and Korean; the held-out file is never
used). Output folder (default tools/_build/tokenizer/): tokenizer.json + tokenizer_config.json
with a ChatML chat template, loadable by finetune_desktop.engine.Tokenizer and by
transformers.AutoTokenizer.

Special tokens: <|endoftext|> (id 0, also padding), <|im_start|> (1), <|im_end|> (2, end of turn).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. No default system message is injected. Written for both our sandboxed Jinja
# environment (trim_blocks/lstrip_blocks) and transformers' (same settings), so whitespace
# comes only from the explicit strings.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def dialog_files(corpus_dir: Path) -> list[Path]:
    """The original training dialogs (never the held-out file), sorted for determinism."""
    files = sorted(Path(p) for p in glob.glob(str(corpus_dir / "dialogs_*.jsonl")))
    return [p for p in files if "heldout" not in p.name]


def read_dialogs(path: Path) -> list[list[dict]]:
    """OpenAI-style chat JSONL -> list of message lists; bad lines are skipped (the files are
    still being written by other people) with a warning naming the line."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                msgs = obj["messages"]
                msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"warning: {path}:{i}: skipped ({e.__class__.__name__})")
                continue
            if msgs and all(m["role"] in ("system", "user", "assistant") for m in msgs):
                out.append(msgs)
    return out


def corpus_texts(build_dir: Path, corpus_dir: Path):
    """Yield training texts for the tokenizer."""
    plain = build_dir / "plain.txt"
    if plain.exists():
        block = []
        with open(plain, encoding="utf-8") as f:
            for line in f:
                block.append(line)
                if len(block) >= 200:
                    yield "".join(block)
                    block = []
        if block:
            yield "".join(block)
    # dialogs count three times: they are what the model mostly has to speak (and the only
    # Korean), while the plain text is dominated by dictionary glosses
    for _ in range(3):
        tp = build_dir / "chat_thirdparty.jsonl"
        if tp.exists():
            for line in open(tp, encoding="utf-8"):
                for m in json.loads(line)["messages"]:
                    yield m["content"]
        for p in dialog_files(corpus_dir):
            for msgs in read_dialogs(p):
                for m in msgs:
                    yield m["content"]
        # our own sample persona files (English and Korean Gyeongsang dialect): without them the
        # tokenizer would see almost no Korean and split every syllable into 2-3 byte tokens
        for p in sorted((corpus_dir.parent.parent / "sample_data").glob("*.jsonl")):
            for msgs in read_dialogs(p):
                for m in msgs:
                    yield m["content"]
    yield "\n".join(["system", "user", "assistant"])


def train_tokenizer(texts, vocab_size: int = 6144, model_max_length: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config(model_max_length: int = 1024) -> dict:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok, folder: Path, model_max_length: int = 1024) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, folder / "tokenizer.json")
    tmp = folder / "tokenizer_config.json.tmp"
    tmp.write_text(json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, folder / "tokenizer_config.json")


def stats(folder: Path, corpus_dir: Path) -> dict:
    """Tokens per character on the original dialogs, English and Korean separately."""
    import sys
    sys.path.insert(0, str(HERE.parent))
    from finetune_desktop.engine import Tokenizer

    t = Tokenizer.from_pretrained(folder)
    en = ko = ""
    for p in dialog_files(corpus_dir):
        text = "\n".join(m["content"] for msgs in read_dialogs(p) for m in msgs)
        if "_ko_" in p.name:
            ko += text
        else:
            en += text
    r = {"vocab_size": t.vocab_size}
    if en:
        r["en_tokens_per_char"] = round(len(t.encode(en)) / len(en), 4)
    if ko:
        r["ko_tokens_per_char"] = round(len(t.encode(ko)) / len(ko), 4)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(HERE / "_build"))
    ap.add_argument("--corpus-dir", default=str(HERE / "corpus"))
    ap.add_argument("--out", default=None, help="output folder (default BUILD/tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=6144)
    ap.add_argument("--model-max-length", type=int, default=1024)
    args = ap.parse_args(argv)
    if not 4096 <= args.vocab_size <= 8192:
        raise SystemExit("error: --vocab-size must be between 4096 and 8192")
    build, corpus = Path(args.build_dir), Path(args.corpus_dir)
    out = Path(args.out) if args.out else build / "tokenizer"
    tok = train_tokenizer(corpus_texts(build, corpus), args.vocab_size, args.model_max_length)
    save(tok, out, args.model_max_length)
    print(json.dumps({"out": str(out), **stats(out, corpus)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
