"""More wordings of the training questions, written by the base model (training/augment.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_training_helpers import conversations, tiny_model_folder, write_jsonl

from finetune_desktop.data.types import Conversation, Message
from finetune_desktop.training.augment import _clean, repeated_answer_share, reword, wanted
from finetune_desktop.training.quiz import normalize

ROOT = Path(__file__).resolve().parents[1]


def faq(n_facts=4, wordings=3) -> list[Conversation]:
    out = []
    for k in range(wordings):
        for f in range(n_facts):
            out.append(Conversation((Message("system", "You help a shop."), Message("user", f"Question {f} form {k}?"),
                                     Message("assistant", f"Answer number {f}.")), len(out) + 1))
    return out


def test_rewording_is_asked_for_never_automatic():
    assert repeated_answer_share(faq()) == 1.0
    assert wanted("auto", faq()) == 0  # the embedded model cannot paraphrase
    assert repeated_answer_share(conversations(12)) == 0.0  # a persona: every reply different
    assert wanted("auto", conversations(12)) == 0
    assert wanted(2, conversations(12)) == 2 and wanted(0, faq()) == 0


def test_what_counts_as_a_usable_new_wording():
    q = "What time do you open on Saturdays?"
    assert _clean("  When do   you open on a Saturday? ", q) == "When do you open on a Saturday?"
    assert _clean("Open? Yes. We are open. Come.", q) is None          # several sentences
    assert _clean("x" * 150, q) is None                                # far longer than the question
    assert _clean("??", q) is None
    assert _clean("Ask this question another way: hi", q) is None      # an echo of the prompt


def test_reword_keeps_answers_and_never_repeats_a_question(tmp_path):
    from finetune_desktop.engine import Model, Tokenizer

    folder = tiny_model_folder(tmp_path / "tiny")
    model, tok = Model.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    convs = faq()
    res = reword(model, tok, convs, 2, seed=3)
    assert res.asked == len(convs)
    originals = {normalize(c.messages[1].content) for c in convs}
    by_line = {c.line: c for c in convs}
    produced = {}
    for c in res.conversations:
        src = by_line[c.line]
        assert c.messages[0] == src.messages[0] and c.messages[2] == src.messages[2]  # system and answer kept
        q = normalize(c.messages[1].content)
        assert q not in originals
        produced.setdefault(q, set()).add(c.messages[2].content)
    assert all(len(a) == 1 for a in produced.values())  # no wording for two different answers
    again = reword(model, tok, convs, 2, seed=3)
    assert [c.messages for c in again.conversations] == [c.messages for c in res.conversations]  # deterministic


def test_a_run_keeps_its_reworded_examples_and_a_resume_reuses_them(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "faq.jsonl", faq(6, 3))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(run), "--base",
                        str(folder), "--epochs", "2", "--reword", "3"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "more wordings of each training question" in p.stdout
    info = json.loads((run / "run.json").read_text())
    lines = [json.loads(l) for l in (run / "reworded.jsonl").read_text().splitlines() if l.strip()]
    assert info["data"]["reworded"] == len(lines)
    assert info["data"]["num_train"] == 18 + len(lines)
    before = (run / "reworded.jsonl").read_bytes()
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(run), "--resume",
                        "--epochs", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (run / "reworded.jsonl").read_bytes() == before
    assert "more wordings" not in p.stdout  # read back, not written again


def test_question_dropout_replaces_only_context_tokens():
    import numpy as np

    from finetune_desktop.training.augment import drop_question_tokens, question_dropout

    special = {0, 1, 2}
    # <|im_start|> user \n q q q q q q <|im_end|> \n <|im_start|> assistant \n a a a <|im_end|>  pad pad
    row = [1, 10, 11] + list(range(20, 26)) + [2, 11, 1, 12, 11, 30, 31, 32, 2, 0, 0]
    lab = [-100] * 14 + [30, 31, 32, 2, -100, -100]
    am = [1] * 18 + [0, 0]
    ids, labels, mask = np.array([row] * 64), np.array([lab] * 64), np.array([am] * 64)
    out = drop_question_tokens(ids, labels, mask, special, 50, 0.5, np.random.default_rng(0))
    changed = out != ids
    assert not changed[:, [0, 1, 2, 9, 10, 11, 12, 13]].any()  # special tokens, role markers, reply header
    assert not changed[:, 14:].any()                           # the trained reply and the padding
    frac = changed[:, 3:9].mean()
    assert 0.35 < frac < 0.6, frac                                  # ~p of the question (a few draws repeat it)
    assert not np.isin(out[changed], list(special)).any()
    again = drop_question_tokens(ids, labels, mask, special, 50, 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    assert question_dropout("auto", faq()) == 0.0 and question_dropout("auto", conversations(12)) == 0.0
    assert question_dropout(0.2, conversations(12)) == 0.2


def test_the_samples_are_told_apart_facts_from_style():
    """The automatic epochs rule trains an FAQ longer than a persona: the shipped samples."""
    from pathlib import Path

    from finetune_desktop.data import read_conversations
    from finetune_desktop.training.augment import answers_repeat

    root = Path(__file__).resolve().parents[1] / "sample_data"
    assert answers_repeat(read_conversations(root / "faq_bike_shop.jsonl"))
    assert answers_repeat(read_conversations(root / "faq_gimbap_cafe_ko.jsonl"))
    assert not answers_repeat(read_conversations(root / "pirate_captain.jsonl"))
    assert not answers_repeat(read_conversations(root / "gyeongsang_ajumma.jsonl"))
