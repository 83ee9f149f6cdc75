"""Run folders (listing, metrics, checkpoints), auto hyperparameters, the memory estimate and the
saved model/adapter (transformers and PEFT parity: test_training_hf.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_training_helpers import run_loop, tiny_model_folder

from finetune_desktop.engine import Model, ModelConfig
from finetune_desktop.training import auto
from finetune_desktop.training.config import TrainConfig
from finetune_desktop.training.memory import available_memory_bytes, estimate_peak_memory
from finetune_desktop.training.runs import (checkpoint_dirs, latest_checkpoint, list_runs, load_checkpoint, load_run,
                                            load_run_metrics, new_run_dir, runs_home, save_checkpoint)

IDS = np.array([[1, 17, 42, 5, 99, 3, 250, 8]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lora_run(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "lora"
    res, _ = run_loop(folder, run, TrainConfig(method="lora", epochs=2, batch_size=4, learning_rate=2e-2))
    assert res.status == "finished"
    return run


# ----------------------------------------------------------------------------- listing and metrics
def test_runs_home_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DESKTOP_HOME", str(tmp_path / "h"))
    assert runs_home() == tmp_path / "h" / "runs"
    a = new_run_dir("my data.jsonl")
    a.mkdir(parents=True)
    b = new_run_dir("my data.jsonl")
    assert a != b and a.parent == b.parent == tmp_path / "h" / "runs"
    assert " " not in a.name


def test_list_and_load_runs(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DESKTOP_HOME", str(tmp_path))
    assert list_runs() == []
    run = new_run_dir("pirates")
    res, _ = run_loop(folder, run, TrainConfig(epochs=1, batch_size=4))
    (runs_home() / "not-a-run").mkdir()
    (runs_home() / "broken").mkdir()
    (runs_home() / "broken" / "run.json").write_text("{not json")
    runs = list_runs()
    assert [r.path for r in runs] == [str(run)]
    r = runs[0]
    assert r.status == "finished" and r.has_model and r.steps == 3 and r.total_steps == 3
    assert r.final_train_loss == res.final_train_loss and r.final_valid_loss == res.final_valid_loss
    assert load_run(run) == r


def test_metrics_reader_skips_a_cut_off_last_line(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    m0 = load_run_metrics(copy)
    with open(copy / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 99, "train_lo')  # a process killed mid-write
    m = load_run_metrics(copy)
    assert m.train == m0.train and m.eval == m0.eval
    assert len(m.train) == 6 and len(m.eval) == 7  # before training, then every step of a 6-step run (auto)
    assert load_run_metrics(tmp_path / "nothing").train == []


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_pruning(tmp_path):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    opt = {"step": 7, "m": {k: v * 2 for k, v in params.items()}, "v": {k: v * v for k, v in params.items()}}
    save_checkpoint(tmp_path, 3, params, opt, {"step": 3, "epoch": 1.0}, keep=2)
    save_checkpoint(tmp_path, 6, params, opt, {"step": 6, "epoch": 2.0}, keep=2)
    save_checkpoint(tmp_path, 9, params, opt, {"step": 9, "epoch": 3.0}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006", "step-000009"]
    # a half-written checkpoint (temp folder of a killed process) is never picked up
    (tmp_path / "checkpoints" / ".step-000012.tmp-abc").mkdir()
    (tmp_path / "checkpoints" / "step-000015").mkdir()  # no state.json: incomplete
    cp = latest_checkpoint(tmp_path)
    assert cp.name == "step-000009"
    tr, o, st = load_checkpoint(cp)
    assert st["step"] == 9 and o["step"] == 7
    for k in params:
        assert np.array_equal(tr[k], params[k])
        assert np.array_equal(o["m"][k], opt["m"][k]) and np.array_equal(o["v"][k], opt["v"][k])
    assert not list(cp.glob("*.pkl")) and not list(cp.glob("*.bin"))


# ----------------------------------------------------------------------------- auto hyperparameters
def test_auto_epochs_rule():
    assert auto.auto_epochs(10) == auto.MAX_EPOCHS
    assert auto.auto_epochs(120) == max(3, -(-auto.MIN_EXAMPLE_PASSES // 120))
    assert auto.auto_epochs(1000) == 3
    assert auto.auto_epochs(20000) == 1
    # facts (an FAQ) get more passes than a style, within their own caps
    assert auto.auto_epochs(60, facts=True) == min(auto.FACT_MAX_EPOCHS, -(-auto.FACT_EXAMPLE_PASSES // 60))
    assert auto.auto_epochs(60, facts=True) > auto.auto_epochs(60) >= 3
    assert auto.auto_epochs(140) == 3                      # a persona of 140 examples: the default
    assert auto.auto_epochs(10, facts=True) == auto.FACT_MAX_EPOCHS
    # extra passes for small sets only while the run stays short
    for facts, budget in ((False, auto.SMALL_SET_TOKEN_BUDGET), (True, auto.FACT_TOKEN_BUDGET)):
        wanted = auto.auto_epochs(60, facts=facts)
        assert auto.auto_epochs(60, tokens_per_epoch=budget // 4, facts=facts) == min(wanted, 4)
        assert auto.auto_epochs(60, tokens_per_epoch=budget // 2, facts=facts) == 3  # never fewer than 3
        assert auto.auto_epochs(60, tokens_per_epoch=budget, facts=facts) == 3
    assert auto.resolve(TrainConfig(), 100, 80, train_tokens=auto.SMALL_SET_TOKEN_BUDGET).epochs == 3
    assert auto.resolve(TrainConfig(), 60, 80, train_tokens=5_000, facts=True).epochs == \
        auto.auto_epochs(60, 5_000, facts=True) > auto.resolve(TrainConfig(), 60, 80, train_tokens=5_000).epochs
    for n in (1, 5, 50, 130, 500, 5000, 100000):
        for facts in (False, True):
            e = auto.auto_epochs(n, facts=facts)
            assert 1 <= e <= auto.FACT_MAX_EPOCHS


def test_auto_batch_size_and_learning_rate():
    assert auto.auto_batch_size(120, 80) == auto.MIN_BATCH
    assert auto.auto_batch_size(100000, 80) == auto.MAX_BATCH
    assert auto.auto_batch_size(3, 80) == 3
    b = auto.auto_batch_size(120, 2000)
    assert b * 2000 <= auto.MAX_BATCH_TOKENS or b == 1
    assert auto.auto_learning_rate("lora", auto.REF_BATCH) == pytest.approx(auto.LORA_LR)
    assert auto.auto_learning_rate("full", auto.REF_BATCH) == pytest.approx(auto.FULL_LR)
    assert auto.auto_learning_rate("lora", 4 * auto.REF_BATCH) == pytest.approx(2 * auto.LORA_LR)
    h = auto.resolve(TrainConfig(), 120, 80, steps_per_epoch=15)
    assert h.auto == ("epochs", "batch_size", "learning_rate")
    assert h.total_steps == 15 * h.epochs and 1 <= h.warmup_steps < h.total_steps and h.eval_every >= 1
    h2 = auto.resolve(TrainConfig(epochs=2, batch_size=4, learning_rate=0.01, eval_every=5), 120, 80)
    assert (h2.epochs, h2.batch_size, h2.learning_rate, h2.eval_every, h2.steps_per_epoch) == (2, 4, 0.01, 5, 30)
    assert h2.auto == ()
    assert auto.Hyperparameters.from_dict(json.loads(json.dumps(h.to_dict()))) == h


# ----------------------------------------------------------------------------- memory
def test_memory_estimate():
    cfg = ModelConfig(vocab_size=6144, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4)
    small = estimate_peak_memory(cfg, 6_300_000, 470_000, 8, 128, full=False, available=8 * 2**30)
    assert small.fits and small.total_bytes < 1 * 2**30
    big = estimate_peak_memory(cfg, 6_300_000, 6_300_000, 64, 4096, full=True, available=8 * 2**30)
    assert not big.fits
    assert big.parts["activations"] > small.parts["activations"] * 100
    text = big.explain()
    assert "MB" in text and "available" in text
    unknown = estimate_peak_memory(cfg, 1, 1, 1, 1, full=False, available=None)
    assert unknown.fits
    avail = available_memory_bytes()
    assert avail is None or avail > 0


# ----------------------------------------------------------------------------- saved model and adapter
def test_run_folder_model_loads_and_matches_the_adapter(folder, lora_run):
    merged = Model.from_pretrained(lora_run)
    base = Model.from_pretrained(folder)
    base.load_adapter(lora_run / "adapter")
    np.testing.assert_allclose(merged.logits(IDS), base.logits(IDS), atol=1e-5)
    assert not np.allclose(merged.logits(IDS), Model.from_pretrained(folder).logits(IDS), atol=1e-4)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (lora_run / "model" / name).read_bytes() == (folder / name).read_bytes()
    cfg = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32.0 and cfg["base_model_name_or_path"] == str(folder)


def test_no_pickle_anywhere_in_a_run(lora_run):
    for p in lora_run.rglob("*"):
        if p.is_file():
            assert p.suffix in (".json", ".jsonl", ".safetensors"), p
    assert not any(n.startswith(".") for n in os.listdir(lora_run))  # no temp leftovers


def test_a_killed_run_reads_as_interrupted(folder, tmp_path):
    """A run marked running that nobody holds the lock of was interrupted; its reason says what
    continuing it does. This process's own run reads as running."""
    from finetune_desktop.training.runs import update_run_json

    run = tmp_path / "run"
    run_loop(folder, run, TrainConfig(epochs=1, batch_size=4))
    update_run_json(run, status="running", pid=2**22 + 12345)  # no such process
    r = load_run(run)
    assert r.status == "interrupted" and "finished but its model was not saved" in r.reason
    update_run_json(run, pid=os.getpid())  # this process: really running
    assert load_run(run).status == "running"


def test_session_start_and_resume_in_process(folder, tmp_path, monkeypatch):
    """What the app calls: start_training / resume_training from files, on this thread."""
    from pathlib import Path

    from test_training_helpers import conversations, write_jsonl

    from finetune_desktop.data import DataError
    from finetune_desktop.training import resume_training, start_training
    from finetune_desktop.training.events import RunFinished, RunStarted
    from finetune_desktop.training.session import TrainingSetupError

    monkeypatch.setenv("FINETUNE_DESKTOP_HOME", str(tmp_path / "home"))
    data = write_jsonl(tmp_path / "d.jsonl", conversations(12))
    cfg = TrainConfig(epochs=1, batch_size=4, val_split=0.25)
    events = []
    res = start_training(data, config=cfg, base=str(folder), on_event=events.append)
    assert res.status == "finished" and Path(res.run_dir).parent == runs_home()
    started = events[0]
    assert isinstance(started, RunStarted) and started.num_train_examples == 9 and started.num_valid_examples == 3
    assert isinstance(events[-1], RunFinished) and res.final_valid_loss is not None
    with pytest.raises(TrainingSetupError, match="already finished"):
        resume_training(res.run_dir)
    events2 = []
    res2 = resume_training(res.run_dir, extra_epochs=2, on_event=events2.append)
    assert res2.status == "finished" and res2.step == 3 * res.step
    assert events2[0].resumed_from_step == res.step and events2[0].epochs == 3
    assert list_runs()[0].steps == res2.step
    with pytest.raises(DataError) as e:
        start_training(Path(__file__).parents[1] / "sample_data" / "with_mistakes.jsonl", config=cfg, base=str(folder))
    assert any(i.line == 2 for i in e.value.issues)
    with pytest.raises(TrainingSetupError, match="does not exist"):
        start_training(data, config=cfg, base=str(tmp_path / "nothing"))
    # a run folder without its model yet (it was stopped before the first save) as the base
    early = tmp_path / "early_run"
    early.mkdir()
    (early / "run.json").write_text('{"status": "stopped"}', encoding="utf-8")
    with pytest.raises(TrainingSetupError, match=r"no model yet \(status: stopped\)"):
        start_training(data, config=cfg, base=str(early))
    with pytest.raises(TrainingSetupError, match="learning_rate"):
        start_training(data, config=cfg.replace(learning_rate=-1.0), base=str(folder))
    # the data file changed since the run started: refuse to resume on other data
    write_jsonl(data, conversations(10))
    with pytest.raises(TrainingSetupError, match="changed"):
        resume_training(res.run_dir, extra_epochs=1)
