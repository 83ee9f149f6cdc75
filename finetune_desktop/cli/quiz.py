"""`finetune-desktop quiz RUN_OR_MODEL FILE [--compare-base]`: "did it learn?" on the command line.

Asks every question of FILE greedily and prints question, reply and ✓/✗, then the score. FILE is
a quiz file (JSONL {"question", "expected": [...], "system"?}: right when the reply contains an
expected string) or a training file (right when the reply reproduces the trained answer)."""
from __future__ import annotations

import sys

from ..training.chat import load_chat_model
from ..training.quiz import QUIZ_MAX_NEW_TOKENS, ask, load_questions, quiz_settings, score
from .common import MODEL_HELP, pos_int

NAME = "quiz"


def register(sub) -> None:
    q = sub.add_parser(NAME, help="ask a model the questions of a quiz or training file and score the replies",
                       description=__doc__.split("\n\n", 1)[1])
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("file", help="a quiz file (JSONL with question / expected) or a training file")
    q.add_argument("--compare-base", action="store_true",
                   help="also ask the base model (a run's own base, else the built-in model) and show both")
    q.add_argument("--max-new-tokens", type=pos_int, default=QUIZ_MAX_NEW_TOKENS, help="longest reply, in tokens")
    q.add_argument("--json", metavar="FILE", help="also write every question, reply and verdict to this JSON file")
    q.set_defaults(run=run)


def _base_spec_of(cm) -> str:
    if cm.run_dir is not None:
        from ..training.runs import read_run_json

        path = (read_run_json(cm.run_dir).get("base_model") or {}).get("path")
        if path:
            return path
    return "base"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _safe_print(text: str) -> None:
    try:
        print(text)
    except UnicodeEncodeError:  # a console that cannot show ✓ or Korean
        enc = sys.stdout.encoding or "ascii"
        print(text.encode(enc, "replace").decode(enc, "replace"))
    sys.stdout.flush()


def run(args) -> int:
    items = load_questions(args.file)
    cm = load_chat_model(args.model)
    base = load_chat_model(_base_spec_of(cm)) if args.compare_base else None
    settings = quiz_settings(args.max_new_tokens)
    kind = "expected strings" if items[0].kind == "keys" else "the trained answers"
    _safe_print(f"{len(items)} questions from {args.file}; a reply is right when it contains {kind}")
    results, base_results = [], []
    width = len(str(len(items)))
    for i, r in enumerate(ask(cm, items, settings), 1):
        results.append(r)
        _safe_print(f"\n{i:>{width}}. {r.item.question}")
        _safe_print(f"   {_mark(r.correct)} {'tuned: ' if base is not None else ''}{r.reply}")
        if base is not None:
            b = next(ask(base, [r.item], settings))
            base_results.append(b)
            _safe_print(f"   {_mark(b.correct)} base:  {b.reply}")
        if r.item.kind == "keys" and not r.correct:
            _safe_print(f"     expected any of: {', '.join(r.item.expected)}")
    s = score(results)
    line = f"\nscore: {s}"
    if base_results:
        line += f"   base model: {score(base_results)}"
    _safe_print(line)
    if args.json:
        from ..engine.checkpoint import atomic_write_json

        rows = []
        for j, r in enumerate(results):
            row = {"line": r.item.line, "question": r.item.question, "system": r.item.system,
                   "expected": list(r.item.expected), "kind": r.item.kind, "reply": r.reply, "correct": r.correct}
            if base_results:
                row["base_reply"], row["base_correct"] = base_results[j].reply, base_results[j].correct
            rows.append(row)
        atomic_write_json(args.json, {"model": str(cm.folder), "file": str(args.file), "score": s.correct,
                                      "total": s.total, "base_score": score(base_results).correct if base_results else None,
                                      "results": rows})
    return 0
