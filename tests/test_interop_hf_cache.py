"""Models from the local Hugging Face cache: a cache the test lays out itself in huggingface_hub's
documented layout (models--org--name/{blobs,refs,snapshots/<commit>/...}, files as symlinks to
blobs), listed with scan_cache_dir, opened by repo id for training and chat, and the one-line
error of a download while offline. No test reaches the network."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_helpers import conversations, tiny_model_folder, write_jsonl

from finetune_desktop.training import hf_cache
from finetune_desktop.training.hf_cache import HubError, cached_snapshot, download_model, list_cached_models

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay out one model repo the way huggingface_hub writes it; -> the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny):
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    files = folder_files(tiny)
    add_repo(c, "testorg/tiny-chat", files)
    gpt2 = json.loads(files["config.json"])
    gpt2["architectures"], gpt2["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    add_repo(c, "testorg/gpt2-like", {**files, "config.json": json.dumps(gpt2).encode()})
    add_repo(c, "testorg/pickles", {"config.json": files["config.json"], "tokenizer.json": files["tokenizer.json"],
                                    "pytorch_model.bin": b"not really a pickle"})
    add_repo(c, "testorg/no-tokenizer", {k: v for k, v in files.items() if not k.startswith("tokenizer")})
    return c


def test_hub_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_cache.hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hf_cache.hub_cache_dir() == tmp_path / "direct"


def test_list_cached_models_says_what_loads_and_why_not(cache, tiny):
    models = {m.repo_id: m for m in list_cached_models()}
    assert set(models) == {"testorg/tiny-chat", "testorg/gpt2-like", "testorg/pickles", "testorg/no-tokenizer"}
    ok = models["testorg/tiny-chat"]
    assert ok.loadable and ok.reason is None and ok.model_type == "llama"
    assert ok.revision == COMMIT
    assert Path(ok.snapshot_path) == cache / "models--testorg--tiny-chat" / "snapshots" / COMMIT
    assert ok.size_on_disk == sum(p.stat().st_size for p in tiny.iterdir() if p.is_file())
    from finetune_desktop.engine import ModelConfig

    assert ok.num_parameters == ModelConfig.from_json_file(tiny / "config.json").num_parameters()
    bad = models["testorg/gpt2-like"]
    assert not bad.loadable and "GPT2LMHeadModel" in bad.reason and "not supported" in bad.reason
    assert not models["testorg/pickles"].loadable and "pickle" in models["testorg/pickles"].reason
    assert not models["testorg/no-tokenizer"].loadable and models["testorg/no-tokenizer"].reason == "no tokenizer.json"
    # largest first
    sizes = [m.size_on_disk for m in list_cached_models()]
    assert sizes == sorted(sizes, reverse=True)


def test_empty_or_missing_cache_lists_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing-here"))
    assert list_cached_models() == []
    assert cached_snapshot("testorg/tiny-chat") is None


def test_repo_id_resolves_to_the_snapshot_and_opens(cache):
    from finetune_desktop.training.loading import open_model, resolve_model_spec

    snap = cache / "models--testorg--tiny-chat" / "snapshots" / COMMIT
    assert resolve_model_spec("testorg/tiny-chat") == snap
    model, tok, folder, run_dir = open_model("testorg/tiny-chat")
    assert folder == snap and run_dir is None and tok.chat_template
    assert model.config.model_type == "llama"


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "finetune_desktop", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(ROOT))


def test_train_and_chat_with_a_cached_repo_id(cache, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    data = write_jsonl(tmp_path / "pirate.jsonl", conversations(8))
    out = tmp_path / "run"
    p = _cli("train", data, "--out", out, "--base", "testorg/tiny-chat", "--epochs", 1, "--batch-size", 4,
             "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["base_model"]["spec"] == "testorg/tiny-chat"
    assert info["base_model"]["path"].endswith(f"models--testorg--tiny-chat/snapshots/{COMMIT}")
    p = _cli("chat", "testorg/tiny-chat", "--prompt", "Hello!", "--temperature", "0", "--max-new-tokens", "4",
             env=env)
    assert p.returncode == 0, p.stderr
    p = _cli("chat", "testorg/not-cached", "--prompt", "Hello!", env=env)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert "testorg/not-cached" in p.stderr


def test_download_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as e:
        download_model("testorg/tiny-chat")
    msg = str(e.value)
    assert "\n" not in msg and "testorg/tiny-chat" in msg and "offline" in msg
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        download_model("not a repo")


def test_download_patterns_never_fetch_pickles():
    import fnmatch

    wanted = ["model.safetensors", "model-00001-of-00002.safetensors", "config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "merges.txt", "vocab.json",
              "generation_config.json"]
    unwanted = ["pytorch_model.bin", "model.pt", "tokenizer.model", "flax_model.msgpack", "model.onnx", "README.md"]
    match = lambda n: any(fnmatch.fnmatch(n, p) for p in hf_cache.DOWNLOAD_PATTERNS)
    assert all(match(n) for n in wanted)
    assert not any(match(n) for n in unwanted)


def test_progress_class_reports_counts():
    seen = []
    cls = hf_cache._progress_class(lambda d, n, t: seen.append((d, n, t)))
    bar = cls(total=3, desc="Fetching 3 files")
    bar.update(1)
    bar.update(2)
    bar.close()
    assert seen == [("Fetching 3 files", 1, 3), ("Fetching 3 files", 3, 3)]


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_with_the_hub_unreachable_is_one_clear_line(monkeypatch, tmp_path):
    """A real connection attempt to a closed port on this machine (what no network looks like)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError) as e:
        download_model("testorg/tiny-chat", endpoint=f"http://127.0.0.1:{_closed_port()}")
    msg = str(e.value)
    assert "\n" not in msg and "testorg/tiny-chat" in msg and "cannot be reached" in msg


def test_download_of_an_unknown_repo_is_one_clear_line(monkeypatch, tmp_path):
    """A local HTTP server answers like the Hub does for a repo that does not exist."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b'{"error":"Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), NotFound)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with pytest.raises(HubError) as e:
            download_model("testorg/does-not-exist", endpoint=f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
        srv.server_close()
    msg = str(e.value)
    assert "\n" not in msg and "testorg/does-not-exist" in msg and "no such model repo" in msg
