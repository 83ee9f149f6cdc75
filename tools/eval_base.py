"""Evaluate a base model folder (or a pretrain_base.py run folder) on everyday chat.

    python tools/eval_base.py MODEL [--heldout tools/corpus/heldout_dialogs_en.jsonl] [--max-new-tokens 128]

Prints one JSON object:
  heldout_bpb             bits per UTF-8 byte over the chat-formatted held-out dialogs (all tokens)
  heldout_loss_assistant  mean nats per assistant token (replies and their <|im_end|>)
  ended_fraction          share of greedy replies to everyday questions that end with <|im_end|>
                          within --max-new-tokens tokens
  distinct_2              distinct bigrams / all bigrams over those replies (words)
  samples                 a few question -> reply pairs
MODEL: an HF folder (config.json + safetensors + tokenizer) or a pretrain run folder (uses its
latest checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from finetune_desktop.engine import Model, Tokenizer  # noqa: E402

import pretrain_base as pb  # noqa: E402
import train_tokenizer as tt  # noqa: E402

QUESTIONS = [
    "Hello!", "How are you today?", "What should I eat for breakfast?", "Can you recommend a good book?",
    "What is your favorite color?", "How do I make a cup of tea?", "What is the weather like in spring?",
    "I feel tired today. Any advice?", "What can I do on a rainy weekend?", "How do I stay healthy?",
    "What is a good hobby to start?", "Can you tell me a joke?", "How do I cook rice?",
    "What time should I go to bed?", "Why do people like dogs?", "What should I wear to a job interview?",
    "How can I save money?", "What is your name?", "Do you like music?", "How do I learn to swim?",
    "What is a healthy lunch?", "How can I sleep better?", "What do you do for fun?",
    "How do I say thank you politely?", "What fruit is good in summer?", "How do I clean my room quickly?",
    "What is the best way to learn English?", "I am bored. What should I do?", "How do I make a friend?",
    "What should I buy for my mom's birthday?", "Is it good to drink water in the morning?",
    "How long should I walk every day?", "What is a good plant for a small apartment?",
    "How do I fix a flat bicycle tire?", "What do cats like to eat?", "Can you help me plan a picnic?",
    "What is the capital of France?", "How do I stop feeling nervous?", "Good night!", "Thank you for your help!",
]


def load(model_path: Path):
    if (model_path / "checkpoint" / "state.json").exists():
        import export_base
        m, tok, _ = export_base.load_run_model(model_path)
        return m, tok
    return Model.from_pretrained(model_path), Tokenizer.from_pretrained(model_path)


def distinct_2(texts) -> float:
    grams, total = set(), 0
    for t in texts:
        w = t.split()
        for a, b in zip(w, w[1:]):
            grams.add((a, b))
            total += 1
    return len(grams) / total if total else 0.0


def evaluate(model: Model, tok: Tokenizer, heldout_path: Path | None, max_new: int = 128,
             questions=QUESTIONS, n_samples: int = 6) -> dict:
    r: dict = {}
    if heldout_path is not None and heldout_path.exists():
        convs = tt.read_dialogs(heldout_path)
        r.update(pb.evaluate(model, tok, convs, max_len=min(1024, model.config.max_position_embeddings)))
    replies, ended = [], 0
    t0 = time.time()
    n_tok = 0
    for q in questions:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
        gen = list(model.generate(ids, max_new_tokens=max_new, temperature=0.0, stop_ids=tok.end_of_turn_ids))
        n_tok += len(gen)
        ended += len(gen) < max_new
        replies.append(tok.decode(gen, skip_special_tokens=True).strip())
    dt = time.time() - t0
    r.update(ended_fraction=ended / len(questions), distinct_2=round(distinct_2(replies), 4),
             questions=len(questions), generate_tokens_per_s=round(n_tok / dt, 1) if dt else None,
             samples={q: a for q, a in list(zip(questions, replies))[:n_samples]})
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--heldout", default=str(HERE / "corpus" / pb.HELDOUT_FILE))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args(argv)
    path = Path(args.model)
    if not path.exists():
        print(f"error: {path}: no such folder", file=sys.stderr)
        return 2
    model, tok = load(path)
    r = evaluate(model, tok, Path(args.heldout) if args.heldout else None, args.max_new_tokens,
                 n_samples=args.samples)
    r = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
    print(json.dumps(r, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
