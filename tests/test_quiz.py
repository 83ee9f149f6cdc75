""""Did it learn?": quiz files, judging, questions from a training file, and the quiz command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_helpers import conversations, tiny_model_folder, write_jsonl

from finetune_desktop.training.quiz import (QuizFormatError, contains_any, items_from_conversations, judge,
                                            load_questions, read_quiz_file, reproduces)

ROOT = Path(__file__).resolve().parents[1]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines),
                    encoding="utf-8")
    return path


def test_judging_rules():
    assert contains_any("We open at 8:30 AM.", ["8:30 am"])
    assert not contains_any("We open at 9.", ["8:30", "half past eight"])
    assert contains_any("전화는 02-555-0193으로 주세요", ["555-0193"])
    assert contains_any("It’s on Tannery  Lane", ["tannery lane"])  # curly quote, double space
    assert reproduces("Sure! We're open Monday to Saturday from 8:30 am to 6 pm. Fair winds!",
                      "We're open Monday to Saturday from 8:30 am to 6 pm.")
    assert not reproduces("We're open Monday to Saturday.", "We're open Monday to Saturday from 8:30 am to 6 pm.")


def test_quiz_file_problems_name_file_line_and_field(tmp_path):
    good = {"question": "When do you open?", "expected": ["8:30"], "system": "You help a shop."}
    cases = [
        (["{not json"], "line 1: not valid JSON"),
        ([good, {"question": "", "expected": ["x"]}], "line 2: question"),
        ([good, {"question": "Q?", "expected": []}], "line 2: expected"),
        ([good, {"question": "Q?", "expected": ["x"], "sytem": "typo"}], "line 2: sytem: unknown key"),
        ([good, {"question": "Q?", "expected": ["x"], "system": 3}], "line 2: system"),
        ([[1, 2]], "line 1: expected a JSON object"),
    ]
    for i, (lines, msg) in enumerate(cases):
        p = write_lines(tmp_path / f"q{i}.jsonl", lines)
        with pytest.raises(QuizFormatError, match=msg) as e:
            read_quiz_file(p)
        assert str(p) in str(e.value)
    items = read_quiz_file(write_lines(tmp_path / "ok.jsonl", [good, "", {"question": "Where?", "expected": "Lane"}]))
    assert [it.line for it in items] == [1, 3]
    assert items[0].system == "You help a shop." and items[0].question == "When do you open?"
    assert items[1].system is None and items[1].expected == ("Lane",)


def test_a_training_file_asks_its_own_questions(tmp_path):
    from finetune_desktop.data.types import Conversation, Message

    convs = conversations(4) + [Conversation((Message("user", "Hi"), Message("assistant", "Hello!"),
                                              Message("user", "And you?"), Message("assistant", "Fine.")), 5),
                                conversations(1)[0]]  # a repeated question is asked once
    items = items_from_conversations(convs)
    assert len(items) == 5
    two = items[4]
    assert two.kind == "answer" and two.expected == ("Fine.",) and two.question == "And you?"
    assert [m["content"] for m in two.messages] == ["Hi", "Hello!", "And you?"]
    p = write_jsonl(tmp_path / "d.jsonl", conversations(3))
    loaded = load_questions(p)
    assert [it.kind for it in loaded] == ["answer"] * 3 and loaded[0].system == "You are a pirate."
    assert judge(loaded[0], "well: " + loaded[0].expected[0]) and not judge(loaded[0], "no idea")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("quiz")
    folder = tiny_model_folder(d / "tiny")
    data = write_jsonl(d / "pirate.jsonl", conversations(12))
    run = d / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(run), "--base",
                        str(folder), "--epochs", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return d, folder, data, run


def test_quiz_command_prints_replies_marks_and_the_score(tiny_run, tmp_path):
    from finetune_desktop.training.chat import load_chat_model
    from finetune_desktop.training.quiz import run_quiz, score

    d, folder, data, run = tiny_run
    quiz = write_lines(tmp_path / "quiz.jsonl", [{"question": q, "expected": ["matey"], "system": "You are a pirate."}
                                                 for q in ("Hello there!", "How are you doing?", "Tell me a tale.")])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_json = tmp_path / "res.json"
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "quiz", str(run), str(quiz), "--compare-base",
                        "--json", str(out_json)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    res = json.loads(out_json.read_text())
    assert res["total"] == 3 and len(res["results"]) == 3
    for r in res["results"]:
        assert r["correct"] == ("matey" in r["reply"].lower())  # the judge is the documented rule
        assert r["reply"] in p.stdout and r["question"] in p.stdout
    assert f"score: {res['score']}/3" in p.stdout and f"base model: {res['base_score']}/3" in p.stdout
    # the same numbers in process, through the library
    items = load_questions(quiz)
    assert score(run_quiz(load_chat_model(str(run)), items)).correct == res["score"]
    # and on the training file itself: its own answers
    p2 = subprocess.run([sys.executable, "-m", "finetune_desktop", "quiz", str(run), str(data)],
                        capture_output=True, text=True, env=env, timeout=300)
    assert p2.returncode == 0 and "the trained answers" in p2.stdout and "score: " in p2.stdout


def test_quiz_command_errors_are_one_line(tiny_run, tmp_path):
    d, folder, data, run = tiny_run
    bad = write_lines(tmp_path / "bad.jsonl", ['{"question": "Q?"}'])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, text in (((str(run), str(bad)), "expected"), ((str(run), str(tmp_path / "none.jsonl")), "no such file"),
                       ((str(tmp_path / "nomodel"), str(bad)), "expected")):
        p = subprocess.run([sys.executable, "-m", "finetune_desktop", "quiz", *args], capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


def test_train_with_a_quiz_scores_it_at_every_evaluation(tiny_run, tmp_path):
    from finetune_desktop.training.runs import load_run_metrics

    d, folder, data, _ = tiny_run
    quiz = write_lines(tmp_path / "quiz.jsonl", [{"question": "Hello!", "expected": ["matey"]},
                                                 {"question": "Good night.", "expected": ["sleep"]}])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(run), "--base",
                        str(folder), "--epochs", "2", "--quiz", str(quiz)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    ev = load_run_metrics(run).eval
    assert ev and ev[0]["step"] == 0 and all(e["quiz_total"] == 2 and 0 <= e["quiz_score"] <= 2 for e in ev)
    assert "quiz " in p.stdout and "/2" in p.stdout
