"""Fast tests of the pretraining pipeline in tools/ (tokenizer, chat template, masks, resumable
pretraining) on a tiny corpus written into tmp_path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import pretrain_base as pb  # noqa: E402
import train_tokenizer as tt  # noqa: E402
from finetune_desktop.engine import Tokenizer  # noqa: E402

EN = ["The cat sat on the warm mat by the window.", "I like to walk in the park when it is sunny.",
      "Would you like some tea or coffee this morning?", "We made soup with carrots, onions and beans."]
KO = ["안녕하세요, 오늘 날씨가 정말 좋네요.", "저는 아침에 커피를 마셔요.", "주말에 공원에서 산책했어요."]
DIALOGS = [
    [{"role": "user", "content": "Hi! How are you?"}, {"role": "assistant", "content": "I am fine, thank you. How about you?"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "What is soup?"},
     {"role": "assistant", "content": "Soup is a warm food made by boiling things in water."},
     {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "안녕하세요?"}, {"role": "assistant", "content": "네, 안녕하세요! 반가워요."}],
]


def write_corpus(root: Path) -> tuple[Path, Path]:
    build, corpus = root / "build", root / "corpus"
    build.mkdir()
    corpus.mkdir()
    docs = [{"source": "fortunes/x", "text": t} for t in EN * 6] + [{"source": "wordnet/example", "text": t} for t in KO * 6]
    (build / "plain.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (build / "plain.txt").write_text("\n\n".join(d["text"] for d in docs), encoding="utf-8")
    (build / "chat_thirdparty.jsonl").write_text(
        json.dumps({"messages": DIALOGS[0], "source": "chatterbot/x", "lang": "en"}) + "\n", encoding="utf-8")
    lines = [json.dumps({"messages": d}, ensure_ascii=False) for d in DIALOGS * 8]
    (corpus / "dialogs_a_01.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (corpus / "heldout_dialogs_en.jsonl").write_text(json.dumps({"messages": DIALOGS[1]}) + "\n", encoding="utf-8")
    return build, corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build, corpus = write_corpus(root)
    tok = tt.train_tokenizer(tt.corpus_texts(build, corpus), vocab_size=400)
    tt.save(tok, build / "tokenizer", 256)
    return build, corpus, Tokenizer.from_pretrained(build / "tokenizer")


def test_tokenizer_round_trips_english_and_korean(tiny):
    _, _, tok = tiny
    for text in EN + KO + ["Mixed 한국어 and English! 123"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, (text, ids)
    assert [tok.token_to_id(s) for s in tt.SPECIALS] == [0, 1, 2]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.bos_token is None
    # special tokens in text become single ids
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1


def test_chat_template_renders_chatml(tiny):
    _, _, tok = tiny
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with_sys = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs)
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_template_matches_transformers(tiny):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    build, _, tok = tiny
    ht = AutoTokenizer.from_pretrained(build / "tokenizer")
    for msgs in DIALOGS:
        for gp in (False, True):
            assert ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gp) == \
                tok.apply_chat_template(msgs, add_generation_prompt=gp)
    s = "Hello there! 안녕하세요."
    assert list(ht(s)["input_ids"]) == tok.encode(s)


def test_assistant_mask_covers_replies_and_im_end_only(tiny):
    _, _, tok = tiny
    msgs = DIALOGS[1]
    ids = tok.encode(tok.apply_chat_template(msgs))
    header = tok.encode("<|im_start|>assistant\n")
    lab = pb.assistant_labels(ids, header, tok.token_to_id("<|im_end|>"))
    counted = [i for i, l in zip(ids, lab) if l != pb.IGNORE]
    assert all(l == i for i, l in zip(ids, lab) if l != pb.IGNORE)
    expected = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
    assert tok.decode(counted) == expected
    # nothing counted without an assistant header
    assert (pb.assistant_labels(tok.encode("<|im_start|>user\nhi<|im_end|>\n"), header, 2) == pb.IGNORE).all()


def _args(out, build, corpus, extra=()):
    return ["--out", str(out), "--build-dir", str(build), "--corpus-dir", str(corpus),
            "--tokenizer", str(build / "tokenizer"), "--hidden-size", "32", "--intermediate-size", "48",
            "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2", "--seq-len", "32",
            "--batch-size", "4", "--phase1-steps", "2", "--phase2-steps", "1", "--checkpoint-every", "1",
            "--eval-minutes", "100", "--no-samples", "--quiet", "--seed", "7", *extra]


def _losses(out):
    return [(r["phase"], r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))
            if "loss" in r]


def test_pretrain_runs_and_resume_reproduces_losses_bit_for_bit(tiny, tmp_path):
    build, corpus, _ = tiny
    full = tmp_path / "full"
    assert pb.main(_args(full, build, corpus)) == 0
    losses = _losses(full)
    assert [(p, s) for p, s, _ in losses] == [(1, 1), (1, 2), (2, 1)]
    assert all(np.isfinite(l) for _, _, l in losses)
    state = json.loads((full / "checkpoint" / "state.json").read_text())
    assert state["done"] and state["tokens_seen"] == 3 * 4 * 32

    part = tmp_path / "part"
    assert pb.main(_args(part, build, corpus, ["--max-steps-this-run", "1"])) == 0
    assert len(_losses(part)) == 1
    assert pb.main(_args(part, build, corpus, ["--max-steps-this-run", "1"])) == 0
    assert pb.main(_args(part, build, corpus)) == 0
    assert _losses(part) == losses
    a = pb.read_safetensors(full / "checkpoint" / "params.safetensors")
    b = pb.read_safetensors(part / "checkpoint" / "params.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    evals = [json.loads(x) for x in open(part / "log.jsonl") if '"eval"' in x]
    assert evals and all(0 < e["heldout_bpb"] < 20 for e in evals)


@pytest.mark.parametrize("mode", ["all", "assistant"])
def test_phase2_rows_count_every_conversation_token_or_only_replies(tiny, tmp_path, mode):
    build, corpus, tok = tiny
    args = pb.build_parser().parse_args(_args(tmp_path / "run", build, corpus, ["--phase2-loss", mode, "--seq-len", "64"]))
    (tmp_path / "run").mkdir()
    data = pb.Data(args, tok, tmp_path / "run")
    ids, labels = data._p2_epoch(0)
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    real = ids != eot  # conversation tokens (eot only pads and separates conversations)
    assert real.sum() > 0 and (labels[~real] == pb.IGNORE).all()
    im_start = tok.token_to_id("<|im_start|>")
    # whole conversations are packed several to a row, each one starting with <|im_start|> right
    # after the row start or an eot separator
    starts = [(r, i) for r in range(len(ids)) for i in range(ids.shape[1])
              if ids[r, i] == im_start and (i == 0 or ids[r, i - 1] == eot)]
    assert len(starts) > len(ids), "no row holds more than one conversation"
    for r in range(len(ids)):
        for i in range(1, ids.shape[1]):
            if ids[r, i - 1] == eot and ids[r, i] != eot:
                assert ids[r, i] == im_start, (r, i)
    if mode == "all":
        assert np.array_equal(labels[real], ids[real])
    else:
        counted = labels[real] != pb.IGNORE
        assert 0 < counted.sum() < real.sum()
        assert np.array_equal(labels[real][counted], ids[real][counted])
        # every counted stretch is a reply: as many <|im_end|> counted as assistant turns packed
        n_replies = sum(1 for r in ids for i in range(len(r)) if list(r[i:i + len(data.header)]) == data.header)
        assert int((labels == im_end).sum()) == n_replies


def test_run_folder_from_before_phase2_loss_resumes_with_assistant_loss(tiny, tmp_path):
    build, corpus, tok = tiny
    (tmp_path / "fresh").mkdir()
    out = tmp_path / "old"
    assert pb.main(_args(out, build, corpus, ["--max-steps-this-run", "1"])) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["phase2_loss"] == "all"
    del cfg["phase2_loss"]  # what a run folder written before the option holds
    (out / "run_config.json").write_text(json.dumps(cfg))
    args = pb.build_parser().parse_args(_args(out, build, corpus))
    assert args.phase2_loss == "all"  # the command line default ...
    assert pb.run(args) == 0
    assert args.phase2_loss == "assistant"  # ... gives way to what the old run used
    ids, labels = pb.Data(args, tok, tmp_path / "fresh")._p2_epoch(0)
    assert 0 < (labels != pb.IGNORE).sum() < (ids != tok.token_to_id("<|endoftext|>")).sum()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["done"]
