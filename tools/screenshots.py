"""Render the real main window and save the screenshots in docs/ (run it under a virtual display):

    apt-get install -y xvfb xauth fonts-noto-cjk
    xvfb-run -a -s "-screen 0 1920x1080x24" python tools/screenshots.py [--scenes main,step,...]

Scenes (each a fresh window at 1280x800, app data in a temporary folder):
  main      a short run on the Korean sample, Compare mode in the chat -> screenshot_1280x800.png,
            screenshot_1920x1080.png (the weights tab), then which matrices moved -> view_which_moved.png and
            the per-token loss view before vs now -> view_token_loss.png
  step      Step from idle, one picture per phase in the lecture's order -> step_1_pretrained.png
            (the batch, read by the pre-trained weights), step_2_forward.png, step_3_loss.png,
            step_4_backprop.png, step_5_update.png
  quiz      the Korean FAQ sample with its quiz file chosen before Run, on a copy of the base model
            that ships general dialogs (tools/corpus/heldout_dialogs_en.jsonl, never trained on):
            the quiz score and the general-ability loss on the chart, "Did it learn?" after the run
            (asked again with the training file's own questions) -> view_did_it_learn.png
  overfit   a few pirate examples for many epochs, validated on Korean dialect replies: the overfit
            banner -> view_overfit_banner.png
  runs      the run history with an interrupted run (its reason and Continue) -> view_runs.png

Uses the embedded base model when it is installed, otherwise a tiny random model (the layout is
the same; the numbers and replies are not meaningful)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "sample_data"
SCENES = ("main", "step", "quiz", "overfit", "runs")


class Shooter:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from finetune_desktop.gui.app import make_application
        self.app = make_application()
        self.base = args.base or self._default_base()

    def _default_base(self) -> str | None:
        from finetune_desktop.gui import bridge
        if bridge.is_model_folder(bridge.embedded_base_model()):
            return None
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import make_tiny_model_folder
        print("embedded base model not installed: using a tiny random model", flush=True)
        return str(make_tiny_model_folder(Path(tempfile.mkdtemp()) / "tiny", hidden=64, layers=4, heads=4, kv_heads=2,
                                          intermediate=128))

    def window(self, base=None):
        os.environ["FINETUNE_DESKTOP_HOME"] = tempfile.mkdtemp(prefix="ftd-shots-")
        from finetune_desktop.gui import MainWindow
        w = MainWindow(base_model=base or self.base)
        w.resize(1280, 800)
        w.show()
        self.pump(0.5)
        return w

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.app.processEvents()
            time.sleep(0.01)

    def wait(self, cond, what: str) -> None:
        end = time.monotonic() + self.args.timeout
        while not cond():
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            self.app.processEvents()
            time.sleep(0.02)

    def load(self, w, path) -> None:
        w.load_data_file(str(path))
        self.wait(lambda: w.drop_zone.property("state") in ("ok", "bad"), "the file check")
        if w.report is None or not w.report.ok:
            raise SystemExit(f"{path} did not validate")

    def train(self, w) -> str:
        done = []
        w.trainingFinished.connect(done.append)
        w.start_training()
        self.wait(lambda: done or not w.is_training(), "the training run")
        if not done:
            raise SystemExit("training did not finish: " + w.error_label.text())
        self.wait(lambda: not w.is_training(), "the training thread")
        return done[0]

    def save(self, w, name: str, size=(1280, 800)) -> None:
        if (w.width(), w.height()) != size:
            w.resize(*size)
        self.pump(1.0)
        img = w.grab()
        path = self.out / name
        if not img.save(str(path), "PNG"):
            raise SystemExit(f"cannot write {path}")
        print(f"saved {path} ({img.width()}x{img.height()})", flush=True)


def scene_main(s: Shooter) -> None:
    w = s.window()
    s.load(w, SAMPLES / "gyeongsang_ajumma.jsonl")
    w.data_panel.epochs.setValue(s.args.epochs or 1)
    s.train(w)
    w.weights_view.select("layer 0", "q_proj")
    w.weights_view.rescale()
    w.chat.compare_box.setChecked(True)
    w.chat.max_new.setValue(60)
    w.chat.temperature.setValue(0.7)
    w.chat.seed.setValue(1)
    w.chat.input.setPlainText("안녕하세요! 오늘 저녁은 뭐 먹을까요?")
    w.chat.send()
    s.wait(lambda: not w.chat.is_generating(), "the chat reply")
    w.chat.input.setPlainText("고마워요!")
    s.wait(lambda: not w.quiz_view.is_asking(), "the quiz after the run")
    w.monitor.tabs.setCurrentWidget(w.weights_view)
    for size in ((1280, 800), (1920, 1080)):
        s.save(w, f"screenshot_{size[0]}x{size[1]}.png", size)
    w.monitor.tabs.setCurrentWidget(w.overview)
    s.save(w, "view_which_moved.png")
    line = w.token_view.examples[0].line if w.token_view.examples else 1
    w.open_example(line)
    w.token_view.select_model(w.chat.current_spec(), compute=False)
    w.token_view.refresh()
    s.wait(lambda: w.token_view.now.picture is not None and w.token_view.before.picture is not None,
           "the per-token losses")
    s.save(w, "view_token_loss.png")
    w.shutdown()
    w.close()


def scene_step(s: Shooter) -> None:
    w = s.window()
    s.load(w, SAMPLES / "gyeongsang_ajumma.jsonl")
    w.data_panel.epochs.setValue(1)
    w.step()
    s.wait(lambda: w.training.waiting and w.step_view.picture is not None and bool(w.step_view.picture.rows),
           "one step")
    for i, key in enumerate(("batch", "forward", "loss", "backward", "update"), 1):
        w.step_view.show_phase(key)
        name = {"batch": "pretrained", "backward": "backprop"}.get(key, key)
        s.save(w, f"step_{i}_{name}.png")
    w.shutdown()
    w.close()


def base_with_general_dialogs(base: str | None) -> str:
    """A copy of the base model that ships general dialogs (the forgetting meter's data)."""
    from finetune_desktop.gui import bridge
    src = Path(base) if base else bridge.embedded_base_model()
    dst = Path(tempfile.mkdtemp(prefix="ftd-base-")) / "base_with_general"
    shutil.copytree(src, dst)
    lines = (ROOT / "tools" / "corpus" / "heldout_dialogs_en.jsonl").read_text(encoding="utf-8").splitlines()[:48]
    (dst / "general_eval.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(dst)


def scene_quiz(s: Shooter) -> None:
    w = s.window(base_with_general_dialogs(s.base))
    w.quiz_view.set_quiz_file(str(SAMPLES / "faq_gimbap_cafe_ko_quiz.jsonl"))
    s.load(w, SAMPLES / "faq_gimbap_cafe_ko.jsonl")
    w.data_panel.epochs.setValue(s.args.quiz_epochs)
    w.data_panel.val_split.setValue(0)
    s.train(w)
    w.monitor.tabs.setCurrentWidget(w.quiz_view)
    s.wait(lambda: not w.quiz_view.is_asking(), "the quiz after the run")
    print(f"quiz file: {w.quiz_view.score.text()}", flush=True)
    w.quiz_view.from_training.setChecked(True)       # the table: are the trained answers reproduced?
    w.quiz_view.ask_again()
    s.wait(lambda: not w.quiz_view.is_asking(), "the quiz on the training questions")
    s.save(w, "view_did_it_learn.png")
    w.shutdown()
    w.close()


def scene_overfit(s: Shooter) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ftd-overfit-"))
    lines = (SAMPLES / "pirate_captain.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (tmp / "pirate8.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    w = s.window()
    s.load(w, tmp / "pirate8.jsonl")
    dp = w.data_panel
    dp.epochs.setValue(60)
    dp.batch.setValue(4)
    dp.lr.setCurrentText(s.args.overfit_lr)
    dp.lora_rank.setValue(32)
    dp.lora_alpha.setValue(64)
    w.set_validation_file(str(SAMPLES / "gyeongsang_ajumma_valid.jsonl"))
    s.pump(1.0)
    w.start_training()
    s.wait(lambda: w.overfit_banner.isVisible() or not w.is_training(), "the overfit alarm")
    if not w.overfit_banner.isVisible():
        raise SystemExit("no alarm: " + w.error_label.text())
    w.toggle_pause()
    s.wait(lambda: w.training.waiting, "the pause")
    s.save(w, "view_overfit_banner.png")
    w.shutdown()
    w.close()


def scene_runs(s: Shooter) -> None:
    import subprocess
    from finetune_desktop.gui import bridge
    from finetune_desktop.training.config import TrainConfig
    from finetune_desktop.training.control import TrainControl
    from finetune_desktop.training.events import StepMetrics
    from finetune_desktop.training.session import start_training
    os.environ["FINETUNE_DESKTOP_HOME"] = tempfile.mkdtemp(prefix="ftd-shots-")
    runs = []
    for name, pid in (("pirate_captain", 2 ** 22 + 4321), ("gyeongsang_ajumma", None)):
        control = TrainControl()
        run = bridge.new_run_dir(name)
        start_training(str(SAMPLES / f"{name}.jsonl"), run_dir=run, config=TrainConfig(epochs=1),
                       base=s.base or "base", control=control,
                       on_event=lambda e, c=control: isinstance(e, StepMetrics) and e.step == 9 and c.stop())
        runs.append(Path(run))
    # the first as a crash leaves it; the second held by another process (its lock), as a CLI run would
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom finetune_desktop.training.runs import "
                               "RunLock\nRunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)",
                               str(runs[1])], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    holder.stdout.readline()
    for run, pid in zip(runs, (2 ** 22 + 4321, holder.pid)):
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        info.update(status="running", pid=pid)
        (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    try:
        from finetune_desktop.gui import MainWindow
        w = MainWindow(base_model=s.base)
        w.resize(1280, 800)
        w.show()
        s.wait(lambda: w.runs.loaded, "the run list")
        w.left_tabs.setCurrentIndex(1)
        w.history.select_run(str(runs[0]))
        s.save(w, "view_runs.png")
        w.shutdown()
        w.close()
    finally:
        holder.kill()
        holder.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="model folder (default: embedded, else a tiny random model)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the main scene (default 1)")
    ap.add_argument("--quiz-epochs", type=int, default=12, help="epochs of the quiz scene")
    ap.add_argument("--overfit-lr", default="1e-2", help="learning rate of the overfit scene")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--scenes", default=",".join(SCENES), help="comma-separated: " + ", ".join(SCENES))
    args = ap.parse_args(argv)
    os.environ["FINETUNE_DESKTOP_NO_CONFIRM"] = "1"
    s = Shooter(args)
    from finetune_desktop.gui.style import has_korean_font
    if not has_korean_font():
        print("warning: no Korean font found (install fonts-noto-cjk)", flush=True)
    for name in args.scenes.split(","):
        if name not in SCENES:
            raise SystemExit(f"unknown scene {name!r} (choose from {', '.join(SCENES)})")
        t0 = time.monotonic()
        globals()[f"scene_{name}"](s)
        print(f"scene {name}: {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
