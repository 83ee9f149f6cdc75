"""The training loop on a tiny model: learning, determinism, exact resume, LoRA, NaN handling,
snapshots, metrics and run-folder contents."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from test_training_helpers import new_run, run_loop, setup, tiny_model_folder, train_losses

from finetune_desktop.engine import Model
from finetune_desktop.engine.lora import lora_names
from finetune_desktop.training.config import TrainConfig
from finetune_desktop.training.control import TrainControl
from finetune_desktop.training.events import (CheckpointSaved, EvalMetrics, PhaseEvent, RunFailed, RunFinished,
                                              RunStarted, RunStopped, StepMetrics, WeightSnapshot)
from finetune_desktop.training.loop import LoopOptions, train
from finetune_desktop.training.runs import latest_checkpoint, load_run_metrics, read_run_json
from finetune_desktop.training.snapshots import downsample

FULL = TrainConfig(method="full", epochs=6, batch_size=4, learning_rate=3e-3)
LORA = TrainConfig(method="lora", epochs=6, batch_size=4, learning_rate=1e-2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("cfg", [FULL, LORA], ids=["full", "lora"])
def test_loss_goes_down(folder, tmp_path, cfg):
    events = []
    res, _ = run_loop(folder, tmp_path / "run", cfg, events)
    assert res.status == "finished", res.reason
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 18
    first, last = _mean(losses[:3]), _mean(losses[-3:])
    assert last < first - 0.2, f"loss did not go down: {losses}"
    evals = [e for e in events if isinstance(e, EvalMetrics)]
    assert evals[-1].valid_loss < evals[0].valid_loss, [e.valid_loss for e in evals]


def test_events_and_metrics_file(folder, tmp_path):
    events = []
    cfg = LORA.replace(epochs=2, eval_every=2, snapshot_interval_s=0.0)
    res, _ = run_loop(folder, tmp_path / "run", cfg, events)
    assert res.status == "finished"
    kinds = [type(e) for e in events]
    assert kinds[0] is RunStarted and kinds[-1] is RunFinished
    steps = [e for e in events if isinstance(e, StepMetrics)]
    assert [s.step for s in steps] == list(range(1, 7))
    s = steps[-1]
    assert s.total_steps == 6 and s.epoch == pytest.approx(2.0) and s.eta_s == 0.0
    assert 0.0 <= s.train_token_accuracy <= 1.0 and s.tokens_per_s > 0 and s.grad_norm > 0
    assert min(s.phases.forward_ms, s.phases.loss_ms, s.phases.backward_ms, s.phases.update_ms) >= 0
    phases = [e.phase for e in events if isinstance(e, PhaseEvent) and e.step == 1]
    assert phases == ["forward", "loss", "backward", "update"]
    assert sum(isinstance(e, CheckpointSaved) for e in events) == 2  # one per epoch end
    m = load_run_metrics(tmp_path / "run")
    assert len(m.train) == 6
    need = {"step", "epoch", "train_loss", "train_token_accuracy", "lr", "grad_norm", "tokens_per_s", "elapsed_s",
            "forward_ms", "loss_ms", "backward_ms", "update_ms"}
    for d in m.train:
        assert need <= set(d), need - set(d)
    assert [d["train_loss"] for d in m.train] == [e.train_loss for e in steps]  # exact floats round-trip
    # one evaluation before training (where validation starts), then every 2 steps and at each
    # epoch end (steps 3 and 6), never twice for one step
    assert [d["step"] for d in m.eval] == [0, 2, 3, 4, 6]
    for d in m.eval:
        assert {"valid_loss", "valid_token_accuracy", "step", "epoch"} <= set(d)
    info = read_run_json(tmp_path / "run")
    assert info["status"] == "finished" and info["final"]["steps"] == 6
    assert info["final"]["train_loss"] == steps[-1].train_loss
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "model" / "tokenizer.json").exists()


def test_same_seed_same_losses_bit_for_bit(folder, tmp_path):
    cfg = LORA.replace(epochs=2, lora_dropout=0.1)
    run_loop(folder, tmp_path / "a", cfg)
    run_loop(folder, tmp_path / "b", cfg)
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == 6 and a == b
    run_loop(folder, tmp_path / "c", cfg.replace(seed=1))
    assert train_losses(tmp_path / "c") != a


@pytest.mark.parametrize("cfg", [LORA.replace(epochs=3, lora_dropout=0.1), FULL.replace(epochs=3)], ids=["lora", "full"])
def test_resume_reproduces_uninterrupted_losses(folder, tmp_path, cfg):
    run_loop(folder, tmp_path / "straight", cfg)
    want = train_losses(tmp_path / "straight")
    assert len(want) == 9

    control = TrainControl()
    events = []

    def on_event(e):
        events.append(e)
        if isinstance(e, StepMetrics) and e.step == 4:  # mid-epoch (3 steps per epoch)
            control.stop()

    model, tok, tr, va, hyper = setup(folder, cfg)
    run = new_run(tmp_path / "resumed")
    res = train(model, tr, va, cfg, hyper, run, on_event=on_event, control=control, base_dir=folder,
                pad_id=tok.pad_token_id)
    assert res.status == "stopped" and res.step == 4
    assert isinstance(events[-1], RunStopped) and events[-1].checkpoint.endswith("step-000004")
    assert read_run_json(run)["status"] == "stopped"
    assert (run / "model" / "config.json").exists()  # a stopped run can be chatted with
    assert train_losses(run) == want[:4]

    events2 = []
    res2, _ = run_loop(folder, run, cfg, events2, resume=True)
    assert res2.status == "finished"
    assert next(e for e in events2 if isinstance(e, RunStarted)).resumed_from_step == 4
    assert train_losses(run) == want  # bit for bit


def test_more_epochs_on_a_finished_run(folder, tmp_path):
    cfg = LORA.replace(epochs=2)
    res, _ = run_loop(folder, tmp_path / "run", cfg)
    assert res.status == "finished" and res.step == 6
    segs = read_run_json(tmp_path / "run")["schedule_segments"]
    segs = segs + [{"start": 6, "steps": 3, "warmup": 1, "lr": 1e-2}]
    events = []
    res2, _ = run_loop(folder, tmp_path / "run", cfg, events, resume=True, segments=segs)
    assert res2.status == "finished" and res2.step == 9
    steps = [e.step for e in events if isinstance(e, StepMetrics)]
    assert steps == [7, 8, 9]
    assert len(train_losses(tmp_path / "run")) == 9
    assert read_run_json(tmp_path / "run")["final"]["steps"] == 9


def test_lora_leaves_base_untouched_and_merge_is_base_plus_scaled_ba(folder, tmp_path):
    base = Model.from_pretrained(folder)
    res, model = run_loop(folder, tmp_path / "run", LORA.replace(epochs=2))
    assert res.status == "finished"
    for k, v in base.params.items():
        assert np.array_equal(model.params[k], v), f"{k} changed under LoRA"
    scale = model.lora_config.scale
    merged = Model.from_pretrained(tmp_path / "run")  # a run folder loads (its model/)
    n_adapted = 0
    for k, v in base.params.items():
        an, bn = lora_names(k) if k.endswith(".weight") else (None, None)
        if an in model.lora:
            want = v + scale * (model.lora[bn] @ model.lora[an])
            np.testing.assert_allclose(merged.params[k], want, rtol=0, atol=1e-6, err_msg=k)
            assert not np.array_equal(merged.params[k], v)
            n_adapted += 1
        else:
            assert np.array_equal(merged.params[k], v), k
    assert n_adapted == 2 * 7
    # the adapter folder reproduces the merged model
    again = Model.from_pretrained(folder)
    again.load_adapter(tmp_path / "run" / "adapter")
    ids = np.array([[1, 5, 9, 42, 7, 3]])
    np.testing.assert_allclose(again.logits(ids), merged.logits(ids), atol=1e-5)


def test_full_finetune_saves_trained_weights(folder, tmp_path):
    res, model = run_loop(folder, tmp_path / "run", FULL.replace(epochs=1))
    saved = Model.from_pretrained(tmp_path / "run" / "model")
    for k, v in model.params.items():
        assert np.array_equal(saved.params[k], v), k
    assert not (tmp_path / "run" / "adapter").exists()


def _tree_hash(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the run diverges on purpose
def test_nan_loss_fails_with_advice_and_keeps_last_good_checkpoint(folder, tmp_path):
    cfg = LORA.replace(epochs=3, schedule="constant", warmup_ratio=0.0)
    model, tok, tr, va, hyper = setup(folder, cfg)
    S = hyper.steps_per_epoch
    # a sane first epoch, then an absurd learning rate: the run must blow up in epoch 2
    segs = [{"start": 0, "steps": S, "warmup": 0, "lr": 1e-3}, {"start": S, "steps": 2 * S, "warmup": 0, "lr": 1e9}]
    run = new_run(tmp_path / "run")
    events = []
    saved = {}

    def on_event(e):
        events.append(e)
        if isinstance(e, CheckpointSaved):
            saved[e.path] = _tree_hash(tmp_path / "run" / "checkpoints")

    res = train(model, tr, va, cfg, hyper, run, on_event=on_event, base_dir=folder, pad_id=tok.pad_token_id,
                segments=segs)
    assert res.status == "failed"
    fail = events[-1]
    assert isinstance(fail, RunFailed)
    assert "learning rate" in fail.reason and ("NaN" in fail.reason or "infinite" in fail.reason), fail.reason
    assert fail.checkpoint and fail.checkpoint.endswith(f"step-{S:06d}")
    assert S <= fail.step < 3 * S
    # the checkpoint is exactly what was written at the end of epoch 1
    assert _tree_hash(run / "checkpoints") == saved[fail.checkpoint]
    info = read_run_json(run)
    assert info["status"] == "failed" and "learning rate" in info["failure"]["reason"]
    assert not (run / "model").exists()
    for d in load_run_metrics(run).train:
        assert math.isfinite(d["train_loss"])
    # and the kept checkpoint still resumes
    assert latest_checkpoint(run).name == f"step-{S:06d}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the run diverges on purpose
def test_nan_at_first_step_has_no_checkpoint(folder, tmp_path):
    res, _ = run_loop(folder, tmp_path / "run", LORA.replace(learning_rate=1e12, warmup_ratio=0.0, grad_clip=0.0))
    assert res.status == "failed" and res.checkpoint is None
    assert "learning rate" in res.reason


def test_memory_estimate_refuses_a_run_that_does_not_fit(folder, tmp_path):
    events = []
    res, _ = run_loop(folder, tmp_path / "run", LORA, events, options=LoopOptions(memory_limit_bytes=50 * 2**20))
    assert res.status == "failed"
    assert "would not fit in memory" in res.reason and "batch size" in res.reason
    assert isinstance(events[-1], RunFailed) and not any(isinstance(e, StepMetrics) for e in events)


def test_a_run_that_fits_only_with_activation_checkpointing_switches_it_on(folder, tmp_path):
    """With "auto", a memory limit between the two estimates turns checkpointing on (and says so);
    the losses are those of the same run without it."""
    from finetune_desktop.training.events import Notice
    from finetune_desktop.training.memory import SAFETY, estimate_peak_memory

    cfg = FULL.replace(epochs=1, max_seq_len=256)
    model, tok, tr, va, hyper = setup(folder, cfg, 12, 4)
    longest = max(len(e) for e in tr)
    est = {c: estimate_peak_memory(model.config, model.num_parameters(), model.num_parameters(), hyper.batch_size,
                                   longest, full=True, available=None, checkpointing=c).total_bytes
           for c in (False, True)}
    assert est[True] < est[False]
    limit = int((est[True] + est[False]) / 2 / SAFETY)
    events = []
    res, m = run_loop(folder, tmp_path / "ckpt", cfg, events, options=LoopOptions(memory_limit_bytes=limit))
    assert res.status == "finished" and m.activation_checkpointing, res.reason
    assert any(isinstance(e, Notice) and "activation checkpointing" in e.message for e in events)
    ref, m2 = run_loop(folder, tmp_path / "plain", cfg)
    assert not m2.activation_checkpointing
    np.testing.assert_allclose(train_losses(tmp_path / "ckpt"), train_losses(tmp_path / "plain"), rtol=1e-5)
    off = cfg.replace(activation_checkpointing=False)
    res3, _ = run_loop(folder, tmp_path / "off", off, options=LoopOptions(memory_limit_bytes=limit))
    assert res3.status == "failed" and "activation checkpointing" in res3.reason


def test_weight_snapshots_are_copies_of_the_change_since_start(folder, tmp_path):
    for cfg in (FULL.replace(epochs=1, snapshot_interval_s=0.0), LORA.replace(epochs=1, snapshot_interval_s=0.0)):
        base = Model.from_pretrained(folder)
        events = []
        run = tmp_path / cfg.method
        res, model = run_loop(folder, run, cfg, events)
        snaps = [e for e in events if isinstance(e, WeightSnapshot)]
        assert [s.step for s in snaps] == [1, 2, 3]
        last = snaps[-1]
        name = "model.layers.1.mlp.down_proj.weight"
        if cfg.method == "full":
            delta = model.params[name] - base.params[name]
        else:
            an, bn = lora_names(name)
            delta = model.lora_config.scale * (model.lora[bn] @ model.lora[an])
        np.testing.assert_allclose(last.matrices[name], downsample(delta), atol=1e-7)
        assert max(last.matrices[name].shape) <= 64
        np.testing.assert_allclose(last.current[name], downsample(base.params[name] + delta), atol=1e-6)
        assert set(last.relative_update) == {"layer 0", "layer 1"} == set(last.grad_norms)
        assert all(v > 0 for v in last.relative_update.values())
        assert all(v > 0 for v in last.grad_norms.values())
        counts, edges = last.histogram
        assert counts.sum() > 0 and len(edges) == len(counts) + 1
        bname = "model.layers.0.self_attn.q_proj.bias"
        now, start = last.biases[bname]
        assert np.array_equal(start, base.params[bname])
        if cfg.method == "full":
            assert not np.array_equal(now, start)  # full fine-tuning moves the biases too
            assert now is not model.params[bname]
        # earlier snapshots were not changed by later steps
        assert not np.allclose(snaps[0].matrices[name], last.matrices[name])


def test_downsample_block_average():
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(downsample(m, 64), m)
    d = downsample(np.ones((130, 7)), 64)
    assert d.shape == (44, 7) and np.allclose(d, 1.0)  # blocks of 3 rows (the last one of 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(downsample(x, 2), [[0.5, 2.5], [4.5, 6.5]])


def test_early_stopping(folder, tmp_path):
    # a learning rate this small cannot improve the validation loss: stop after `patience` evaluations
    cfg = LORA.replace(epochs=5, learning_rate=1e-12, eval_every=1000, early_stopping_patience=1)
    res, _ = run_loop(folder, tmp_path / "run", cfg)
    assert res.status == "finished" and res.step == 6
    assert read_run_json(tmp_path / "run")["final"]["early_stopped"] is True


def test_restore_best_keeps_the_best_weights(folder, tmp_path):
    cfg = FULL.replace(epochs=4, learning_rate=3e-3, restore_best=True, eval_every=1000)
    events = []
    res, model = run_loop(folder, tmp_path / "run", cfg, events)
    evals = [e.valid_loss for e in events if isinstance(e, EvalMetrics)]
    best = min(evals)
    saved = Model.from_pretrained(tmp_path / "run")
    from finetune_desktop.training.loop import evaluate
    from finetune_desktop.data.batching import make_batches
    _, tok, _, va, _ = setup(folder, cfg)
    vl, _ = evaluate(saved, va, 4, tok.pad_token_id, make_batches)
    assert vl == pytest.approx(best, rel=1e-5)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["final"]["restored_best"] is True


@pytest.mark.parametrize("method", ["lora", "full"])
def test_snapshot_relative_update_matches_brute_force(folder, method):
    from finetune_desktop.engine import LoraConfig
    from finetune_desktop.engine.optim import AdamWConfig, adamw_init, adamw_step
    from finetune_desktop.training.snapshots import SnapshotMaker, layer_of

    model = Model.from_pretrained(folder)
    if method == "lora":
        model.add_lora(LoraConfig(4, 8.0), seed=0)
        for k, v in model.lora.items():  # a trained-looking adapter (B no longer zero)
            v += 0.05 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
    maker = SnapshotMaker(model)
    P = model.trainable_params()
    rng = np.random.default_rng(2)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in P.items()}
    eff = lambda n: (model.merged_params()[n]).copy()  # noqa: E731 - effective weight
    W_before = {n: eff(n) for n in maker.names}
    before = maker.before_update()
    rel = adamw_step(P, grads, adamw_init(P), 1e-3, AdamWConfig())
    snap = maker.build(1, before, {}, None, rel)
    for l in range(model.config.num_hidden_layers):
        names = [n for n in maker.names if layer_of(n) == l]
        num = math.sqrt(sum(float(np.sum((eff(n) - W_before[n]) ** 2)) for n in names))
        den = math.sqrt(sum(float(np.sum(maker.W0[n] ** 2)) for n in names))
        # LoRA: exact; full: ||dW|| comes from the optimizer's ratio times ||W after||, off by O(||dW|| / ||W||)
        assert snap.relative_update[f"layer {l}"] == pytest.approx(num / den, rel=1e-4 if method == "lora" else 1e-2)
