"""Nothing lost, nothing silently wrong: divergence, one writer per run folder, interrupted runs
that complete with one command, leftovers cleaned up, a full disk. Through the real command line
in subprocesses, as a user (or a crash) would do it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training_helpers import conversations, tiny_model_folder, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "finetune_desktop", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def popen(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "finetune_desktop", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def clean(p):
    out = p.stdout + p.stderr
    assert "Traceback" not in out and "internal error" not in out, out
    return p


def steps_of(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
            if l.strip() and "train_loss" in l]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    folder = tiny_model_folder(d / "tiny")
    data = write_jsonl(d / "pirate.jsonl", conversations(16))
    return d, folder, data


# ----------------------------------------------------------------------------- divergence
PIRATE = ROOT / "sample_data" / "pirate_captain.jsonl"


def test_a_wrecked_run_fails_keeps_a_good_checkpoint_and_resumes_with_a_lower_rate(tmp_path):
    """The built-in model on the pirate sample at learning rate 1: the loss climbs far above the
    pre-trained start and the replies would be garbage; the run must fail, not 'finish'."""
    from finetune_desktop.training.loading import base_model_dir

    if not (base_model_dir() / "config.json").exists():
        pytest.skip("the built-in model is not installed")
    run = tmp_path / "run"
    p = clean(cli("train", PIRATE, "--out", run, "--learning-rate", "1", "--epochs", "2"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "finished" not in p.stdout
    err = p.stderr
    assert "climbed from" in err and "learning rate" in err and "is safe here" in err, err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"]["kind"] == "diverged"
    assert not (run / "model").exists(), "a wrecked run must not leave a model that looks finished"
    for cp in (run / "checkpoints").glob("step-*"):  # whatever was kept was saved before the climb
        st = json.loads((cp / "state.json").read_text())
        assert st["loss_ema"] <= st["start_loss"] + max(1.0, 0.25 * st["start_loss"]), st
    p2 = clean(cli("train", PIRATE, "--out", run, "--resume"))
    assert "lower" in p2.stdout or "safer learning rate" in p2.stdout, p2.stdout
    info2 = json.loads((run / "run.json").read_text())
    if p2.returncode == 0:
        assert info2["status"] == "finished"
        segs = info2["schedule_segments"]
        assert segs[-1]["lr"] <= 0.25 + 1e-12
    else:  # even the lower rate diverged: it says so again, never "finished"
        assert p2.returncode == 1 and info2["status"] == "failed"


def test_default_settings_never_trip_the_divergence_watch(setup, tmp_path):
    d, folder, data = setup
    p = clean(cli("train", data, "--out", tmp_path / "ok", "--base", folder, "--epochs", "6"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- one writer per run
def test_two_trainings_into_one_folder_one_wins_and_the_folder_stays_clean(setup, tmp_path):
    d, folder, data = setup
    for trial in range(3):
        run = tmp_path / f"race{trial}"
        a = popen("train", data, "--out", run, "--base", folder, "--epochs", "3", "--seed", "1")
        b = popen("train", data, "--out", run, "--base", folder, "--epochs", "3", "--seed", "2")
        outs = [(q.wait(300), *q.communicate()) for q in (a, b)]
        codes = sorted(o[0] for o in outs)
        assert codes == [0, 2], outs
        loser = next(o for o in outs if o[0] == 2)
        assert "Traceback" not in loser[2]
        assert "another process" in loser[2] or "already holds a run" in loser[2], loser[2]
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "finished"
        steps = steps_of(run)
        assert steps == list(range(1, len(steps) + 1)), steps  # one run's steps, once each
        winner_seed = info["settings"]["seed"]
        winner = next(o for o in outs if o[0] == 0)
        assert str(run) in winner[1]
        assert winner_seed in (1, 2)


def test_resume_while_another_process_trains_names_the_holder(setup, tmp_path):
    from finetune_desktop.training.runs import RunLock, lock_holder, load_run

    d, folder, data = setup
    run = tmp_path / "held"
    assert clean(cli("train", data, "--out", run, "--base", folder, "--epochs", "2")).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; sys.path.insert(0, sys.argv[2]);"
                               "from finetune_desktop.training.runs import RunLock;"
                               "l = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(run), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = clean(cli("train", data, "--out", run, "--resume", "--epochs", "3"))
        assert p.returncode == 2 and f"process {holder.pid}" in p.stderr, p.stderr
        assert lock_holder(run)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run) is None  # the OS dropped the lock with the process
    with RunLock(run):
        pass


# ----------------------------------------------------------------------------- interrupted runs
def _kill_at(run_args, pattern: str):
    p = popen(*run_args)
    try:
        for line in p.stdout:
            if pattern in line:
                break
        os.kill(p.pid, signal.SIGKILL)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_before_its_first_checkpoint_restarts_with_one_command(setup, tmp_path):
    from finetune_desktop.training.runs import load_run

    d, folder, _ = setup
    data = write_jsonl(tmp_path / "long.jsonl", conversations(16) * 8)  # 128 steps of one example an epoch
    run = tmp_path / "early"
    _kill_at(("train", data, "--out", run, "--base", folder, "--epochs", "2", "--batch-size", "1"), "training:")
    assert not list((run / "checkpoints").glob("step-*")), "the kill came too late for this test"
    r = load_run(run)
    assert r.status == "interrupted" and "starts it again from step 0" in r.reason
    p = clean(cli("train", data, "--out", run, "--resume"))
    assert p.returncode == 0, p.stderr
    assert "starts again from step 0" in p.stdout
    assert steps_of(run) == list(range(1, len(steps_of(run)) + 1))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / "model" / "config.json").exists()


def test_all_steps_done_but_no_model_is_finished_by_resume(setup, tmp_path):
    from finetune_desktop.training.runs import load_run, update_run_json

    d, folder, data = setup
    run = tmp_path / "unsaved"
    assert clean(cli("train", data, "--out", run, "--base", folder, "--epochs", "2")).returncode == 0
    reference = (run / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "model")  # as if killed (or out of disk) between the last step and model/
    shutil.rmtree(run / "adapter")
    update_run_json(run, status="running", pid=2**22 + 4321)
    (run / ".model.tmp-half").mkdir()  # and a half-written temp folder left behind
    (run / ".model.tmp-half" / "model.safetensors").write_bytes(b"partial")
    r = load_run(run)
    assert r.status == "interrupted" and "not saved" in r.reason
    p = clean(cli("chat", run, "--prompt", "hi"))
    assert p.returncode == 2 and "no model yet" in p.stderr
    p = clean(cli("train", data, "--out", run, "--resume"))
    assert p.returncode == 0, p.stderr
    assert "saving it now" in p.stdout and "half-written" in p.stdout
    assert (run / "model" / "model.safetensors").read_bytes() == reference
    assert not list(run.glob(".*.tmp*"))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    p = clean(cli("train", data, "--out", run, "--resume"))
    assert p.returncode == 2 and "already finished" in p.stderr


def test_a_full_disk_fails_cleanly_and_the_run_completes_after_space_is_freed(setup, tmp_path):
    d, folder, data = setup
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        run = mnt / "run"
        p = clean(cli("train", data, "--out", run, "--base", folder, "--epochs", "2"))
        assert p.returncode in (1, 2), p.stdout + p.stderr
        assert "No space left on device" in p.stderr or "no space" in p.stderr.lower(), p.stderr
        assert not (run / "model" / "config.json").exists() or json.loads((run / "run.json").read_text())["status"] != "finished"
        subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)], check=True)
        p = clean(cli("train", data, "--out", run, "--resume"))
        assert p.returncode == 0, p.stdout + p.stderr
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
        assert not list(run.rglob(".*.tmp*"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_validate_and_train_agree_when_nothing_is_left_to_train(setup, tmp_path):
    """Every example longer than the maximum length, with the reply after the cut: validate says
    invalid (exit 1, naming the problem) and train refuses with the same reason."""
    from finetune_desktop.data.types import Conversation, Message

    d, folder, _ = setup
    long_q = "tell me about the sea and the wind and the boats " * 20
    convs = [Conversation((Message("user", long_q + str(i)), Message("assistant", "Arr, matey!")), i + 1)
             for i in range(12)]
    data = write_jsonl(tmp_path / "long.jsonl", convs)
    v = clean(cli("validate", data, "--base", folder, "--max-seq-len", "32"))
    assert v.returncode == 1 and "no example has any assistant tokens left" in v.stdout, v.stdout
    t = clean(cli("train", data, "--out", tmp_path / "r", "--base", folder, "--max-seq-len", "32"))
    assert t.returncode in (1, 2) and "assistant tokens left" in t.stderr, t.stderr
    assert clean(cli("validate", data, "--base", folder, "--max-seq-len", "2048")).returncode == 0
