"""What the teaching views show, computed by training/: step mode runs exactly one step and says
what each phase computed; per-token losses are the engine's; the forgetting meter and the
overfit alarm; stopping with the best checkpoint."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from test_training_helpers import conversations, new_run, setup, tiny_model_folder, write_jsonl

from finetune_desktop.training.config import TrainConfig
from finetune_desktop.training.control import TrainControl
from finetune_desktop.training.events import EvalMetrics, RunAlarm, StepDetail, StepMetrics
from finetune_desktop.training.loop import LoopOptions, train
from finetune_desktop.training.runs import load_run_metrics

LORA = TrainConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=3)
FULL = TrainConfig(method="full", epochs=3, batch_size=4, learning_rate=1e-3, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("teach") / "model")


def _loop_in_thread(folder, run_dir, cfg, control, events):
    model, tok, tr, va, hyper = setup(folder, cfg)
    new_run(run_dir)
    out = {}

    def go():
        out["result"] = train(model, tr, va, cfg, hyper, run_dir, on_event=events.append, control=control,
                              pad_id=tok.pad_token_id)

    t = threading.Thread(target=go)
    t.start()
    return t, model, out


def _wait_paused(control, t, timeout=60):
    import time

    t0 = time.monotonic()
    while not control.paused and t.is_alive():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("the loop did not pause")
        time.sleep(0.01)


@pytest.mark.parametrize("cfg", [LORA, FULL], ids=["lora", "full"])
def test_step_mode_runs_exactly_one_step_identical_to_a_normal_one(folder, tmp_path, cfg):
    control, events = TrainControl(), []
    control.step_once()  # from idle: the run starts and pauses after its first step
    t, model, out = _loop_in_thread(folder, tmp_path / "step", cfg, control, events)
    _wait_paused(control, t)
    stepped = {k: v.copy() for k, v in model.trainable_params().items()}
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [1]
    assert len(load_run_metrics(tmp_path / "step").train) == 1
    detail = [e for e in events if isinstance(e, StepDetail)]
    assert len(detail) == 1 and detail[0].step == 1
    control.step_once()  # one more from pause
    _wait_paused(control, t)
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [1, 2]
    control.stop()
    t.join(60)

    # the same run, normally: its weights after step 1 equal step mode's
    ref_events, captured = [], {}
    model2, tok, tr, va, hyper = setup(folder, cfg)
    new_run(tmp_path / "normal")

    def grab(e):
        ref_events.append(e)
        if isinstance(e, StepMetrics) and e.step == 1:
            captured.update({k: v.copy() for k, v in model2.trainable_params().items()})
    train(model2, tr, va, cfg, hyper, tmp_path / "normal", on_event=grab, pad_id=tok.pad_token_id)
    for k in stepped:
        np.testing.assert_array_equal(stepped[k], captured[k], err_msg=k)
    first = next(e for e in ref_events if isinstance(e, StepMetrics))
    assert first.train_loss == next(e for e in events if isinstance(e, StepMetrics)).train_loss


def test_step_detail_phases_are_the_engines_numbers(folder, tmp_path):
    from finetune_desktop.engine import Model, Tokenizer
    from finetune_desktop.training.inspect import token_losses
    from finetune_desktop.training.session import attach_method

    control, events = TrainControl(), []
    control.step_once()
    t, model, out = _loop_in_thread(folder, tmp_path / "d", LORA, control, events)
    _wait_paused(control, t)
    control.stop()
    t.join(60)
    d = next(e for e in events if isinstance(e, StepDetail))
    assert d.input_ids.shape == d.labels.shape == d.attention_mask.shape
    assert len(d.activation_rms) == model.config.num_hidden_layers + 1 and all(x > 0 for x in d.activation_rms)
    assert d.learning_rate > 0 and np.isfinite(d.loss)
    adapted = [k.replace(".lora_A.weight", ".weight") for k in model.lora if ".lora_A." in k]
    assert set(d.grad_norms) == set(adapted) and all(v > 0 for v in d.grad_norms.values())
    assert set(d.update_ratios) == set(adapted) and all(v > 0 for v in d.update_ratios.values())
    # the per-token losses of row 0 are the pre-step model's, as the per-token view computes them
    fresh = Model.from_pretrained(folder)
    attach_method(fresh, LORA)
    row = np.asarray(d.input_ids[0])[np.asarray(d.attention_mask[0]) > 0]
    lab = np.asarray(d.labels[0])[: len(row)]
    tl = token_losses(fresh, Tokenizer.from_pretrained(folder), row, lab)
    got = np.asarray(d.token_losses[: len(row)])
    want = np.array([np.nan if x is None else x for x in tl.losses])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_token_losses_average_to_the_engines_loss(folder):
    from finetune_desktop.data import encode_conversations
    from finetune_desktop.engine import Model, Tokenizer
    from finetune_desktop.training.inspect import token_losses

    model, tok = Model.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    ex = encode_conversations(tok, conversations(3), 128)[2]
    tl = token_losses(model, tok, ex.input_ids, ex.labels)
    loss, counted, _ = model.loss(np.asarray(ex.input_ids)[None], np.asarray(ex.labels)[None])
    assert sum(x is not None for x in tl.losses) == counted
    assert abs(tl.mean_loss - loss) < 1e-5
    assert "".join(tl.tokens) == tok.decode(list(ex.input_ids))
    for t in range(1, len(tl.ids)):
        assert len(tl.top[t]) == 3 and tl.top[t][0][1] >= tl.top[t][1][1] >= tl.top[t][2][1]
        assert tl.probs[t] <= tl.top[t][0][1] + 1e-12


def test_overfit_alarm_and_keeping_the_best_checkpoint(folder, tmp_path):
    """Tiny data, many epochs, a high rate: validation loss turns up while training loss falls;
    the alarm fires once, and stopping with the best checkpoint saves that model."""
    from finetune_desktop.engine import Model

    cfg = TrainConfig(epochs=40, batch_size=4, learning_rate=3e-2, eval_every=2, seed=1, lora_rank=32,
                      lora_alpha=64.0)
    control, events = TrainControl(), []

    def on_event(e):
        events.append(e)
        if isinstance(e, RunAlarm):
            control.stop_keeping_best()

    from finetune_desktop.data import encode_conversations
    from finetune_desktop.data.types import Conversation, Message

    model, tok, tr, _, hyper = setup(folder, cfg, n_train=8, n_valid=8)
    # held-out questions answered plainly: the more the model learns the 8 pirate replies by
    # heart, the worse it predicts these
    plain = [Conversation((Message("user", f"Question number {i}, please?"),
                           Message("assistant", "The weather is sunny and warm today.")), i + 1) for i in range(8)]
    va = encode_conversations(tok, plain, 128)
    run = new_run(tmp_path / "overfit")
    res = train(model, tr, va, cfg, hyper, run, on_event=on_event, control=control, pad_id=tok.pad_token_id)
    alarms = [e for e in events if isinstance(e, RunAlarm)]
    assert len(alarms) == 1 and alarms[0].kind == "overfit" and "validation loss went up" in alarms[0].message
    assert res.status == "stopped"
    evals = [e for e in events if isinstance(e, EvalMetrics) and e.step > 0]
    best = min(evals, key=lambda e: e.valid_loss)
    assert alarms[0].best_step == best.step
    saved = Model.from_pretrained(run / "model")
    from finetune_desktop.data.batching import make_batches
    from finetune_desktop.training.loop import evaluate
    vl, _ = evaluate(saved, va, 4, tok.pad_token_id, make_batches)
    assert abs(vl - best.valid_loss) < 1e-4, (vl, best.valid_loss)


def test_forgetting_meter_and_alarm(folder, tmp_path):
    from finetune_desktop.data import encode_conversations
    from finetune_desktop.data.types import Conversation, Message

    general = [Conversation((Message("user", f"Tell me about day {i}."),
                             Message("assistant", "It was a quiet day with sun and a little rain.")), i + 1)
               for i in range(6)]
    cfg = TrainConfig(method="full", epochs=60, batch_size=4, learning_rate=3e-3, seed=2)
    model, tok, tr, va, hyper = setup(folder, cfg)
    gen = encode_conversations(tok, general, 128)
    events = []
    # a threshold this tiny model's run crosses (the shipped one is for real base models)
    res = train(model, tr, [], cfg, hyper, new_run(tmp_path / "forget"), on_event=events.append,
                pad_id=tok.pad_token_id, general_examples=gen, options=LoopOptions(forgetting_rise=0.2))
    evals = [e for e in events if isinstance(e, EvalMetrics)]
    assert evals[0].step == 0 and evals[0].valid_loss is None and evals[0].general_loss is not None
    assert all(e.general_loss is not None for e in evals)
    m = load_run_metrics(tmp_path / "forget")
    assert [d["step"] for d in m.eval] == [e.step for e in evals] and all("general_loss" in d for d in m.eval)
    alarms = [e for e in events if isinstance(e, RunAlarm)]
    rose = max(e.general_loss for e in evals) - evals[0].general_loss
    assert rose > 0.2, rose  # the run is built to forget (60 epochs of full fine-tuning)
    assert [a.kind for a in alarms] == ["forgetting"] and "forgetting" in alarms[0].message
    assert res.status == "finished"


def test_no_general_file_means_no_meter(folder, tmp_path):
    events = []
    model, tok, tr, va, hyper = setup(folder, LORA)
    train(model, tr, [], LORA, hyper, new_run(tmp_path / "none"), on_event=events.append, pad_id=tok.pad_token_id)
    assert not [e for e in events if isinstance(e, EvalMetrics)]
