"""The fast check of a base model alone: does its picture of a question reflect the question's
meaning, or only its words?

    python tools/paraphrase_probe.py MODEL --data sample_data/faq_bike_shop.jsonl \
        --quiz sample_data/faq_bike_shop_quiz.jsonl

Each question (the user message, rendered alone with the model's chat template) is embedded as
the mean of the model's hidden states over its tokens, at every layer (0 = the token
embeddings). For each quiz question (an unseen rewording), the nearest training question by
cosine similarity is found; it is a hit when that training question has the same answer, i.e.
asks about the same fact. The same is done with a bag of words (lower-cased word counts) as the
line to beat. Prints hits per layer; no fine-tuning involved, so it takes seconds.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def load_pairs(data: Path, quiz: Path):
    """-> (training questions, their answers), (quiz questions, the answer each belongs to)."""
    train_q, train_a = [], []
    for line in open(data, encoding="utf-8"):
        if line.strip():
            m = json.loads(line)["messages"]
            train_q.append(next(x["content"] for x in m if x["role"] == "user"))
            train_a.append(next(x["content"] for x in m if x["role"] == "assistant"))
    quiz_q, quiz_a = [], []
    for line in open(quiz, encoding="utf-8"):
        if line.strip():
            d = json.loads(line)
            keys = [k.casefold() for k in d["expected"]]
            owners = [a for a in dict.fromkeys(train_a) if any(k in a.casefold() for k in keys)]
            if len(owners) != 1:
                raise SystemExit(f"error: {quiz}: {d['question']!r}: its expected strings match "
                                 f"{len(owners)} answers of {data}, need exactly one")
            quiz_q.append(d["question"])
            quiz_a.append(owners[0])
    return train_q, train_a, quiz_q, quiz_a


def embed(model, tok, questions) -> list[np.ndarray]:
    """-> per layer, (n, C) mean hidden state of each question's tokens."""
    per_layer = None
    for q in questions:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
        hs = model.hidden_states(np.array([ids]))
        means = [h[0].mean(axis=0) for h in hs]
        if per_layer is None:
            per_layer = [[] for _ in means]
        for l, m in enumerate(means):
            per_layer[l].append(m)
    return [np.stack(x) for x in per_layer]


def nearest_hits(train_vecs, quiz_vecs, train_a, quiz_a) -> int:
    def unit(v):
        v = v - 0.0
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-9)
    sim = unit(quiz_vecs) @ unit(train_vecs).T
    nn = sim.argmax(axis=1)
    return int(sum(train_a[j] == quiz_a[i] for i, j in enumerate(nn)))


def bag_of_words(texts, vocab=None):
    words = [re.findall(r"\w+", t.casefold()) for t in texts]
    if vocab is None:
        vocab = {w: i for i, w in enumerate(sorted(set(w for ws in words for w in ws)))}
    m = np.zeros((len(texts), len(vocab) + 1))
    for i, ws in enumerate(words):
        for w, c in Counter(ws).items():
            m[i, vocab.get(w, len(vocab))] += c
    return m, vocab


def probe(model_spec: str, data: Path, quiz: Path) -> dict:
    from finetune_desktop.training.chat import load_chat_model

    cm = load_chat_model(model_spec)
    tq, ta, qq, qa = load_pairs(data, quiz)
    te, qe = embed(cm.model, cm.tokenizer, tq), embed(cm.model, cm.tokenizer, qq)
    layers = [nearest_hits(te[l], qe[l], ta, qa) for l in range(len(te))]
    bt, vocab = bag_of_words(tq)
    bq, _ = bag_of_words(qq, vocab)
    bq = bq[:, :-1]  # unknown words say nothing
    bt = bt[:, :-1]
    return {"model": str(cm.folder), "data": str(data), "questions": len(qq), "layers": layers,
            "best_layer": int(np.argmax(layers)), "best": max(layers), "bag_of_words": nearest_hits(bt, bq, ta, qa)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--quiz", action="append", required=True)
    args = ap.parse_args(argv)
    out = [probe(args.model, Path(d), Path(q)) for d, q in zip(args.data, args.quiz)]
    print(json.dumps(out if len(out) > 1 else out[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
