"""Fast tests of the outcome tools: tools/persona_eval.py (style rule, questions, the evaluation on a
tiny model, the summary), tools/plot_runs.py (a PNG from a synthetic metrics.jsonl) and
tools/outcomes.sh (its syntax and its refusal without a model)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import persona_eval as pe  # noqa: E402
import plot_runs as pr  # noqa: E402
from tinymodel import make_tiny_model_folder  # noqa: E402

SAMPLE = ROOT / "sample_data"


def _assistant_replies(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    return out


def _norm(s: str) -> str:
    return re.sub(r"[^\w]+", " ", s.lower()).strip()


# ----------------------------------------------------------------------------- the style rule
@pytest.mark.parametrize("text", [
    "Arr, a warm bowl of soup will do ye good, matey!",
    "Ahoy! Try a walk in the park.",
    "Aye, that sounds like a fine plan.",
    "Yo ho, pack a sandwich and some apples. Fair winds!",
    "Time to set sail for the library, my friend.",
    "Drop anchor on the sofa and rest a while.",
    "ARRR! That be a tricky one.",
])
def test_pirate_replies_in_style(text):
    assert pe.in_style(text, "pirate"), pe.style_markers(text, "pirate")


@pytest.mark.parametrize("text", [
    "A warm bowl of soup is good on a cold day.",
    "You can take the bus; it is cheaper than the train.",
    "The sea is calm and the waves are small today.",       # plain sea words do not count
    "My friend works on a cruise ship as a cook.",
    "Parrots can copy words, and a compass points north.",
    "I'm not sure. Maybe you could try reading before bed?",
    "Yesterday we played cards and ate yellow rice.",      # 'ye' only as a whole word
    "Harry carried the array of jars.",                     # 'arr' only as a whole word
    "",
])
def test_plain_english_is_not_pirate(text):
    assert not pe.in_style(text, "pirate"), pe.style_markers(text, "pirate")


@pytest.mark.parametrize("text", [
    "아이고, 오늘은 된장찌개 끓이 묵으래이. 억수로 맛있데이!",
    "그라모 니 쫌 쉬라.",
    "밥은 뭇나?",
    "우짜노, 마이 힘들제?",
    "그거 내가 했다 카이.",
    "단디 챙기고 가라.",
    "와 이리 춥노?",
    "그기 맞다 아이가.",
])
def test_gyeongsang_replies_in_style(text):
    assert pe.in_style(text, "gyeongsang"), pe.style_markers(text, "gyeongsang")


@pytest.mark.parametrize("text", [
    "오늘은 된장찌개를 끓여 드세요. 정말 맛있어요!",
    "아이가 밥을 잘 안 먹으면 조금씩 자주 주세요.",        # 아이가 = 'the child', not the ending
    "피아노를 배워 보는 건 어때요? 피아노!",
    "데이트 계획을 세워 보세요. 데이터도 정리하고요.",
    "좀 쉬면서 물을 많이 마셔요.",
    "네, 그래요. 내일 만나요.",
    "스카이다이빙은 무서워요.",
    "",
])
def test_standard_korean_is_not_gyeongsang(text):
    assert not pe.in_style(text, "gyeongsang"), pe.style_markers(text, "gyeongsang")


def test_style_rule_is_calibrated_on_the_project_files():
    """Every persona reply of the sample files is in style; the project's standard everyday dialogs
    (the base model's own style) almost never are."""
    for persona, stem in (("pirate", "pirate_captain"), ("gyeongsang", "gyeongsang_ajumma")):
        pos = _assistant_replies(SAMPLE / f"{stem}.jsonl") + _assistant_replies(SAMPLE / f"{stem}_valid.jsonl")
        missed = [r for r in pos if not pe.in_style(r, persona)]
        assert not missed, f"{persona}: {len(missed)} sample replies not recognised, e.g. {missed[:3]}"
    corpus = sorted((TOOLS / "corpus").glob("*.jsonl"))
    if not corpus:
        pytest.skip("tools/corpus has no dialogs")
    en, ko = [], []
    for f in corpus:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                msgs = json.loads(line)["messages"]
            except (ValueError, KeyError, TypeError):
                continue
            for m in msgs:
                if m.get("role") == "assistant" and isinstance(m.get("content"), str):
                    (ko if re.search("[가-힣]", m["content"]) else en).append(m["content"])
    for persona, texts in (("pirate", en), ("gyeongsang", ko)):
        if len(texts) < 50:
            continue
        fp = [t for t in texts if pe.in_style(t, persona)]
        assert len(fp) / len(texts) <= 0.02, f"{persona}: {len(fp)}/{len(texts)} standard replies marked, e.g. {fp[:3]}"


# ----------------------------------------------------------------------------- the questions
def _sample_questions() -> set[str]:
    qs = set()
    for f in SAMPLE.glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8-sig").splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if not isinstance(d, dict):
                continue
            msgs = d.get("messages")
            for m in msgs if isinstance(msgs, list) else []:
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                    qs.add(_norm(m["content"]))
            if isinstance(d.get("prompt"), str):
                qs.add(_norm(d["prompt"]))
    for f in SAMPLE.glob("*.csv"):
        with open(f, encoding="utf-8-sig", newline="") as fh:
            for row in csv.reader(fh):
                if row:
                    qs.add(_norm(row[0]))
    return qs


def test_eval_questions_are_not_in_the_sample_files():
    en, ko = pe.load_questions("en"), pe.load_questions("ko")
    assert len(en) >= 35 and len(ko) >= 20
    assert len(set(en)) == len(en) and len(set(ko)) == len(ko)
    assert not any(re.search("[가-힣]", q) for q in en)
    assert all(re.search("[가-힣]", q) for q in ko)
    seen = _sample_questions()
    assert len(seen) > 100
    clash = [q for q in en + ko if _norm(q) in seen]
    assert not clash, f"questions that are in sample_data/: {clash}"


def test_system_messages_come_from_the_training_files():
    assert pe.system_message(pe.PERSONAS["pirate"].train_file).startswith("You are Captain")
    assert "경상도" in pe.system_message(pe.PERSONAS["gyeongsang"].train_file)


def test_load_questions_names_the_problem(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"en": []}), encoding="utf-8")
    with pytest.raises(pe.EvalError, match="'en'"):
        pe.load_questions("en", bad)


def test_distinct_2_and_examples():
    assert pe.distinct_2(["a b a b"]) == pytest.approx(2 / 3)
    assert pe.distinct_2(["one"]) == 0.0
    assert pe.pick_examples([{}] * 10, 3) == [0, 4, 9] or pe.pick_examples([{}] * 10, 3) == [0, 5, 9]
    assert pe.pick_examples([{}] * 2, 5) == [0, 1]
    assert pe.pick_examples([], 3) == []


# ----------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def _questions_file(tmp_path) -> Path:
    f = tmp_path / "questions.json"
    f.write_text(json.dumps({"en": ["How are you?", "What is the weather like?", "Tell me a story."],
                             "ko": ["안녕하세요?", "오늘 날씨 어때요?"]}, ensure_ascii=False), encoding="utf-8")
    return f


def _heldout_file(tmp_path) -> Path:
    f = tmp_path / "heldout.jsonl"
    convs = [[{"role": "user", "content": "Hello! How are you today?"},
              {"role": "assistant", "content": "I am fine, thank you."}],
             [{"role": "user", "content": "What is the weather like?"},
              {"role": "assistant", "content": "It is sunny and warm."}]]
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return f


def test_persona_eval_on_a_tiny_model(tiny, tmp_path):
    out = tmp_path / "r.json"
    rc = pe.main([str(tiny), "--persona", "pirate", "--base-model", str(tiny), "--json", str(out),
                  "--questions", str(_questions_file(tmp_path)), "--heldout", str(_heldout_file(tmp_path)),
                  "--max-new-tokens", "8", "--examples", "2"])
    assert rc == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    for key in ("persona", "model", "system", "tuned", "tuned_no_system", "base", "heldout", "replies", "examples"):
        assert key in r, key
    for part in ("tuned", "tuned_no_system", "base"):
        for k in ("questions", "in_style_fraction", "ended_fraction", "distinct_2", "mean_reply_words",
                  "mean_reply_tokens", "plain_word_fraction"):
            assert k in r[part], (part, k)
        assert r[part]["questions"] == 3
        assert 0.0 <= r[part]["in_style_fraction"] <= 1.0
    assert r["system"] == pe.system_message(pe.PERSONAS["pirate"].train_file)
    assert r["no_system_prompt_is_the_same"] is False
    h = r["heldout"]
    assert math.isfinite(h["base_bpb"]) and h["base_bpb"] > 0
    assert h["delta_bpb"] == pytest.approx(0.0, abs=1e-9)     # the same model twice
    assert len(r["replies"]) == 3 and len(r["examples"]) == 2
    for rep in r["replies"]:
        assert rep["tokens"] <= 8 and isinstance(rep["markers"], list)
        assert rep["ended"] == (rep["tokens"] < 8)
        assert rep["base_reply"] == rep["reply"]             # same model, same greedy prompt


def test_persona_eval_greedy_matches_a_direct_engine_call(tiny, tmp_path):
    """The reply is exactly what Model.generate gives for the ChatML prompt with the system message."""
    from finetune_desktop.engine import Model, Tokenizer

    m, tok = Model.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    item = pe.ask(m, tok, "안녕하세요?", "너는 친절하다.", max_new_tokens=6, repetition_penalty=1.0)
    ids = tok.encode(tok.apply_chat_template([{"role": "system", "content": "너는 친절하다."},
                                              {"role": "user", "content": "안녕하세요?"}], add_generation_prompt=True))
    assert ids[:1] == [tok.token_to_id("<|im_start|>")]
    gen = list(m.generate(ids, max_new_tokens=6, temperature=0.0, stop_ids=tok.end_of_turn_ids))
    assert item["reply"] == tok.decode(gen, skip_special_tokens=True).strip()
    assert item["tokens"] == len(gen)


def test_persona_eval_replies_like_the_chat_command(tiny):
    """With the same settings, the reply is what `finetune-desktop chat MODEL --prompt Q --temperature 0`
    prints (its default repetition penalty is 1.1)."""
    from finetune_desktop.training.chat import GenerationSettings, load_chat_model, stream_reply

    cm = load_chat_model(str(tiny))
    msgs = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello! How are you?"}]
    via_chat = "".join(stream_reply(cm, msgs, GenerationSettings(temperature=0.0, max_new_tokens=10,
                                                                 repetition_penalty=1.1))).strip()
    item = pe.ask(cm.model, cm.tokenizer, "Hello! How are you?", "You are kind.", max_new_tokens=10)
    assert item["reply"] == via_chat


def test_persona_eval_errors_are_one_line(tmp_path, capsys):
    rc = pe.main([str(tmp_path / "nope"), "--persona", "gyeongsang"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_summary_markdown(tmp_path):
    base = {"heldout_bpb": 1.9, "heldout_conversations": 200, "ended_fraction": 0.975, "distinct_2": 0.7,
            "questions": 40, "generate_tokens_per_s": 900.0}
    ev = {"system": "You are Captain Marigold Finch, a cheerful pirate captain.",
          "tuned": {"questions": 3, "in_style_fraction": 1.0, "ended_fraction": 1.0, "distinct_2": 0.8,
                    "mean_reply_words": 20.0},
          "base": {"questions": 3, "in_style_fraction": 0.0, "distinct_2": 0.7, "mean_reply_words": 15.0},
          "heldout": {"base_bpb": 1.9, "tuned_bpb": 2.1, "delta_bpb": 0.2, "max_rise": 0.5},
          "replies": [{"question": f"Q{i}?", "reply": f"Arr, answer {i} | <b>", "base_reply": f"Answer {i}."}
                      for i in range(5)]}
    timef = tmp_path / "train_pirate.time"
    timef.write_text("\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:52.30\n"
                     "\tMaximum resident set size (kbytes): 512000\n\tExit status: 0\n", encoding="utf-8")
    t = pe.parse_time_v(timef)
    assert t == {"wall_s": 52.3, "max_rss_mb": 500.0, "exit_status": 0}
    rj = {"data": {"path": "/x/pirate_captain.jsonl", "num_train": 140, "num_valid": 29},
          "hyper": {"epochs": 3, "steps_per_epoch": 18, "batch_size": 8, "learning_rate": 0.002},
          "settings": {"method": "lora", "lora_rank": 16}, "final": {"train_loss": 1.1, "valid_loss": 1.3, "elapsed_s": 40.0}}
    md = pe.summary_markdown(base, [{"name": "pirate", "run_json": rj, "time": t, "eval": ev}], "base_model")
    assert "`pirate_captain.jsonl`" in md and "52.3 s ✅" in md and "500 MB ✅" in md
    assert "100% of 3 ✅" in md and "1.900 → 2.100 (+0.200) ✅" in md
    assert md.count("**Q: ") == 3 and "\\|" in md and "<b>" not in md


# ----------------------------------------------------------------------------- the plot
def _synthetic_run(path: Path, data_name: str, steps: int = 30, per_epoch: int = 10) -> Path:
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "epoch": s / per_epoch, "train_loss": 3.0 * math.exp(-s / 10) + 1 + 0.1 * (-1) ** s})
        if s % 5 == 0:
            lines.append({"step": s, "epoch": s / per_epoch, "valid_loss": 3.0 * math.exp(-s / 12) + 1.2})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 31, "train_lo'   # a cut-off last line
    (path / "metrics.jsonl").write_text(text, encoding="utf-8")
    (path / "run.json").write_text(json.dumps({"data": {"path": f"/somewhere/{data_name}"}}), encoding="utf-8")
    return path


def test_plot_runs_writes_a_png(tmp_path):
    a = _synthetic_run(tmp_path / "a", "pirate_captain.jsonl")
    b = _synthetic_run(tmp_path / "b", "gyeongsang_ajumma.jsonl", steps=12, per_epoch=4)
    s = pr.load_series(a)
    assert s.label == "pirate_captain.jsonl"
    assert len(s.steps) == 30 and len(s.valid) == 6 and s.epoch_ends == (10, 20)
    out = tmp_path / "docs" / "curves.png"
    assert pr.main([str(a), str(b), "--out", str(out), "--size", "600x250"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PySide6.QtGui import QImage

    img = QImage(str(out))
    assert (img.width(), img.height()) == (600, 250)
    colors = {img.pixelColor(x, y).name() for x in range(0, 600, 3) for y in range(0, 250, 3)}
    assert len(colors) > 20          # something was drawn, not a blank canvas
    assert not list(out.parent.glob(".*tmp*"))


def test_plot_helpers():
    assert pr.moving_average([1, 2, 3, 4, 5], 3) == [1.5, 2, 3, 4, 4.5]
    assert pr.moving_average([0, 3, 0], 3) == [1.5, 1, 1.5]
    assert pr.moving_average([2, 4], 1) == [2, 4]
    assert pr.nice_ticks(0.7, 4.3, 5) == [1, 2, 3, 4]
    assert pr.smoothing_window(54) % 2 == 1


def test_plot_runs_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert pr.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ----------------------------------------------------------------------------- the one command
def test_outcomes_script_syntax_and_missing_model(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = TOOLS / "outcomes.sh"
    assert subprocess.run([bash, "-n", str(script)]).returncode == 0
    env = dict(os.environ, BASE_MODEL=str(tmp_path / "missing"), PYTHON=sys.executable,
               OUTCOMES=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"), PLOT=str(tmp_path / "p.png"))
    p = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "error: no model in" in p.stderr and "Traceback" not in p.stderr
