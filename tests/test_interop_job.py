"""`finetune-desktop job` and `import`: the job folder holds the settings our trainer would use
and the same split; train.py masks exactly the tokens our encoder trains (checked without torch
through a small adapter over our tokenizer, and with transformers' tokenizer where installed);
with torch + TRL the job's first-step loss equals our engine's and a small job runs to the end
on the CPU and imports as a run; without torch, a real job output made with our own engine's
adapter writer and a hand-written trainer_state.json imports as a run that lists, draws and chats."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_interop_helpers import ROOT, cli
from test_training_helpers import PAIRS, conversations, tiny_model_folder, write_jsonl

from finetune_desktop.data import encode_conversation, read_conversations
from finetune_desktop.data.types import Conversation, Message
from finetune_desktop.engine import Model, Tokenizer
from finetune_desktop.interop import InteropError
from finetune_desktop.interop.job_import import import_job, metrics_from_log_history
from finetune_desktop.interop.trl_job import ACCELERATE_CONFIGS, write_job
from finetune_desktop.training.config import TrainConfig

HAVE_TRL = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "trl", "peft", "datasets"))
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="torch/transformers/trl/peft/datasets not installed (pip install -e '.[scale]')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("job") / "tiny")


def load_train_py(job_dir: Path):
    spec = importlib.util.spec_from_file_location(f"job_train_{abs(hash(str(job_dir)))}", job_dir / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HFLike:
    """Our Tokenizer behind the two calls train.py makes of a transformers tokenizer."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        return self.tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offsets = self.tok.encode_with_offsets(text)
        return {"input_ids": ids, "offset_mapping": offsets}


def mixed_conversations() -> list[Conversation]:
    """Single and multi-turn, a context-only reply (weight 0), Korean, no system prompt."""
    out = conversations(6)
    out.append(Conversation((Message("system", "You are a pirate."), Message("user", "Hi"),
                             Message("assistant", "Not trained.", weight=0), Message("user", "Again"),
                             Message("assistant", "Arr, trained!")), 100))
    out.append(Conversation((Message("user", "오늘 날씨 어때요?"), Message("assistant", "억수로 좋다 아이가."),
                             Message("user", "밥 뭇나?"), Message("assistant", "  밥 뭇다!  ")), 101))
    return out


def test_train_py_is_self_contained():
    src = (ROOT / "finetune_desktop" / "interop" / "job_template" / "train.py").read_text()
    tree = ast.parse(src)
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "finetune_desktop" not in mods
    assert mods <= {"__future__", "argparse", "json", "math", "os", "platform", "sys", "time", "bisect", "datetime",
                    "pathlib", "torch", "datasets", "transformers", "trl", "peft"}


@pytest.mark.parametrize("sample", ["mixed", "pirate_captain.jsonl", "gyeongsang_ajumma.jsonl"])
def test_train_py_masks_the_tokens_our_encoder_trains(tiny, tmp_path, sample):
    """train.py's encode() against data/encode.py's, through our own tokenizer (no torch needed)."""
    job = write_job(write_jsonl(tmp_path / "d.jsonl", conversations(8)), tmp_path / "job", TrainConfig(), str(tiny))
    mod = load_train_py(job.folder)
    base = "base" if sample != "mixed" else str(tiny)
    from finetune_desktop.training.loading import open_tokenizer

    tok = open_tokenizer(base)
    convs = mixed_conversations() if sample == "mixed" else read_conversations(ROOT / "sample_data" / sample)[:40]
    eot = set(tok.end_of_turn_ids)
    for max_len in (512, 24):
        for conv in convs:
            ours = encode_conversation(tok, conv, max_len)
            msgs = json.loads(
                json.dumps([{"role": m.role, "content": m.content, **({"weight": 0} if not m.weight else {})}
                            for m in conv.messages]))
            ids, labels = mod.encode(HFLike(tok), msgs, max_len, eot)
            assert ids == ours.input_ids.tolist(), conv.line
            assert labels == ours.labels.tolist(), conv.line


def test_job_folder_has_the_settings_and_split_our_trainer_uses(tiny, tmp_path):
    data = write_jsonl(tmp_path / "pirate.jsonl", conversations(16))
    p = cli("job", data, "--out", tmp_path / "job", "--base", tiny, "--val-split", "0.25", "--seed", "3",
            "--lora-rank", "8")
    assert p.returncode == 0, p.stderr
    assert "python " in p.stdout and "accelerate launch" in p.stdout
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    p = cli("train", data, "--out", tmp_path / "run", "--base", tiny, "--val-split", "0.25", "--seed", "3",
            "--lora-rank", "8", "--quiet")
    assert p.returncode == 0, p.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert job["hyper"] == run["hyper"]
    assert job["settings"] == run["settings"]
    assert job["settings"]["lora_rank"] == 8 and job["settings"]["lora_alpha"] == 16.0 and job["settings"]["seed"] == 3
    assert job["data"]["num_train"] == run["data"]["num_train"] == 12
    assert job["data"]["num_valid"] == run["data"]["num_valid"] == 4
    assert job["data"]["sha256"] == run["data"]["sha256"]
    assert job["system_prompt"] == run["system_prompt"] == "You are a pirate."
    # the held-out conversations are the ones our split holds out
    from finetune_desktop.data import split_train_valid

    tok = Tokenizer.from_pretrained(tiny)
    ex = [encode_conversation(tok, c, 512) for c in conversations(16)]
    _, held = split_train_valid(ex, 0.25, 3)
    valid = [json.loads(l)["messages"] for l in (tmp_path / "job" / "data" / "valid.jsonl").read_text().splitlines()]
    train = [json.loads(l)["messages"] for l in (tmp_path / "job" / "data" / "train.jsonl").read_text().splitlines()]
    assert [m[1]["content"] for m in valid] == [PAIRS[e.line - 1][0] for e in held]
    assert len(train) == 12 and not {m[1]["content"] for m in train} & {m[1]["content"] for m in valid}
    # base: a path for a folder, a copy for the built-in model
    assert job["base_model"]["path"] == str(tiny.resolve()) and job["base_model"]["copy"] is None
    assert job["tokenizer"]["end_of_turn_ids"] == [tok.token_to_id("<|im_end|>")]
    names = sorted(x.name for x in (tmp_path / "job" / "accelerate").iterdir())
    assert names == sorted(f"{k}.yaml" for k in ACCELERATE_CONFIGS)
    z3 = (tmp_path / "job" / "accelerate" / "deepspeed_zero3.yaml").read_text()
    assert "distributed_type: DEEPSPEED" in z3 and "zero_stage: 3" in z3
    readme = (tmp_path / "job" / "README.md").read_text()
    for k in ACCELERATE_CONFIGS:
        assert f"accelerate launch --config_file accelerate/{k}.yaml" in readme
    assert "../" not in readme


def test_job_with_the_built_in_model_copies_it_and_keeps_weight_zero(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "context", "weight": 0},
        {"role": "user", "content": "More"}, {"role": "assistant", "content": "trained"}]}) + "\n"
        + "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                  for q, a in PAIRS[:5]), encoding="utf-8")
    job = write_job(data, tmp_path / "job", TrainConfig(epochs=1), "base")
    j = json.loads((job.folder / "job.json").read_text())
    assert j["base_model"]["copy"] == "base_model" and j["base_model"]["spec"] == "base"
    from finetune_desktop.training.loading import base_model_dir

    for f in base_model_dir().iterdir():
        if f.is_file():
            assert (job.folder / "base_model" / f.name).read_bytes() == f.read_bytes()
    first = json.loads((job.folder / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][1] == {"role": "assistant", "content": "context", "weight": 0}


def test_job_errors(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversations(4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    p = cli("job", data, "--out", tmp_path / "full", "--base", tiny)
    assert p.returncode == 2 and "not empty" in p.stderr
    p = cli("job", ROOT / "sample_data" / "with_mistakes.jsonl", "--out", tmp_path / "j2", "--base", tiny)
    assert p.returncode == 1 and "line" in p.stderr and not (tmp_path / "j2").exists()


# ----------------------------------------------------------------------------- import without torch
def fake_job_output(job_dir: Path, tiny: Path, steps: int = 4) -> dict:
    """What train.py leaves in output/, made for real by our engine (a PEFT adapter with nonzero
    B so merging changes the weights) and a trainer_state.json as transformers writes it."""
    from finetune_desktop.engine import LoraConfig

    job = json.loads((job_dir / "job.json").read_text())
    s = job["settings"]
    m = Model.from_pretrained(tiny)
    m.add_lora(LoraConfig(r=s["lora_rank"], alpha=s["lora_alpha"], target_modules=tuple(s["lora_targets"])), seed=5)
    rng = np.random.default_rng(0)
    for k in m.lora:
        if ".lora_B." in k:
            m.lora[k][...] = rng.standard_normal(m.lora[k].shape).astype(np.float32) * 0.05
    m.weights_changed()
    out = job_dir / "output"
    m.save_adapter(out / "adapter", base_model_name_or_path=str(tiny))
    (out / "adapter" / "training_args.bin").write_bytes(b"\x80\x04not to be unpickled")
    hist = []
    for st in range(1, steps + 1):
        hist.append({"epoch": st / 2, "grad_norm": 0.5 / st, "learning_rate": 1e-3 * (1 - st / (steps + 1)),
                     "loss": 3.0 - 0.25 * st, "mean_token_accuracy": 0.1 * st, "num_tokens": 100.0 * st, "step": st})
        if st % 2 == 0:
            hist.append({"epoch": st / 2, "eval_loss": 3.1 - 0.2 * st, "eval_mean_token_accuracy": 0.05 * st,
                         "eval_runtime": 0.1, "step": st})
    hist.append({"epoch": steps / 2, "step": steps, "total_flos": 1.0, "train_loss": 2.5, "train_runtime": 3.0})
    (out / "trainer_state.json").write_text(json.dumps({"global_step": steps, "epoch": steps / 2, "log_history": hist}))
    (out / "result.json").write_text(json.dumps({"status": "finished", "started": "2026-01-01T10:00:00+00:00",
                                                 "finished": "2026-01-01T10:05:00+00:00", "seconds": 300.0,
                                                 "world_size": 8, "trained_by": "trl",
                                                 "versions": {"trl": "x"}}))
    return {"model": m}


def test_import_a_real_job_output_without_torch(tiny, tmp_path):
    data = write_jsonl(tmp_path / "pirate.jsonl", conversations(8))
    job = write_job(data, tmp_path / "job", TrainConfig(epochs=2, batch_size=4, val_split=0.25), str(tiny))
    made = fake_job_output(job.folder, tiny)
    p = cli("import", job.folder, env={"FINETUNE_DESKTOP_HOME": str(tmp_path / "home")})
    assert p.returncode == 0, p.stderr
    from finetune_desktop.training.runs import list_runs, load_run_metrics, read_run_json

    runs = list_runs(tmp_path / "home" / "runs")
    assert len(runs) == 1
    r = runs[0]
    assert r.status == "finished" and r.has_model and r.method == "lora" and r.steps == 4
    assert r.final_train_loss == pytest.approx(2.0) and r.final_valid_loss == pytest.approx(2.3)
    assert r.data_path == str(data.resolve()) and r.base_model == str(tiny.resolve())
    info = read_run_json(r.path)
    assert info["trained_by"] == "trl" and "TRL" in info["note"]
    assert len(info["data"]["sha256"]) == 64 and info["versions"]["finetune_desktop"]
    assert info["job"]["world_size"] == 8 and info["system_prompt"] == "You are a pirate."
    met = load_run_metrics(r.path)
    assert [m["step"] for m in met.train] == [1, 2, 3, 4] and [m["step"] for m in met.eval] == [2, 4]
    assert met.train[0] == {"step": 1, "epoch": 0.5, "train_loss": 2.75, "lr": pytest.approx(8e-4), "grad_norm": 0.5,
                            "train_token_accuracy": 0.1, "tokens": 100.0}
    assert met.eval[0]["valid_loss"] == pytest.approx(2.7) and met.eval[0]["valid_token_accuracy"] == pytest.approx(0.1)
    # model/ is the base with the adapter merged, adapter/ the same adapter
    tuned = Model.from_pretrained(Path(r.path) / "model")
    ref = made["model"].merged_params()
    for k, v in ref.items():
        np.testing.assert_allclose(tuned.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert not np.allclose(tuned.params["model.layers.0.self_attn.q_proj.weight"],
                           Model.from_pretrained(tiny).params["model.layers.0.self_attn.q_proj.weight"])
    assert (Path(r.path) / "adapter" / "adapter_model.safetensors").exists()
    assert not (Path(r.path) / "adapter" / "training_args.bin").exists()
    # the tuned tokenizer got the run's default system prompt, as our own runs do
    tt = Tokenizer.from_pretrained(Path(r.path) / "model")
    assert "You are a pirate." in tt.apply_chat_template([{"role": "user", "content": "Hi"}])
    p = cli("chat", r.path, "--prompt", "Hello!", "--temperature", "0", "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr
    p = cli("import", job.folder, "--out", r.path)
    assert p.returncode == 2 and "already holds a run" in p.stderr


def test_import_errors(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversations(4))
    job = write_job(data, tmp_path / "job", TrainConfig(epochs=1), str(tiny))
    with pytest.raises(InteropError, match="trainer_state.json"):
        import_job(job.folder, tmp_path / "run")
    with pytest.raises(InteropError, match="no such job folder"):
        import_job(tmp_path / "nothing")
    (tmp_path / "notjob").mkdir()
    (tmp_path / "notjob" / "job.json").write_text('{"kind": "other"}')
    with pytest.raises(InteropError, match="not a Finetune Desktop job"):
        import_job(tmp_path / "notjob")
    fake_job_output(job.folder, tiny)
    shutil.rmtree(job.folder / "output" / "adapter")
    with pytest.raises(InteropError, match="adapter_config.json is missing"):
        import_job(job.folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_metrics_from_log_history_skips_summaries_and_non_numbers():
    rows = metrics_from_log_history([{"step": 1, "loss": 1.0, "epoch": 0.1}, {"step": 1, "train_loss": 1.0},
                                     {"step": 2, "loss": float("nan")}, "junk", {"loss": 2.0},
                                     {"step": 2, "eval_loss": 0.5}])
    assert rows == [{"step": 1, "epoch": 0.1, "train_loss": 1.0}, {"step": 2, "epoch": None, "valid_loss": 0.5}]


# ----------------------------------------------------------------------------- with torch + TRL
@needs_trl
def test_transformers_tokenizer_masks_like_ours(tmp_path, tiny):
    job = write_job(write_jsonl(tmp_path / "d.jsonl", conversations(8)), tmp_path / "job", TrainConfig(), "base")
    mod = load_train_py(job.folder)
    from finetune_desktop.training.loading import open_tokenizer

    tok = open_tokenizer("base")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(job.folder / "base_model"))
    convs = mixed_conversations() + read_conversations(ROOT / "sample_data" / "gyeongsang_ajumma.jsonl")[:20]
    for conv in convs:
        ours = encode_conversation(tok, conv, 512)
        msgs = [{"role": m.role, "content": m.content, **({"weight": 0} if not m.weight else {})} for m in conv.messages]
        ids, labels = mod.encode(hf, msgs, 512, set(tok.end_of_turn_ids))
        assert ids == ours.input_ids.tolist() and labels == ours.labels.tolist(), conv.line


def _run_train_py(job_dir: Path, *args, timeout=900):
    return subprocess.run([sys.executable, str(job_dir / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(job_dir))


@needs_trl
def test_first_step_loss_equals_our_engine(tmp_path):
    """The built-in model, 8 English and Korean conversations in one batch of 8: TRL's logged loss
    of step 1 (before any update) against our engine's loss on the same examples, and against
    the first step of our own trainer on the same file."""
    from finetune_desktop.data.batching import make_batches
    from finetune_desktop.training.loading import open_model

    lines = ((ROOT / "sample_data" / "pirate_captain.jsonl").read_text().splitlines()[:4]
             + (ROOT / "sample_data" / "gyeongsang_ajumma.jsonl").read_text().splitlines()[:4])
    data = tmp_path / "mix.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = TrainConfig(batch_size=8, epochs=1)
    job = write_job(data, tmp_path / "job", cfg, "base")
    p = _run_train_py(job.folder, "--max-steps", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads((job.folder / "output" / "trainer_state.json").read_text())
    trl_loss = next(e["loss"] for e in state["log_history"] if "loss" in e and e["step"] == 1)

    model, tok, _, _ = open_model("base")
    ex = [encode_conversation(tok, c, cfg.max_seq_len) for c in read_conversations(data)]
    (batch,) = make_batches(ex, 8, 0, 0, tok.pad_token_id)
    ours, counted, _ = model.loss(batch.input_ids, batch.labels, batch.attention_mask)
    assert counted == sum(e.num_trained_tokens for e in ex)
    print(f"first-step loss: TRL {trl_loss:.6f}, our engine {ours:.6f}, difference {abs(trl_loss - ours):.2e}")
    assert abs(trl_loss - ours) < 1e-3

    p = cli("train", data, "--out", tmp_path / "run", "--batch-size", 8, "--epochs", 1, "--quiet")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train_loss" in r)  # (a step-0 evaluation row may come first)
    assert first["step"] == 1 and abs(first["train_loss"] - trl_loss) < 1e-3


@needs_trl
def test_small_job_runs_on_the_cpu_and_imports(tiny, tmp_path):
    data = write_jsonl(tmp_path / "pirate.jsonl", conversations(12))
    p = cli("job", data, "--out", tmp_path / "job", "--base", tiny, "--val-split", "0.25", "--epochs", 2,
            "--batch-size", 4, "--learning-rate", "0.02")
    assert p.returncode == 0, p.stderr
    p = _run_train_py(tmp_path / "job")
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "job" / "output"
    state = json.loads((out / "trainer_state.json").read_text())
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert state["global_step"] == job["hyper"]["total_steps"] == 6
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # our schedule: linear warmup over warmup_steps, then linear decay
    lrs = [e["learning_rate"] for e in state["log_history"] if "loss" in e]
    assert max(lrs) == pytest.approx(0.02) and lrs[-1] < lrs[1]
    p = cli("import", tmp_path / "job", "--out", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    from finetune_desktop.training.runs import load_run, load_run_metrics

    r = load_run(tmp_path / "run")
    assert r.status == "finished" and r.has_model and r.steps == 6
    met = load_run_metrics(tmp_path / "run")
    assert [m["train_loss"] for m in met.train] == pytest.approx(losses) and met.eval
    # our engine with the imported adapter gives the same validation loss TRL measured last
    from finetune_desktop.data.batching import make_batches

    m = Model.from_pretrained(tmp_path / "run" / "model")
    tok = Tokenizer.from_pretrained(tiny)
    valid = [json.loads(l)["messages"] for l in (tmp_path / "job" / "data" / "valid.jsonl").read_text().splitlines()]
    convs = [Conversation(tuple(Message(x["role"], x["content"]) for x in v), i) for i, v in enumerate(valid)]
    ex = [encode_conversation(tok, c, 512) for c in convs]
    (b,) = make_batches(ex, len(ex), 0, 0, tok.pad_token_id)
    vl, _, _ = m.loss(b.input_ids, b.labels, b.attention_mask)
    assert vl == pytest.approx(met.eval[-1]["valid_loss"], abs=1e-3)
    p = cli("chat", tmp_path / "run", "--prompt", "Hello!", "--temperature", "0", "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr


def test_job_records_the_hub_repo_id_of_a_cached_base(tiny, tmp_path, monkeypatch):
    from test_interop_hf_cache import COMMIT, add_repo, folder_files

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_repo(cache, "testorg/tiny-chat", folder_files(tiny))
    data = write_jsonl(tmp_path / "d.jsonl", conversations(4))
    job = write_job(data, tmp_path / "job", TrainConfig(epochs=1), "testorg/tiny-chat")
    b = json.loads((job.folder / "job.json").read_text())["base_model"]
    assert b["repo_id"] == "testorg/tiny-chat" and b["copy"] is None
    assert b["path"].endswith(f"models--testorg--tiny-chat/snapshots/{COMMIT}")
    assert "Hub: testorg/tiny-chat" in (job.folder / "README.md").read_text()
    # a snapshot path given directly is recognised too
    job2 = write_job(data, tmp_path / "job2", TrainConfig(epochs=1), b["path"])
    assert json.loads((job2.folder / "job.json").read_text())["base_model"]["repo_id"] == "testorg/tiny-chat"


@needs_trl
def test_full_fine_tune_job_runs_and_imports(tiny, tmp_path):
    from finetune_desktop.training.runs import load_run

    data = write_jsonl(tmp_path / "d.jsonl", conversations(8))
    job = write_job(data, tmp_path / "job", TrainConfig(method="full", epochs=1, batch_size=4, learning_rate=1e-2),
                    str(tiny))
    p = _run_train_py(job.folder)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (job.folder / "output" / "model" / "config.json").exists()
    res = import_job(job.folder, tmp_path / "run")
    r = load_run(res.run_dir)
    assert r.status == "finished" and r.method == "full" and r.has_model and r.steps == 2
    assert not (tmp_path / "run" / "adapter").exists()
    tuned = Model.from_pretrained(tmp_path / "run" / "model")
    base = Model.from_pretrained(tiny)
    assert not np.allclose(tuned.params["model.layers.0.mlp.up_proj.weight"], base.params["model.layers.0.mlp.up_proj.weight"])
    p = cli("chat", tmp_path / "run", "--prompt", "Hello!", "--temperature", "0", "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr
