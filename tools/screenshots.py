"""Render the real main window and save docs/screenshot_1280x800.png and docs/screenshot_1920x1080.png.

It loads a sample file, runs a short training, turns on Compare mode and chats in Korean, then
grabs the window at both sizes. Run it under a virtual display:

    apt-get install -y xvfb xauth fonts-noto-cjk
    xvfb-run -a -s "-screen 0 1920x1080x24" python tools/screenshots.py

Uses the embedded base model when it is installed, otherwise a tiny random model (the chat then
shows nonsense, but the layout is the same). App data goes to a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "sample_data" / "gyeongsang_ajumma.jsonl"))
    ap.add_argument("--base", default=None, help="model folder (default: embedded, else a tiny random model)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 1 with the embedded model, 3 with the tiny one")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--message", default="안녕하세요! 오늘 저녁은 뭐 먹을까요?")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--sizes", default="1280x800,1920x1080", help="window sizes to grab, comma-separated")
    args = ap.parse_args(argv)

    home = tempfile.mkdtemp(prefix="ftd-shots-")
    os.environ["FINETUNE_DESKTOP_HOME"] = home
    os.environ["FINETUNE_DESKTOP_NO_CONFIRM"] = "1"
    from finetune_desktop.gui import bridge
    from finetune_desktop.gui.app import make_application
    app = make_application()
    from finetune_desktop.gui import MainWindow
    from finetune_desktop.gui.style import has_korean_font

    base = args.base
    tiny = False
    if base is None and not bridge.is_model_folder(bridge.embedded_base_model()):
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import make_tiny_model_folder
        base = str(make_tiny_model_folder(Path(home) / "tiny-model", hidden=64, layers=4, heads=4, kv_heads=2,
                                          intermediate=128))
        tiny = True
        print("embedded base model not installed: using a tiny random model", flush=True)
    if not has_korean_font():
        print("warning: no Korean font found (install fonts-noto-cjk)", flush=True)
    epochs = args.epochs or (3 if tiny else 1)

    w = MainWindow(base_model=base)
    w.resize(1280, 800)
    w.show()

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(cond, what: str) -> None:
        end = time.monotonic() + args.timeout
        while not cond():
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            app.processEvents()
            time.sleep(0.02)

    pump(0.5)
    w.load_data_file(args.data)          # checked on a worker thread
    wait(lambda: w.drop_zone.property("state") in ("ok", "bad"), "the file check")
    if w.report is None or not w.report.ok:
        print("error: the sample file did not validate", file=sys.stderr)
        return 1
    w.data_panel.epochs.setValue(epochs)
    done = []
    w.trainingFinished.connect(done.append)
    w.start_training()
    wait(lambda: done or not w.is_training(), "the training run")
    if not done:
        print("error: training did not finish: " + w.error_label.text(), file=sys.stderr)
        return 1
    wait(lambda: not w.running_threads(), "the training thread")
    w.weights_view.select("layer 0", "q_proj")
    w.weights_view.rescale()
    w.chat.compare_box.setChecked(True)
    w.chat.max_new.setValue(60)
    w.chat.temperature.setValue(0.7)
    w.chat.seed.setValue(1)
    w.chat.input.setPlainText(args.message)
    replies = []
    w.replyFinished.connect(replies.append)
    w.chat.send()
    wait(lambda: not w.chat.is_generating(), "the chat reply")
    w.chat.input.setPlainText("고마워요!")   # a message being typed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for size in [tuple(int(v) for v in wh.split("x")) for wh in args.sizes.split(",")]:
        w.resize(*size)
        pump(1.0)
        path = out / f"screenshot_{size[0]}x{size[1]}.png"
        img = w.grab()
        if not img.save(str(path), "PNG"):
            print(f"error: cannot write {path}", file=sys.stderr)
            return 1
        print(f"saved {path} ({img.width()}x{img.height()})", flush=True)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
