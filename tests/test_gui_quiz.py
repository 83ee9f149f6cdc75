""""Did it learn?" and the measures drawn beside the loss, in the real window on a real tiny model:
a quiz file chosen before the run is scored at every evaluation and drawn on the chart; after the
run the tuned and the base model answer the same questions in the table (the library's greedy
replies and verdicts); the forgetting meter is drawn when the base model ships general dialogs;
chat replies lose stray replacement characters at their ends only."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).parent))
from gui_helpers import main_window  # noqa: E402
from tinymodel import make_tiny_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "pirate_prompt_completion.jsonl"
QUIZ = [{"question": "Hello!", "expected": ["Ahoy"]},
        {"question": "How are you?", "expected": ["matey", "fine"]},
        {"question": "안녕하세요?", "expected": ["Arr"]}]
GENERAL = [{"messages": [{"role": "user", "content": f"Tell me about day {i}."},
                         {"role": "assistant", "content": "It was a quiet day with sun and a little rain."}]}
           for i in range(6)]


@pytest.fixture(scope="module")
def base_with_general(tmp_path_factory):
    """A tiny model folder that ships general dialogs (general_eval.jsonl): the forgetting meter's data."""
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("gen") / "model")
    (folder / "general_eval.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GENERAL), encoding="utf-8")
    return folder


@pytest.fixture
def window(qtbot, base_with_general):
    with main_window(qtbot, base_with_general, size=(1280, 800), timeout_s=60) as w:
        yield w


def drawn(curve) -> list:
    """The y values a chart curve draws ([] when it draws nothing)."""
    y = curve.getData()[1]
    return [] if y is None else list(y)


def library_answers(spec, items):
    from finetune_desktop.training.chat import load_chat_model
    from finetune_desktop.training.quiz import ask, quiz_settings
    return list(ask(load_chat_model(str(spec)), items, quiz_settings()))


def test_quiz_file_on_the_chart_and_both_models_in_the_table(window, qtbot, tmp_path, base_with_general):
    from finetune_desktop.gui.workers import clean_reply
    from finetune_desktop.training.quiz import read_quiz_file
    w = window
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUIZ), encoding="utf-8")
    w.quiz_view.set_quiz_file(str(quiz))                     # chosen before the run
    w.load_data_file(str(DATA))
    qtbot.waitUntil(lambda: w.drop_zone.property("state") == "ok", timeout=60_000)
    w.data_panel.epochs.setValue(2)
    w.data_panel.batch.setValue(4)
    with qtbot.waitSignal(w.trainingFinished, timeout=180_000) as done:
        w.start_training()
    run_dir = Path(done.args[0])
    assert json.loads((run_dir / "run.json").read_text())["settings"]["quiz_file"] == str(quiz)
    # every evaluation scored the quiz; the chart draws it (right axis) beside the general loss
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if x.strip() and "quiz_score" in json.loads(x)]
    assert evals and evals[0]["step"] == 0
    chart = w.loss_panel.chart
    qx, qy = chart.quiz_curve.getData()
    assert list(qx) == [e["step"] for e in evals]
    assert list(qy) == pytest.approx([e["quiz_score"] / e["quiz_total"] for e in evals])
    gx, gy = chart.general_curve.getData()
    assert list(gy) == pytest.approx([e["general_loss"] for e in evals])  # the forgetting meter
    legend = " · ".join(w.loss_panel.legend_entries)
    assert "quiz score (right)" in legend and "general ability" in legend
    # after the run: the table fills, one question at a time, with both models' greedy answers
    with qtbot.waitSignal(w.quiz_view.quizFinished, timeout=180_000) as fin:
        pass
    table = w.quiz_view.table
    assert table.rowCount() == len(QUIZ)
    items = read_quiz_file(quiz)
    tuned = library_answers(run_dir / "model", items)
    base = library_answers(base_with_general, items)
    for r in range(len(QUIZ)):
        assert table.item(r, 0).text() == QUIZ[r]["question"]
        assert table.item(r, 3).text() == (clean_reply(tuned[r].reply) or "(no reply)")
        assert table.item(r, 4).text() == ("✓" if tuned[r].correct else "✗")
        assert table.item(r, 1).text() == (clean_reply(base[r].reply) or "(no reply)")
        assert table.item(r, 2).text() == ("✓" if base[r].correct else "✗")
    t_score, b_score = fin.args
    assert (t_score.correct, t_score.total) == (sum(x.correct for x in tuned), len(QUIZ))
    assert (b_score.correct, b_score.total) == (sum(x.correct for x in base), len(QUIZ))
    assert f"{t_score}" in w.quiz_view.score.text()
    # questions from the training file: is the trained answer reproduced? Asked while a quiz on the
    # quiz file is still going: the table shows the newer quiz only
    w.quiz_view.ask_again()
    w.quiz_view.from_training.setChecked(True)
    with qtbot.waitSignal(w.quiz_view.quizFinished, timeout=180_000):
        w.quiz_view.ask_again()
    qtbot.wait(200)                                           # what the stopped quiz still sends
    n = sum(1 for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip())
    assert table.rowCount() == min(n, 20)
    assert all(table.item(r, 4).text() in ("✓", "✗") for r in range(table.rowCount()))
    assert [table.item(r, 0).text() for r in range(3)] != [q["question"] for q in QUIZ]
    assert not w.quiz_view.is_asking()


def test_a_saved_run_reopens_with_its_general_loss_and_quiz_lines(qtbot, tmp_path):
    from finetune_desktop.gui.loss_chart import LossPanel
    p = LossPanel()
    qtbot.addWidget(p)
    p.show()
    rows = [{"step": 0, "general_loss": 2.0, "quiz_score": 0, "quiz_total": 4},
            {"step": 1, "train_loss": 3.0, "lr": 1e-3, "epoch": 0.5},
            {"step": 2, "train_loss": 2.5, "lr": 1e-3, "epoch": 1.0},
            {"step": 2, "general_loss": 2.3, "quiz_score": 3, "quiz_total": 4, "valid_loss": 2.8}]
    p.load_rows(rows)
    assert drawn(p.chart.general_curve) == [2.0, 2.3]
    assert drawn(p.chart.quiz_curve) == [0.0, 0.75]
    assert drawn(p.chart.valid_curve) == [2.8]          # no validation at step 0: not drawn
    assert {"general ability", "quiz score (right)"} <= set(p.legend_entries)
    p.load_rows(rows[1:3])
    assert "general ability" not in p.legend_entries and drawn(p.chart.general_curve) == []


def test_replies_lose_stray_replacement_characters_only_at_their_ends(qtbot, monkeypatch, base_with_general):
    from finetune_desktop.gui import workers
    from finetune_desktop.gui.workers import clean_reply
    assert clean_reply("\ufffd Hello \ufffd there\ufffd ") == "Hello \ufffd there"
    assert clean_reply(" \ufffd\ufffd안녕하세요") == "안녕하세요"
    assert clean_reply("\ufffd") == ""
    assert clean_reply("\x13Ahoy\x13 matey\x07\n") == "Ahoy\x13 matey"       # lone byte tokens decode to controls too
    assert clean_reply("\ufffdAhoy\ufffd", final=False) == "Ahoy\ufffd"     # a streamed end may still complete
    # through the chat panel: the model's stream starts with a stray byte
    monkeypatch.setattr(workers, "stream_reply", lambda *a, **k: iter(["\ufffd", "Ahoy", " \ufffd matey", "\ufffd"]))
    from finetune_desktop.gui import MainWindow
    w = MainWindow(base_model=base_with_general)
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.replyFinished, timeout=30_000) as got:
        w.chat.send("Hello")
    assert got.args[0] == "Ahoy \ufffd matey"
    assert w.chat.transcript.messages[-1]["content"] == "Ahoy \ufffd matey"
    assert w.shutdown(timeout_s=30)
    w.close()


def test_no_general_dialogs_no_meter(qtbot):
    from finetune_desktop.gui.loss_chart import LossPanel
    from finetune_desktop.training.events import EvalMetrics
    p = LossPanel()
    qtbot.addWidget(p)
    p.add_eval(EvalMetrics(step=0, epoch=0.0, valid_loss=2.0, valid_token_accuracy=0.3))
    p.redraw()
    assert drawn(p.chart.general_curve) == [] and drawn(p.chart.quiz_curve) == []
    assert "general ability" not in p.legend_entries and "quiz score (right)" not in p.legend_entries
    assert np.isnan(p.evals.view("general_loss")).all()

