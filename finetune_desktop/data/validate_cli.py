"""`finetune-desktop validate DATA [--max-seq-len N] [--json] [--base MODEL]`

Exit codes: 0 valid (warnings allowed), 1 invalid (each error printed with its line), 2 usage
error or unreadable path, 3 internal error. Never prints a traceback; never modifies the file."""
from __future__ import annotations

import json
import os
import sys

from .validate import validate_file

BAR_WIDTH = 30


def _out(text: str = "", stream=None) -> None:
    stream = stream or sys.stdout
    try:
        print(text, file=stream)
    except UnicodeEncodeError:  # a console that cannot show e.g. Korean
        enc = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(enc, "replace").decode(enc, "replace"), file=stream)


def _load_tokenizer(spec: str):
    """-> (tokenizer or None, note or None). Raises ValueError for a --base that is unusable."""
    from ..resources_path import resolve_model_path
    from ..engine.tokenizer import Tokenizer

    folder = resolve_model_path(spec)
    has_tok = (folder / "tokenizer.json").exists()
    if spec == "base" and not has_tok:
        return None, "the embedded model has no tokenizer yet, so tokens are not counted"
    if not folder.exists():
        raise ValueError(f"--base {spec}: no such model folder")
    try:
        tok = Tokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - ModelFormatError and friends
        if spec == "base":
            return None, f"the embedded model's tokenizer cannot be loaded ({e}), so tokens are not counted"
        raise ValueError(f"--base {spec}: {e}") from None
    if not tok.chat_template:
        return None, f"the tokenizer of {spec} has no chat template, so tokens are not counted"
    return tok, None


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


def run_validate(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        raise
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as e:  # noqa: BLE001 - never a traceback for users
        _out(f"error: internal error while validating: {type(e).__name__}: {e} (please report this)", sys.stderr)
        return 3


def _run(args) -> int:
    data = getattr(args, "data", None)
    if not data:
        _out("error: no training file given", sys.stderr)
        return 2
    max_seq_len = getattr(args, "max_seq_len", 512) or 512
    if max_seq_len < 1:
        _out(f"error: --max-seq-len must be positive, got {max_seq_len}", sys.stderr)
        return 2
    as_json = bool(getattr(args, "json", False))
    if not os.path.exists(data):
        _out(f"error: {data}: no such file", sys.stderr)
        return 2
    if os.path.isdir(data):
        _out(f"error: {data}: is a folder, not a file", sys.stderr)
        return 2
    if not os.access(data, os.R_OK):
        _out(f"error: {data}: permission denied", sys.stderr)
        return 2
    try:
        tokenizer, note = _load_tokenizer(getattr(args, "base", None) or "base")
    except ValueError as e:
        _out(f"error: {e}", sys.stderr)
        return 2
    report = validate_file(data, tokenizer=tokenizer, max_seq_len=max_seq_len,
                           batch_size=getattr(args, "batch_size", None) or 8,
                           tokens_per_second=getattr(args, "tokens_per_second", None))
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
