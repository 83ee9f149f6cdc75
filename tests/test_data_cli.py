"""`finetune-desktop validate`: exit codes 0/1/2, errors with their lines, --json, and never a
traceback. Most cases run through the real command line in a subprocess."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_desktop.cli.validate import run as run_validate

ROOT = Path(__file__).resolve().parents[1]

GOOD = [{"messages": [{"role": "system", "content": "You are a cheerful pirate."},
                      {"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Arr, answer number {i}, matey!"}]} for i in range(12)]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "validate", *map(str, args)],
                       capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=120)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    return p.returncode, p.stdout, p.stderr


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    from tinymodel import make_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


def test_valid_file_exits_0_with_summary(tmp_path, tok_folder):
    p = write_jsonl(tmp_path / "good.jsonl", GOOD)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    code, out, err = run(p, "--base", tok_folder, "--max-seq-len", "64")
    assert code == 0, out + err
    assert "examples: 12" in out and "tokens:" in out and "p50" in out and "histogram" in out
    assert out.strip().splitlines()[-1].startswith("valid:")
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.jsonl"]


def test_invalid_file_exits_1_naming_each_line(tmp_path):
    rows = list(GOOD)
    rows[6] = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "hi"}]}
    rows[9] = "{not json"
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, out, err = run(p)
    assert code == 1
    assert "line 7: messages[0].role: unknown role 'robot'" in out
    assert "line 10: not valid JSON" in out
    assert out.strip().splitlines()[-1].startswith("invalid:")


def test_json_output(tmp_path):
    rows = list(GOOD)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}]}
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, out, _ = run(p, "--json")
    assert code == 1
    d = json.loads(out)
    assert d["ok"] is False and d["errors"][0]["line"] == 3 and d["errors"][0]["code"] == "no_assistant"
    assert d["stats"]["examples"] == 11
    code, out, _ = run(write_jsonl(tmp_path / "good.jsonl", GOOD), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_unreadable_and_usage_errors_exit_2(tmp_path):
    code, out, err = run(tmp_path / "nope.jsonl")
    assert code == 2 and err.startswith("error:") and "no such file" in err
    code, out, err = run(tmp_path)
    assert code == 2 and "folder" in err
    code, out, err = run(write_jsonl(tmp_path / "g.jsonl", GOOD), "--max-seq-len", "0")
    assert code == 2 and "error:" in err
    code, out, err = run(write_jsonl(tmp_path / "g.jsonl", GOOD), "--base", tmp_path / "no_model")
    assert code == 2 and "error:" in err


def test_binary_and_empty_files_exit_1_without_traceback(tmp_path):
    b = tmp_path / "data.jsonl"
    b.write_bytes(bytes(range(256)) * 20)
    code, out, _ = run(b)
    assert code == 1 and "line 1" in out
    e = tmp_path / "empty.csv"
    e.write_bytes(b"")
    code, out, _ = run(e)
    assert code == 1 and "empty" in out


def ns(data, **kw):
    return argparse.Namespace(data=str(data), max_seq_len=kw.get("max_seq_len", 512), json=kw.get("json", False),
                              base=kw.get("base", "base"))


def test_run_validate_in_process(tmp_path, capsys, tok_folder):
    """The same function, in process: warnings still exit 0; --base base without a tokenizer falls back."""
    p = write_jsonl(tmp_path / "few.jsonl", GOOD[:3])
    assert run_validate(ns(p)) == 0
    out = capsys.readouterr().out
    assert "warnings (1):" in out and "only 3 examples" in out
    assert run_validate(ns(p, base=str(tok_folder), json=True)) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stats"]["total_tokens"] > 0 and d["stats"]["trained_tokens"] > 0
    assert run_validate(ns(tmp_path / "missing")) == 2
    assert capsys.readouterr().err.startswith("error:")
