"""Paraphrase families for pretraining: conversations in which differently worded questions get
the same answer, so the base model learns to see the meaning of a question, not its wording.

Sources (all in tools/corpus/, written for this project):
  faq_*.jsonl     fictional businesses, one per line: {"business", "kind", "lang", "system",
                  "profile", "facts": [{"topic", "questions": [8 wordings], "answer"}]}
  facts_*.jsonl   short general facts: {"topic", "lang", "questions": [6-7 wordings], "answer"}
  recall_*.jsonl  a fact the user states, then asks about later: {"statement", "ack",
                  "questions": [...], "answer"}

What the pretraining sees, per phase-2 epoch (every choice is a pure function of seed and epoch):
  single  a business's system message, one wording of a fact, its answer (WORDINGS_PER_EPOCH
          different wordings per fact and epoch, so every business is learned the way a
          fine-tune learns an FAQ, from several wordings)
  repeat  multi-turn: four questions to one business, then one of them again in other words,
          answered the same way (learning to notice that two wordings ask the same thing)
  context the business's answers listed in the system message, a question in any wording,
          the matching answer (finding the fact that answers a question)
  general one wording of a general fact and its answer
  recall  the user states a fact, chats, then asks about it in other words
  reword  "ask this another way": one wording of a question in, another wording of the same
          question out (PARAPHRASES_PER_EPOCH per family and epoch); the app uses this skill to
          give a fine-tune more wordings of each training question (training/augment.py)

Held out, never trained on:
  - one wording of every fact (the last one in a deterministic shuffle): `heldout_quiz()` asks
    the model those, with the business's system message, and counts right answers: can a
    wording never seen reach a fact learned from other wordings? (the fine-tuning question,
    asked during pretraining)
  - HELDOUT_BUSINESSES whole businesses, for `holdout_faq_files()`, which writes them as a
    fine-tuning file (3 wordings per fact) and a quiz of two other wordings, like the samples.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
WORDINGS_PER_EPOCH = 3
REPEAT_PER_BUSINESS = 3
CONTEXT_PER_BUSINESS = 2
HELDOUT_BUSINESSES = 5       # the first N businesses by name hash (English and Korean mixed)
PARAPHRASES_PER_EPOCH = 2
REWORD_PROMPT_EN = "Ask this question another way: "
REWORD_PROMPT_KO = "이 질문을 다른 말로 물어봐 줘: "

SYSTEM_VARIANTS_EN = [
    None,  # the file's own system sentence
    "You are the assistant of {name}.",
    "You are a helpful assistant for {name}, a {kind}.",
    "You answer questions about {name}.",
    "You are the friendly assistant of {name}.",
]
SYSTEM_VARIANTS_KO = [
    None,
    "너는 {name}의 안내 도우미야.",
    "당신은 {name}의 친절한 상담원입니다.",
    "{name}에 대한 질문에 답해 주세요.",
]


@dataclass(frozen=True)
class Fact:
    topic: str
    train_wordings: tuple[str, ...]
    heldout_wording: str
    answer: str


@dataclass(frozen=True)
class Business:
    name: str
    kind: str
    lang: str
    system: str
    profile: str
    facts: tuple[Fact, ...]


def _h(*parts) -> int:
    return int(hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:12], 16)


def _split(questions, key) -> tuple[tuple[str, ...], str]:
    """A deterministic shuffle of the wordings; the last one is held out."""
    qs = sorted(questions, key=lambda q: _h(key, q))
    return tuple(qs[:-1]), qs[-1]


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_businesses(corpus: Path = CORPUS) -> list[Business]:
    out = []
    for p in sorted(glob.glob(str(corpus / "faq_*.jsonl"))):
        for d in _read_jsonl(Path(p)):
            facts = []
            for f in d["facts"]:
                tw, hw = _split(f["questions"], d["business"] + f["topic"])
                facts.append(Fact(f["topic"], tw, hw, f["answer"]))
            out.append(Business(d["business"], d.get("kind", ""), d.get("lang", "en"), d["system"],
                                d.get("profile", ""), tuple(facts)))
    return out


def split_businesses(businesses: list[Business]) -> tuple[list[Business], list[Business]]:
    """(trained, held out): the held-out ones are never seen in pretraining."""
    order = sorted(businesses, key=lambda b: _h("holdout", b.name))
    held = set(b.name for b in order[:HELDOUT_BUSINESSES])
    return [b for b in businesses if b.name not in held], [b for b in businesses if b.name in held]


def load_general(corpus: Path = CORPUS) -> list[Fact]:
    out = []
    for p in sorted(glob.glob(str(corpus / "facts_*.jsonl"))):
        for d in _read_jsonl(Path(p)):
            tw, hw = _split(d["questions"], d["answer"])
            out.append(Fact(d.get("topic", ""), tw, hw, d["answer"]))
    return out


def load_recall(corpus: Path = CORPUS) -> list[dict]:
    out = []
    for p in sorted(glob.glob(str(corpus / "recall_*.jsonl"))):
        out.extend(_read_jsonl(Path(p)))
    return out


def _system(b: Business, rng) -> str:
    variants = SYSTEM_VARIANTS_KO if b.lang == "ko" else SYSTEM_VARIANTS_EN
    v = variants[int(rng.integers(len(variants)))]
    return b.system if v is None else v.format(name=b.name, kind=b.kind.replace("_", " "))


def _msg(role, content):
    return {"role": role, "content": content}


def epoch_conversations(seed: int, epoch: int, corpus: Path = CORPUS) -> list[list[dict]]:
    """Every paraphrase-family conversation of one phase-2 epoch (held-out parts excluded)."""
    rng = np.random.default_rng([seed, 77, epoch])
    trained, _ = split_businesses(load_businesses(corpus))
    convs: list[list[dict]] = []
    for b in trained:
        for f in b.facts:
            k = min(WORDINGS_PER_EPOCH, len(f.train_wordings))
            for i in rng.choice(len(f.train_wordings), size=k, replace=False):
                convs.append([_msg("system", _system(b, rng)), _msg("user", f.train_wordings[i]),
                              _msg("assistant", f.answer)])
        n = len(b.facts)
        for _ in range(REPEAT_PER_BUSINESS):
            pick = [b.facts[i] for i in rng.choice(n, size=min(4, n), replace=False)]
            msgs = [_msg("system", _system(b, rng))]
            used = {}
            for f in pick:
                i = int(rng.integers(len(f.train_wordings)))
                used[f.topic] = i
                msgs += [_msg("user", f.train_wordings[i]), _msg("assistant", f.answer)]
            again = pick[int(rng.integers(len(pick)))]
            others = [j for j in range(len(again.train_wordings)) if j != used[again.topic]]
            msgs += [_msg("user", again.train_wordings[others[int(rng.integers(len(others)))]]),
                     _msg("assistant", again.answer)]
            convs.append(msgs)
        for _ in range(CONTEXT_PER_BUSINESS):
            shown = [b.facts[i] for i in rng.choice(n, size=min(6, n), replace=False)]
            f = shown[int(rng.integers(len(shown)))]
            lead = "알고 있는 내용:" if b.lang == "ko" else "What you know:"
            sysmsg = f"{_system(b, rng)} {lead} " + " ".join(x.answer for x in shown)
            convs.append([_msg("system", sysmsg),
                          _msg("user", f.train_wordings[int(rng.integers(len(f.train_wordings)))]),
                          _msg("assistant", f.answer)])
    for f in load_general(corpus):
        i = int(rng.integers(len(f.train_wordings)))
        convs.append([_msg("user", f.train_wordings[i]), _msg("assistant", f.answer)])
    for r in load_recall(corpus):
        qs = r["questions"]
        convs.append([_msg("user", r["statement"]), _msg("assistant", r["ack"]),
                      _msg("user", qs[int(rng.integers(len(qs)))]), _msg("assistant", r["answer"])])
    convs += reword_conversations(rng, trained, load_general(corpus))
    order = rng.permutation(len(convs))
    return [convs[i] for i in order]


def reword_prompt(question: str, lang: str) -> str:
    return (REWORD_PROMPT_KO if lang == "ko" else REWORD_PROMPT_EN) + question


def reword_conversations(rng, businesses: list[Business], general: list[Fact]) -> list[list[dict]]:
    """'Ask this another way' pairs: two different training wordings of one question (held-out
    wordings never appear)."""
    out = []
    families = [(f.train_wordings, b.lang) for b in businesses for f in b.facts]
    families += [(f.train_wordings, "ko" if any("\uac00" <= c <= "\ud7a3" for c in f.answer) else "en")
                 for f in general]
    for wordings, lang in families:
        if len(wordings) < 2:
            continue
        for _ in range(PARAPHRASES_PER_EPOCH):
            i, j = rng.choice(len(wordings), size=2, replace=False)
            out.append([_msg("user", reword_prompt(wordings[i], lang)), _msg("assistant", wordings[j])])
    return out


def plain_documents(corpus: Path = CORPUS) -> list[str]:
    """Phase-1 text: each trained business's profile and its facts as question/answer lines."""
    trained, _ = split_businesses(load_businesses(corpus))
    docs = []
    for b in trained:
        lines = [b.profile] if b.profile else []
        for f in b.facts:
            lines += [f.train_wordings[0], f.answer]
        docs.append("\n".join(lines))
    for f in load_general(corpus):
        docs.append(f"{f.train_wordings[0]}\n{f.answer}")
    return docs


def heldout_quiz(corpus: Path = CORPUS, max_items: int | None = None) -> list[dict]:
    """For trained businesses: the held-out wording of each fact, with the business's own system
    message; right when the reply contains the fact's answer (normalised)."""
    trained, _ = split_businesses(load_businesses(corpus))
    items = []
    for b in trained:
        for f in b.facts:
            items.append({"system": b.system, "question": f.heldout_wording, "answer": f.answer, "lang": b.lang})
    items.sort(key=lambda it: _h("quiz", it["question"]))
    return items[:max_items] if max_items else items


def answer_keys(answers: list[str]) -> list[list[str]]:
    """Key strings for each answer, as a person writing a quiz would pick them: the numbers, times,
    prices and names in it (words with a digit, or capitalised words after the first) that no
    other answer of the same business contains; the whole answer when it has none."""
    import re

    def candidates(a):
        words = re.findall(r"[\w$£€.,:'/-]+", a)
        out = []
        for i, w in enumerate(words):
            w = w.strip(".,:'")
            if len(w) >= 2 and (any(c.isdigit() for c in w) or (i > 0 and w[:1].isupper())):
                out.append(w)
        return out

    keys = []
    for i, a in enumerate(answers):
        others = " ".join(x for j, x in enumerate(answers) if j != i).casefold()
        k = [w for w in dict.fromkeys(candidates(a)) if w.casefold() not in others]
        keys.append(k[:3] or [a.rstrip(".!? ")])
    return keys


def holdout_faq_files(out_dir: Path, corpus: Path = CORPUS) -> list[tuple[Path, Path]]:
    """Write each held-out business as a fine-tuning file (3 wordings per fact, one fixed system
    message, wordings interleaved like the samples) and a quiz file of two other wordings with the
    whole answer as the expected string. -> [(data file, quiz file)]."""
    _, held = split_businesses(load_businesses(corpus))
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for b in held:
        stem = "".join(c if c.isalnum() else "_" for c in b.name.lower()).strip("_")[:40] or "business"
        data, quiz = out_dir / f"{stem}.jsonl", out_dir / f"{stem}_quiz.jsonl"
        rows, qrows = [], []
        for k in range(3):
            for f in b.facts:
                rows.append({"messages": [_msg("system", b.system), _msg("user", f.train_wordings[k]),
                                          _msg("assistant", f.answer)]})
        keys = answer_keys([f.answer for f in b.facts])
        for f, k in zip(b.facts, keys):
            for w in (f.train_wordings[3], f.heldout_wording):
                qrows.append({"question": w, "expected": k, "system": b.system})
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        quiz.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in qrows), encoding="utf-8")
        pairs.append((data, quiz))
    return pairs


if __name__ == "__main__":
    import sys

    convs = epoch_conversations(1234, 0)
    bs = load_businesses()
    tr, held = split_businesses(bs)
    print(f"{len(bs)} businesses ({len(held)} held out: {', '.join(b.name for b in held)}), "
          f"{len(load_general())} general facts, {len(load_recall())} recall items; "
          f"{len(convs)} conversations per epoch, {len(heldout_quiz())} held-out quiz items", file=sys.stderr)
