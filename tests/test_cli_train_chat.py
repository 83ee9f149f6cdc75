"""`finetune-desktop train` and `chat` end to end, as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_helpers import conversations, tiny_model_folder, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
MISTAKES = ROOT / "sample_data" / "with_mistakes.jsonl"


def cli(*args, timeout=120, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "finetune_desktop", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT), **kw)


def no_traceback(p):
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    folder = tiny_model_folder(d / "tiny")
    data = write_jsonl(d / "pirate.jsonl", conversations(12))
    valid = write_jsonl(d / "pirate_valid.jsonl", conversations(16)[12:])
    return d, folder, data, valid


@pytest.fixture(scope="module")
def trained(setup):
    d, folder, data, valid = setup
    out = d / "run"
    p = cli("train", data, "--out", out, "--base", folder, "--validation-file", valid, "--epochs", 2,
            "--batch-size", 4, "--learning-rate", "0.02")
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    return out, p


def test_train_prints_progress_and_summary(trained):
    out, p = trained
    lines = p.stdout.splitlines()
    assert sum(1 for l in lines if l.startswith("step ")) == 6
    assert any("evaluation at step 6: validation loss" in l for l in lines)
    assert "finished in" in p.stdout and "final train loss" in p.stdout and "validation loss" in p.stdout
    assert f"model: {out / 'model'}" in p.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["settings"]["method"] == "lora"
    assert len(info["data"]["sha256"]) == 64 and info["data"]["num_train"] == 12 and info["data"]["num_valid"] == 4
    assert info["hyper"]["epochs"] == 2 and info["hyper"]["batch_size"] == 4
    assert info["system_prompt"] == "You are a pirate."
    assert (out / "model" / "model.safetensors").exists() and (out / "adapter" / "adapter_model.safetensors").exists()


def test_chat_prompt_prints_only_the_greedy_reply(setup, trained):
    from finetune_desktop.engine import Model, Tokenizer

    out, _ = trained
    p = cli("chat", out, "--prompt", "Hello!", "--temperature", 0, "--max-new-tokens", 12, "--system", "You are a pirate.")
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    m = Model.from_pretrained(out / "model")
    tok = Tokenizer.from_pretrained(out / "model")
    prompt = tok.apply_chat_template([{"role": "system", "content": "You are a pirate."},
                                      {"role": "user", "content": "Hello!"}], add_generation_prompt=True)
    ids = list(m.generate(tok.encode(prompt), max_new_tokens=12, temperature=0, repetition_penalty=1.1,
                          stop_ids=tok.end_of_turn_ids))
    assert p.stdout == tok.decode(ids, skip_special_tokens=True) + "\n"
    # the tuned model's template adds the training data's system prompt when none is given
    p3 = cli("chat", out, "--prompt", "Hello!", "--temperature", 0, "--max-new-tokens", 12)
    assert p3.stdout == p.stdout
    base_tok = Tokenizer.from_pretrained(setup[1])
    assert "You are a pirate." not in base_tok.apply_chat_template([{"role": "user", "content": "Hello!"}])
    assert tok.apply_chat_template([{"role": "user", "content": "Hello!"}]) == tok.apply_chat_template(
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}])
    # the model folder and the run folder are the same model
    p2 = cli("chat", out / "model", "--prompt", "Hello!", "--temperature", 0, "--max-new-tokens", 12,
             "--system", "You are a pirate.")
    assert p2.stdout == p.stdout


def test_interactive_chat_keeps_history_and_ends_on_empty_line(trained):
    out, _ = trained
    p = cli("chat", out, "--temperature", 0, "--max-new-tokens", 5, input="Hello!\nHow are you?\n\nignored\n")
    no_traceback(p)
    assert p.returncode == 0
    assert len(p.stdout.splitlines()) >= 2  # one reply per question (a reply may itself hold newlines)
    p = cli("chat", out, "--temperature", 0, "--max-new-tokens", 5, input="")  # EOF at once
    assert p.returncode == 0 and p.stdout == ""


def test_stop_with_ctrl_c_then_resume(setup):
    d, folder, data, _ = setup
    out = d / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(out), "--base",
                             str(folder), "--epochs", "20", "--batch-size", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        for line in proc.stdout:
            if line.startswith("step") and line.split()[1].startswith("3/"):
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in rest
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "stopped" and 3 <= info["step"] < 60
    p = cli("train", data, "--out", out, "--resume")
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]
    assert steps == list(range(1, 61))
    # more epochs on the finished run
    p = cli("train", data, "--out", out, "--resume", "--epochs", 21)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "run.json").read_text())["final"]["steps"] == 63


def test_a_killed_run_resumes_from_its_last_checkpoint(setup):
    d, folder, data, _ = setup
    out = d / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(out), "--base",
                             str(folder), "--epochs", "10", "--batch-size", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(ROOT))
    try:
        for line in proc.stdout:
            if line.startswith("step") and line.split()[1].startswith("8/"):  # 3 steps an epoch: 2 checkpoints
                break
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running"  # it never got to say otherwise
    p = cli("train", data, "--out", out, "--resume")
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert "resuming at step" in p.stdout
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]
    assert steps == list(range(1, 31))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_bad_input_gives_one_line_errors_and_no_traceback(setup, trained, tmp_path, capsys):
    from finetune_desktop.cli import main

    d, folder, data, _ = setup
    out, _ = trained
    cases = [
        (("train", tmp_path / "missing.jsonl", "--out", tmp_path / "o1", "--base", folder), 2, "no such file"),
        (("train", data, "--out", out, "--base", folder), 2, "already holds a run"),
        (("train", data, "--out", tmp_path / "o3", "--base", tmp_path / "nomodel"), 2, "does not exist"),
        (("train", data, "--out", tmp_path / "o4", "--resume"), 2, "run.json"),
        (("train", data, "--out", tmp_path / "o5", "--base", folder, "--val-split", "1.5"), 2, "val-split"),
        (("chat", tmp_path / "nomodel", "--prompt", "hi"), 2, "does not exist"),
        (("chat", out, "--prompt", "hi", "--temperature", "-1"), 2, "temperature"),
    ]
    for args, code, text in cases:  # in-process: the same code path as the command, faster
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == code, (args, rc, err)
        assert text in err, (args, err)
        assert all(l.startswith("error: ") or l.startswith("usage:") for l in err.strip().splitlines()), err
    # and one for real, as a separate process: every data error on its own line, nothing written
    p = cli("train", MISTAKES, "--out", tmp_path / "o2", "--base", folder)
    no_traceback(p)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) >= 10 and all("with_mistakes.jsonl: line " in l for l in lines[:-1]), lines
    assert "line 2" in lines[0]
    assert not (tmp_path / "o2").exists()


def test_chat_base():
    """`chat base` talks to the embedded model, or says clearly that it is not installed."""
    from finetune_desktop.training.loading import base_model_dir

    p = cli("chat", "base", "--prompt", "Hello!", "--temperature", 0, "--max-new-tokens", 24)
    no_traceback(p)
    if (base_model_dir() / "config.json").exists():
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() and p.stdout.endswith("\n") and "<|im_end|>" not in p.stdout
    else:
        assert p.returncode == 2 and "base model is not installed" in p.stderr
        p = cli("train", MISTAKES.parent / "pirate_captain.jsonl", "--out",
                Path(os.environ["FINETUNE_DESKTOP_HOME"]) / "x")
        assert p.returncode == 2 and "base model is not installed" in p.stderr
