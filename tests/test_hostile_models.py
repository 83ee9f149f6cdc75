"""Model folders that try to make us do too much, or that are damaged: each is refused quickly,
with little memory, by a one-line user-facing error that names the file and the field (exit 2,
never an internal error). Run through the real command line in a subprocess, whose time and peak
memory are measured."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_training_helpers import tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 5.0
LIMIT_BYTES = 1 << 30


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("hostile") / "good")


@pytest.fixture(scope="module")
def time_limit(good):
    """5 s, or more on a machine so busy that a normal chat with the same tiny model already takes
    a good part of that: the refusal may take at most 3 s longer than a normal reply."""
    rc, err, dt, _ = chat(good)
    assert rc == 0, err
    return max(LIMIT_S, dt + 3.0)


def copy_of(good, tmp_path, name="m") -> Path:
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


# The child writes its own peak resident memory (VmHWM, KB) to the file named by $PEAK_FILE as it
# exits. Not ru_maxrss: Linux carries that across fork and exec, so a child of a big test process
# would report the parent's size.
WRAPPER = ("import atexit, os, runpy\n"
           "def peak():\n"
           "    kb = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
           "    open(os.environ['PEAK_FILE'], 'w').write(kb)\n"
           "atexit.register(peak)\n"
           "runpy.run_module('finetune_desktop', run_name='__main__')")


def chat(folder, timeout=60):
    """`finetune-desktop chat FOLDER --prompt hi` in a child process -> (rc, stderr, seconds, peak bytes)."""
    peak_file = Path(folder).parent / f".peak-{Path(folder).name}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PEAK_FILE=str(peak_file))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", WRAPPER, "chat", str(folder), "--prompt", "hi",
                        "--temperature", "0", "--max-new-tokens", "4"],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)
    dt = time.perf_counter() - t0
    peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else 0
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return p.returncode, p.stderr.strip(), dt, peak


def set_template(folder: Path, template: str, where: str = "tokenizer_config.json") -> Path:
    if where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        return folder / "chat_template.jinja"
    p = folder / "tokenizer_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    p.write_text(json.dumps(cfg), encoding="utf-8")
    return p


HOSTILE_TEMPLATES = {
    "string_bomb": "{% set s = 'x' * 10**10 %}{{ s }}",
    "power_bomb": "{{ 7 ** 100000000 }}",
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling": "{% set ns = namespace(s='x' * 500000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}{{ ns.s|length }}",
    "huge_output": "{% for i in range(900000) %}{{ 'abcdefghij' }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_templates_are_refused_in_time_and_memory(good, tmp_path, name, time_limit):
    folder = copy_of(good, tmp_path)
    where = set_template(folder, HOSTILE_TEMPLATES[name])
    rc, err, dt, peak = chat(folder)
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert where.name in err and "chat template" in err, err
    assert dt < time_limit, f"{name}: refused only after {dt:.1f} s"
    assert 0 < peak < LIMIT_BYTES, f"{name}: the process reached {peak / 2**20:.0f} MB"


def test_hostile_template_memory_in_process(good, tmp_path):
    """The doubling template, rendered in this process: refused before the process grows by 1 GB."""
    from finetune_desktop.engine import Tokenizer
    from finetune_desktop.engine.config import ModelFormatError
    from finetune_desktop.engine.tokenizer import _rss_bytes

    folder = copy_of(good, tmp_path)
    set_template(folder, HOSTILE_TEMPLATES["doubling"], "chat_template.jinja")
    tok = Tokenizer.from_pretrained(folder)
    before = _rss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError, match=r"chat_template\.jinja: the chat template was stopped"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < LIMIT_S
    assert _rss_bytes() - before < LIMIT_BYTES


def test_a_normal_template_still_renders_long_conversations(good):
    from finetune_desktop.engine import Tokenizer

    tok = Tokenizer.from_pretrained(good)
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(40)]
    text = tok.apply_chat_template(msgs)
    assert text.count("<|im_start|>") == 40 and len(text) > 400_000


BAD_CONFIGS = {
    "layers_huge": ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers"),
    "layers_null": ({"num_hidden_layers": None}, "num_hidden_layers"),
    "eps_negative": ({"rms_norm_eps": -1}, "rms_norm_eps"),
    "hidden_string": ({"hidden_size": "big"}, "hidden_size"),
    "vocab_huge": ({"vocab_size": 10**12}, "vocab_size"),
    "heads_zero": ({"num_attention_heads": 0}, "num_attention_heads"),
    "theta_nan": ({"rope_theta": float("nan")}, "rope_theta"),
    "too_many_params": ({"hidden_size": 65536, "intermediate_size": 1048576, "num_hidden_layers": 1024,
                         "num_attention_heads": 512, "head_dim": 128}, "parameters"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_insane_configs_are_refused_naming_the_field(good, tmp_path, name, time_limit):
    folder = copy_of(good, tmp_path)
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    change, field = BAD_CONFIGS[name]
    cfg.update(change)
    p.write_text(json.dumps(cfg))  # json writes NaN for nan, which Python's reader accepts
    rc, err, dt, peak = chat(folder)
    assert rc == 2, err
    assert "config.json" in err and field in err, err
    assert dt < time_limit and peak < LIMIT_BYTES


def test_nan_weights_are_refused_naming_the_tensor(good, tmp_path):
    from finetune_desktop.engine.checkpoint import read_safetensors, write_safetensors

    folder = copy_of(good, tmp_path)
    w = read_safetensors(folder / "model.safetensors")
    name = sorted(k for k in w if "mlp.up_proj.weight" in k)[0]
    w[name] = w[name].copy()
    w[name][0, 0] = np.nan
    write_safetensors(folder / "model.safetensors", w)
    rc, err, _, _ = chat(folder)
    assert rc == 2 and name in err and "NaN" in err, err


def test_symlink_loop_and_truncated_weights_say_what_is_wrong(good, tmp_path):
    loop = copy_of(good, tmp_path, "loop")
    (loop / "model.safetensors").unlink()
    os.symlink(loop / "model.safetensors", loop / "model.safetensors")
    rc, err, _, _ = chat(loop)
    assert rc == 2 and "loops" in err and "model.safetensors" in err, err

    cut = copy_of(good, tmp_path, "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-64])
    rc, err, _, _ = chat(cut)
    assert rc == 2 and "truncated" in err, err


def test_broken_json_files_name_the_file(good, tmp_path):
    for fname, content in (("config.json", "[1, 2]"), ("tokenizer_config.json", "{not json"),
                           ("tokenizer_config.json", "[]")):
        folder = copy_of(good, tmp_path, f"{fname}-{len(content)}")
        (folder / fname).write_text(content)
        rc, err, _, _ = chat(folder)
        assert rc == 2 and fname in err, (fname, content, err)


def test_a_base_model_whose_template_always_fails_is_a_model_error_not_a_data_error(good, tmp_path):
    """Training on good data with a base model whose template raises for every conversation:
    one error naming the template's file, exit 2 (not dozens of 'errors in the training data')."""
    from test_training_helpers import conversations, write_jsonl

    folder = copy_of(good, tmp_path)
    set_template(folder, "{{ raise_exception('this template is broken') }}", "chat_template.jinja")
    data = write_jsonl(tmp_path / "d.jsonl", conversations(12))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "finetune_desktop", "train", str(data), "--out", str(tmp_path / "r"),
                        "--base", str(folder)], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat_template.jinja" in lines[0] and "this template is broken" in lines[0], lines
    assert "training data" not in p.stderr
