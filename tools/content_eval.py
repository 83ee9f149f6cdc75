"""Does a fine-tune learn what the data says? Train on an FAQ file, then quiz the tuned model.

    python tools/content_eval.py --data sample_data/faq_bike_shop.jsonl \
        --quiz sample_data/faq_bike_shop_quiz.jsonl --seeds 1 2 [--base MODEL] [-- extra train args]

For each seed it runs `finetune-desktop train DATA --out RUN --seed S [extra args]` in a fresh
process (timed), then, greedy as `finetune-desktop chat --temperature 0` answers:
  quiz_score       unseen rewordings answered with the right fact (an expected string in the reply)
  own_score        training questions whose reply reproduces the trained answer (one per distinct
                   question; with 3 wordings of 20 facts that is 60)
  own_facts        the same for the first wording of each fact only (the file's first question with
                   each distinct answer: 20 for 20 facts)
  bpb_rise         held-out bits per byte on everyday English dialogs, tuned minus base
and prints one JSON object with every run and the means. Run folders go to --runs (deleted
afterwards unless --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def first_wordings(items):
    """The first item of each distinct trained answer (the FAQ's 'own first questions')."""
    seen, out = set(), []
    for it in items:
        if it.expected[0] not in seen:
            seen.add(it.expected[0])
            out.append(it)
    return out


def evaluate_run(run: Path, data: Path, quiz: Path | None, base_bpb: float | None) -> dict:
    from finetune_desktop.training.chat import load_chat_model
    from finetune_desktop.training.quiz import load_questions, run_quiz, score

    cm = load_chat_model(str(run))
    out: dict = {}
    if quiz is not None:
        res = run_quiz(cm, load_questions(quiz))
        out["quiz_score"] = score(res).correct
        out["quiz_total"] = len(res)
        out["quiz_replies"] = [{"q": r.item.question, "reply": r.reply, "ok": r.correct} for r in res]
    own_items = load_questions(data)
    res = run_quiz(cm, own_items)
    out["own_score"], out["own_total"] = score(res).correct, len(res)
    firsts = {id(it) for it in first_wordings(own_items)}
    fr = [r for r in res if id(r.item) in firsts]
    out["own_facts"], out["own_facts_total"] = score(fr).correct, len(fr)
    if base_bpb is not None:
        import persona_eval

        bpb = persona_eval.heldout_bpb(cm.model, cm.tokenizer)["heldout_bpb"]
        out["bpb"], out["bpb_rise"] = bpb, round(bpb - base_bpb, 4)
    return out


def markdown(results: list[dict], n_examples: int = 3) -> str:
    """A summary section for docs/outcomes/summary.md from content_eval JSON results."""
    out = ["## Content: does the tuned model learn what the data says?", "",
           "Default `finetune-desktop train FILE` (seeds as listed), then greedy questions as "
           "`finetune-desktop chat RUN --system S --prompt Q --temperature 0` asks them "
           "(tools/content_eval.py). A quiz answer is right when it contains one of the expected key strings; "
           "a training answer is reproduced when the reply contains the whole trained answer.", "",
           "| training file | seeds | unseen rewordings right | training answers reproduced (first wording of each fact) "
           "| all training questions | wall time of `train` | held-out bpb rise |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m, runs = r["mean"], r["runs"]
        seeds = ", ".join(str(x["seed"]) for x in runs)
        q = " / ".join(f"{x['quiz_score']}" for x in runs) + f" of {runs[0]['quiz_total']}" if r.get("quiz") else "-"
        f = " / ".join(f"{x['own_facts']}" for x in runs) + f" of {runs[0]['own_facts_total']}"
        a = " / ".join(f"{x['own_score']}" for x in runs) + f" of {runs[0]['own_total']}"
        t = " / ".join(f"{x['train_wall_s']:.0f} s" for x in runs)
        b = " / ".join(f"{x['bpb_rise']:+.3f}" for x in runs if x.get("bpb_rise") is not None) or "-"
        out.append(f"| `{Path(r['data']).name}` | {seeds} | {q} | {f} | {a} | {t} | {b} |")
    for r in results:
        if not r.get("quiz"):
            continue
        replies = r["runs"][0].get("quiz_replies") or []
        step = max(1, len(replies) // max(1, n_examples))
        out += ["", f"### Unseen rewordings, `{Path(r['data']).name}` (seed {r['runs'][0]['seed']}, evenly spaced, not picked)", ""]
        for x in replies[::step][:n_examples]:
            out.append(f"- {'✓' if x['ok'] else '✗'} **{x['q']}** {x['reply']}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--quiz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--base", default=None, help="model to fine-tune (default: the built-in model, no --base)")
    ap.add_argument("--runs", default=str(HERE / "_build" / "content_runs"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-bpb", action="store_true", help="skip the held-out bits-per-byte check")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    base_bpb = None
    if not args.no_bpb:
        import persona_eval
        from finetune_desktop.training.chat import load_chat_model

        b = load_chat_model(args.base or "base")
        base_bpb = persona_eval.heldout_bpb(b.model, b.tokenizer)["heldout_bpb"]
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        run = runs_dir / f"{Path(args.data).stem}_s{seed}"
        if run.exists():
            shutil.rmtree(run)
        cmd = [sys.executable, "-m", "finetune_desktop", "train", args.data, "--out", str(run), "--seed", str(seed),
               "--quiet", *(["--base", args.base] if args.base else []), *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            print(p.stdout + p.stderr, file=sys.stderr)
            return 1
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        row = {"seed": seed, "train_wall_s": round(wall, 2), "hyper": info.get("hyper"),
               "steps": info.get("step"), "final": info.get("final")}
        row.update(evaluate_run(run, Path(args.data), Path(args.quiz) if args.quiz else None, base_bpb))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "quiz_replies"}), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)

    def mean(k):
        v = [r[k] for r in rows if r.get(k) is not None]
        return round(sum(v) / len(v), 3) if v else None

    result = {"data": args.data, "quiz": args.quiz, "base": args.base or "base", "extra_args": extra,
              "base_bpb": base_bpb, "runs": rows,
              "mean": {k: mean(k) for k in ("quiz_score", "own_score", "own_facts", "bpb_rise", "train_wall_s")}}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(json.dumps(result["mean"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
