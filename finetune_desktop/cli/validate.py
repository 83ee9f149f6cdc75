"""`finetune-desktop validate DATA [--max-seq-len N] [--json] [--base MODEL]`

Exit codes: 0 valid (warnings allowed), 1 invalid (each error printed with its line), 2 usage
error or unreadable path, 3 internal error. Never prints a traceback; never modifies the file."""
from __future__ import annotations

import json
import os
import sys

from ..data.validate import validate_file
from ..engine.errors import UserError
from .common import pos_int

NAME = "validate"
BAR_WIDTH = 30


def register(sub) -> None:
    v = sub.add_parser(NAME, help="check a training file and report every problem by line",
                       description="Check a training file without changing it. Exit 0 valid, 1 invalid "
                                   "(every error names its line), 2 unreadable file or bad option.")
    v.add_argument("data", help="the training file")
    v.add_argument("--max-seq-len", type=pos_int, default=512, metavar="N",
                   help="examples longer than this many tokens are reported as cut")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--base", default="base",
                   help="the model whose tokenizer and chat template count the tokens")
    v.set_defaults(run=run)


def _out(text: str = "", stream=None) -> None:
    stream = stream or sys.stdout
    try:
        print(text, file=stream)
    except UnicodeEncodeError:  # a console that cannot show e.g. Korean
        enc = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(enc, "replace").decode(enc, "replace"), file=stream)


def _load_tokenizer(spec: str):
    """-> (tokenizer or None, note or None). The embedded model's tokenizer may be missing (then
    tokens are not counted); any other unusable --base is an error."""
    from ..training.loading import open_tokenizer

    try:
        return open_tokenizer(spec), None
    except UserError as e:
        if spec == "base":
            return None, f"the embedded model's tokenizer cannot be used ({e}), so tokens are not counted"
        raise


def _fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.1f}"
    return f"{int(x):,}"


def _histogram_lines(hist: dict, unit: str) -> list[str]:
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    if not counts:
        return []
    top = max(counts) or 1
    labels = [f"{int(edges[i]):>6}-{int(edges[i + 1]):<6}" for i in range(len(counts))]
    out = [f"  length histogram ({unit}):"]
    for lab, c in zip(labels, counts):
        bar = "#" * (round(c / top * BAR_WIDTH) if c else 0)
        if c and not bar:
            bar = "."
        out.append(f"    {lab} {bar:<{BAR_WIDTH}} {c}")
    return out


def format_report(report, tokenizer_note=None) -> str:
    s = report.stats
    lines = []
    fmt = {"jsonl": "JSON Lines", "json": "JSON array", "csv": "CSV", "tsv": "TSV"}.get(report.format or "", "unknown")
    kinds = s.get("record_kinds") or {}
    kind_txt = ", ".join(f"{k.replace('_', '/')}: {v}" for k, v in kinds.items())
    lines.append(f"{report.path}")
    lines.append(f"  format: {fmt} ({s.get('encoding', '?')}){'; ' + kind_txt if kind_txt else ''}")
    lines.append(f"  examples: {_fmt_num(s.get('examples'))}, messages: {_fmt_num(s.get('messages'))}")
    unit = s.get("length_unit", "tokens")
    if s.get("total_tokens") is not None:
        lines.append(f"  tokens: {_fmt_num(s['total_tokens'])} in all, {_fmt_num(s.get('trained_tokens'))} trained "
                     f"(assistant replies, after truncation)")
    elif tokenizer_note:
        lines.append(f"  note: {tokenizer_note}")
    if s.get("length_max") is not None:
        lines.append(f"  length per example ({unit}): p50 {_fmt_num(s['length_p50'])}, p90 {_fmt_num(s['length_p90'])}, "
                     f"p95 {_fmt_num(s['length_p95'])}, max {_fmt_num(s['length_max'])}")
        if unit == "tokens":
            lines.append(f"  longer than --max-seq-len {s.get('max_seq_len')}: {_fmt_num(s.get('truncated_examples'))} "
                         f"(cut at the end: {_fmt_num(s.get('tokens_cut'))} tokens); dropped: "
                         f"{_fmt_num(s.get('dropped_examples'))}")
        if s.get("steps_per_epoch") is not None:
            eta = ""
            if s.get("seconds_per_epoch") is not None:
                eta = f", about {s['seconds_per_epoch']:.0f} s per epoch"
            lines.append(f"  steps per epoch at batch size {s.get('batch_size')}: {_fmt_num(s['steps_per_epoch'])}{eta}")
        lines.extend(_histogram_lines(s.get("histogram") or {}, unit))
    if report.errors:
        lines.append("")
        lines.append(f"errors ({len(report.errors)}):")
        lines.extend(f"  {i}" for i in report.errors)
    if report.warnings:
        lines.append("")
        lines.append(f"warnings ({len(report.warnings)}):")
        lines.extend(f"  {i}" for i in report.warnings)
    lines.append("")
    verdict = "valid" if report.ok else "invalid"
    lines.append(f"{verdict}: {report.summary_line()}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        return _run(args)
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1


def _run(args) -> int:
    data = args.data
    max_seq_len = args.max_seq_len
    as_json = args.json
    if not os.path.exists(data):
        _out(f"error: {data}: no such file", sys.stderr)
        return 2
    if os.path.isdir(data):
        _out(f"error: {data}: is a folder, not a file", sys.stderr)
        return 2
    if not os.access(data, os.R_OK):
        _out(f"error: {data}: permission denied", sys.stderr)
        return 2
    tokenizer, note = _load_tokenizer(args.base)
    report = validate_file(data, tokenizer=tokenizer, max_seq_len=max_seq_len, batch_size=8)
    if not report.readable:
        _out(f"error: {report.errors[0].message}", sys.stderr)
        return 2
    if as_json:
        d = report.to_dict()
        if note:
            d["note"] = note
        _out(json.dumps(d, ensure_ascii=False, indent=2))
    else:
        _out(format_report(report, note))
    return 0 if report.ok else 1
