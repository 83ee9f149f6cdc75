"""Summarise a py-spy raw profile (`py-spy record --threads --format raw`) for the GUI thread:
how many samples it has, how many are in pyqtgraph painting, axis drawing, chart updates, file
work, and the top leaf frames. Use it to compare before/after on the same machine load.

    py-spy record --idle --threads --format raw -r 200 -o /tmp/gui.txt -- python bench/gui_latency.py --no-cli
    python bench/pyspy_gui_thread.py /tmp/gui.txt [--top 25]

Samples only name Python frames: time Qt spends in C++ inside the event loop (painting widgets,
waiting for events) shows under the frame that runs the loop (QEventLoop.exec / processEvents);
the bench's event loop frames are reported as "event loop (idle or C++)"."""
from __future__ import annotations

import argparse
import collections
import re

GROUPS = [
    ("pyqtgraph paintEvent", ("GraphicsView.paintEvent",)),
    ("  AxisItem.paint", ("AxisItem.paint",)),
    ("  AxisItem.generateDrawSpecs", ("generateDrawSpecs",)),
    ("  curve / image paint", ("PlotCurveItem.paint", "ImageItem.paint", "BarGraphItem.paint",
                               "ScatterPlotItem.paint")),
    ("autorange / view range", ("updateAutoRange", "ViewBox.setRange", "updateViewRange")),
    ("setData / setImage", ("PlotDataItem.setData", "ImageItem.setImage", "BarGraphItem.setOpts")),
    ("loss chart redraw", ("LossPanel._redraw", "LossPanel.redraw")),
    ("weights view draw", ("WeightsView._tick", "WeightsView._draw")),
    ("chat transcript render", ("ChatTranscript._render", "ChatTranscript.update_last", "ChatTranscript.add")),
    ("file work (validate / runs / chat log)", ("validate_file", "list_runs", "checkpoint_dirs", "_save_exchange",
                                                "load_metric_rows", "read_run_json", "run_title")),
]
IDLE = re.compile(r"^(\w+\.)?(exec|processEvents|wait_until|_exec|sleep|run_app|main)$")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    threads = collections.Counter()
    rows = []
    for line in open(args.raw, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0]] += int(n)
        rows.append((frames, int(n)))
    gui = next((t for t in threads if "MainThread" in t), None)
    if gui is None:
        print("no MainThread in this profile (record with --threads)")
        return 1
    tid = re.search(r"\((\d+)\)", gui).group(1)
    total = idle = 0
    groups = collections.Counter()
    leaves = collections.Counter()
    for frames, n in rows:
        if re.search(r"\((\d+)\)", frames[0]).group(1) != tid:
            continue
        names = [f.split(" (")[0] for f in frames[1:]]
        total += n
        if not names or IDLE.match(names[-1]):
            idle += n
            continue
        for label, keys in GROUPS:
            if any(any(k in f for k in keys) for f in names):
                groups[label] += n
        leaves[" < ".join(reversed(names[-3:]))] += n
    busy = total - idle
    print(f"GUI thread: {total} samples; event loop (idle or C++): {idle}; Python work: {busy} "
          f"({100 * busy / max(1, total):.1f}%)")
    for label, _ in GROUPS:
        print(f"  {label:<42} {groups[label]:>7}  ({100 * groups[label] / max(1, total):.1f}% of all)")
    print("top Python leaf frames:")
    for k, v in leaves.most_common(args.top):
        print(f"  {v:>7}  {k}")
    print("threads:", ", ".join(f"{t.split(': ')[-1]}={n}" for t, n in threads.most_common(8)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
