"""validate_file: read a training file in one streaming pass and report every problem by line,
with statistics; read_conversations: the same, raising DataError when the file has errors.

Report statistics (`report.stats`):
  format, encoding, bytes, examples, messages, assistant_messages, trained_messages,
  record_kinds {"chat", "prompt_completion", "csv"}, characters, trained_characters,
  length_unit ("tokens" with a tokenizer, else "characters"), total_tokens and trained_tokens
  (None without a tokenizer; trained = assistant tokens the loss counts, after truncation),
  length_p50 / length_p90 / length_p95 / length_max / length_mean (per example, before
  truncation), histogram {"counts", "edges"}, max_seq_len, truncated_examples, tokens_cut,
  dropped_examples, batch_size, steps_per_epoch, padded_tokens_per_epoch, tokens_per_second,
  seconds_per_epoch (None unless tokens_per_second is given).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
from typing import Optional

import numpy as np

from .batching import padded_tokens
from .encode import template_messages
from .stream import StreamEncoder
from .readers import (PROMPT_COLUMNS, RESPONSE_COLUMNS, Record, detect_format, iter_csv, iter_json_values,
                      iter_jsonl, locate_line)
from .report import DataError, IssueCollector, ValidationReport
from .schema import conversation_from_json, conversation_from_row, fast_chat, field_name
from .textio import sniff_file
from .types import Conversation, Issue

FEW_EXAMPLES = 10        # fewer examples than this: a warning
SHORT_REPLY_CHARS = 4    # an assistant reply with fewer non-space characters: a warning
HIST_BINS = 10


def _unreadable(path: str, message: str, max_seq_len: int, batch_size: int, tokens_per_second) -> ValidationReport:
    stats: dict = {"format": None, "encoding": None, "bytes": None}
    _stats([], [], None, max_seq_len, batch_size, tokens_per_second, IssueCollector(), stats)
    return ValidationReport(path, None, False, [Issue(None, None, message, "error", "unreadable")], [],
                            stats, readable=False)


def validate_file(path, tokenizer=None, max_seq_len: int = 512, batch_size: int = 8,
                  tokens_per_second: Optional[float] = None) -> ValidationReport:
    """Read and check a training file; never modifies it. Returns a ValidationReport whose
    `conversations` are the valid examples and, when a tokenizer is given, whose `examples` are
    those encoded (truncated to max_seq_len; examples with nothing left to train are dropped).
    An unreadable path gives a report with readable=False; content problems are issues."""
    spath = os.fspath(path)
    bad = (max_seq_len, batch_size, tokens_per_second)
    if not os.path.exists(spath):
        return _unreadable(spath, f"{spath}: no such file", *bad)
    if os.path.isdir(spath):
        return _unreadable(spath, f"{spath}: is a folder, not a file", *bad)
    try:
        sniff = sniff_file(spath)
    except OSError as e:
        return _unreadable(spath, f"{spath}: cannot be read ({e.strerror or e})", *bad)

    with _gc_paused():
        return _validate(spath, sniff, tokenizer, max_seq_len, batch_size, tokens_per_second)


@contextlib.contextmanager
def _gc_paused():
    """Reading creates millions of small objects and no cycles; the cyclic collector would scan
    them again and again. Paused for the duration (reference counting still frees memory)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _validate(spath, sniff, tokenizer, max_seq_len, batch_size, tokens_per_second) -> ValidationReport:
    col = IssueCollector()
    stats: dict = {"format": None, "encoding": sniff.label, "bytes": sniff.size}

    def report(fmt, convs=(), examples=(), lengths=None, totals=None) -> ValidationReport:
        _stats(list(convs), list(examples), lengths, max_seq_len, batch_size, tokens_per_second, col, stats, totals)
        return _make_report(spath, fmt, col, stats, list(convs), list(examples))

    if sniff.fatal is not None:
        col.add(sniff.fatal)
        return report(None)
    try:
        det = detect_format(spath, sniff)
        stats["format"] = det.format
        if det.issue is not None:
            col.add(det.issue)
            return report(det.format)
        if tokenizer is not None and not getattr(tokenizer, "chat_template", True):
            col.warn(None, None, "the model's tokenizer has no chat template, so tokens are not counted", "no_template")
            tokenizer = None
        encoder = lengths = None
        if tokenizer is not None:
            lengths = []
            encoder = StreamEncoder(tokenizer, max_seq_len, on_issue=lambda i: _add_issue(col, i), lengths_out=lengths)
        try:
            convs = _read(spath, sniff, det, col, stats, encoder.add if encoder else None)
            examples = encoder.finish() if encoder else []
            totals = (encoder.trained_tokens, encoder.kept_tokens) if encoder else None
        finally:
            if encoder is not None:
                encoder.close()
    except OSError as e:
        col.error(None, None, f"reading stopped: {e.strerror or e}", "unreadable")
        return report(stats.get("format"))
    if not convs and col.error_count == 0:
        col.error(det.first_line, None, "no examples found", "empty_file")
    elif encoder is not None and convs and not examples and col.error_count == 0:
        # the same rule training applies: something must be left to learn from
        col.error(None, None, f"no example has any assistant tokens left to train on after cutting each example "
                              f"to {max_seq_len} tokens (the maximum length); raise the maximum length or shorten "
                              "the prompts", "nothing_to_train")
    _file_warnings(convs, col)
    return report(det.format, convs, examples, lengths, totals)


def _add_issue(col: IssueCollector, i: Issue) -> None:
    if i.severity == "error":
        col.add(i)
    else:
        col.warn(i.line, i.field, i.message, i.code, summary=_SUMMARY.get(i.code))


def read_conversations(path, **kwargs) -> list[Conversation]:
    """The conversations of a training file; raises DataError (with the report) if it has errors."""
    report = validate_file(path, **kwargs)
    if not report.ok:
        raise DataError(report)
    return report.conversations


def _make_report(path, fmt, col: IssueCollector, stats, convs, examples) -> ValidationReport:
    errors, warnings = col.finish()
    key = lambda i: (i.line is None, i.line or 0)  # noqa: E731 - file-level issues last
    errors.sort(key=key)
    warnings.sort(key=key)
    return ValidationReport(path, fmt, not errors, errors, warnings, stats, convs, examples)


# ---------------------------------------------------------------------------------------------

def _read(path, sniff, det, col: IssueCollector, stats: dict, on_conv=None) -> list[Conversation]:
    fmt = det.format
    cols = det.csv
    if fmt in ("csv", "tsv"):
        if cols is None or cols.prompt is None or cols.response is None:
            found = ", ".join(repr(h) for h in (cols.header if cols else ())) or "nothing"
            col.error(det.first_line, None,
                      f"the CSV header has no usable columns (found {found}); it needs a prompt column "
                      f"({'/'.join(PROMPT_COLUMNS[:4])}) and a response column ({'/'.join(RESPONSE_COLUMNS[:4])}), "
                      f"any letter case", "csv_columns")
            return []
        for name in cols.ignored:
            col.warn(det.first_line, None, f"column {name!r} is not used", "csv_ignored_column")
        items = iter_csv(path, sniff, cols)
    elif fmt == "json":
        items = iter_json_values(path, sniff)
    else:
        items = iter_jsonl(path, sniff)

    convs: list[Conversation] = []
    kinds = {"chat": 0, "prompt_completion": 0, "csv": 0}
    seen: dict[int, int] = {}
    shared: dict = {}   # system prompts seen, to share their Message (fast_chat)
    for item in items:
        if isinstance(item, Issue):
            col.add(item)
            continue
        rec: Record = item
        if rec.kind == "json":
            fast = fast_chat(rec.value, rec.line, SHORT_REPLY_CHARS, shared)
            if fast is not None:   # a clean chat example: the same steps as below, with nothing to report
                conv, key, short = fast
                kinds["chat"] += 1
                convs.append(conv)
                if on_conv is not None:
                    on_conv(conv)
                first = seen.setdefault(key, conv.line)
                if first != conv.line:
                    col.warn(conv.line, None, f"duplicate of the example on line {first}", "duplicate",
                             summary="duplicate examples")
                if short >= 0:
                    _short_reply(col, conv, short)
                continue
        if rec.kind == "csv":
            conv, problems = conversation_from_row(rec.value, cols, rec.line)
            kind = "csv"
        else:
            conv, problems = conversation_from_json(rec.value, rec.line)
            kind = "chat" if (isinstance(rec.value, dict) and "messages" in rec.value) else "prompt_completion"
        for p, msg, sev, code in problems:
            line = locate_line(rec, p) if rec.raw is not None else rec.line
            if sev == "error":
                col.error(line, field_name(p), msg, code)
            else:
                col.warn(line, field_name(p), msg, code, summary=_SUMMARY.get(code))
        if conv is None:
            continue
        kinds[kind] += 1
        convs.append(conv)
        if on_conv is not None:
            on_conv(conv)
        key = hash(tuple((m.role, m.content, m.weight) for m in conv.messages))
        first = seen.setdefault(key, conv.line)
        if first != conv.line:
            col.warn(conv.line, None, f"duplicate of the example on line {first}", "duplicate",
                     summary="duplicate examples")
        for i, m in enumerate(conv.messages):
            if m.role == "assistant" and m.weight and len(m.content.strip()) < SHORT_REPLY_CHARS:
                _short_reply(col, conv, i)
                break
    stats["record_kinds"] = {k: v for k, v in kinds.items() if v}
    if kinds["chat"] and kinds["prompt_completion"]:
        col.warn(None, None, f"the file mixes chat examples ({kinds['chat']}) and prompt/completion examples "
                             f"({kinds['prompt_completion']}); both are used", "mixed_formats")
    return convs


def _short_reply(col: IssueCollector, conv: Conversation, i: int) -> None:
    col.warn(conv.line, f"messages[{i}].content", f"very short assistant reply ({conv.messages[i].content.strip()!r}); "
             f"the model learns to answer this briefly", "short_reply", summary="examples with very short replies")


_SUMMARY = {"weight_ignored": "weights on non-assistant messages", "system_position": "misplaced system messages",
            "trailing_messages": "examples ending after the last assistant reply",
            "nothing_trained": "examples with every assistant message at weight 0",
            "csv_ignored_column": "unused columns",
            "dropped": "examples dropped because truncation left nothing to train",
            "template_error": "examples the chat template cannot render"}


def _file_warnings(convs: list[Conversation], col: IssueCollector) -> None:
    n = len(convs)
    if not n:
        return
    no_sys = [c for c in convs if c.messages[0].role != "system" and all(m.role != "system" for m in c.messages)]
    if len(no_sys) == n:
        col.warn(None, None, "no example has a system message; a system message that describes the persona or "
                             "task helps the model (and you can use the same one when chatting)", "no_system")
    elif no_sys:
        col.warn(None, None, f"{len(no_sys)} of {n} examples have no system message (the first on line "
                             f"{no_sys[0].line})", "no_system")
    if n < FEW_EXAMPLES:
        col.warn(None, None, f"only {n} example{'s' if n != 1 else ''}: with fewer than {FEW_EXAMPLES} the model "
                             f"learns little (aim for 50 or more)", "few_examples")


def _stats(convs, examples, lengths, max_seq_len, batch_size, tokens_per_second, col: IssueCollector, stats: dict,
           totals=None):
    """totals: (trained tokens, tokens after truncation) of the examples, when the encoder counted them."""
    n = len(convs)
    stats["examples"] = n
    n_msgs = n_asst = n_trained = chars = trained_chars = 0
    for c in convs:
        n_msgs += len(c.messages)
        for m in c.messages:
            chars += len(m.content)
            if m.role == "assistant":
                n_asst += 1
                if m.weight:
                    n_trained += 1
                    trained_chars += len(m.content)
    stats["messages"] = n_msgs
    stats["assistant_messages"] = n_asst
    stats["trained_messages"] = n_trained
    stats["characters"] = chars
    stats["trained_characters"] = trained_chars
    stats["max_seq_len"] = max_seq_len
    stats["batch_size"] = batch_size
    stats["tokens_per_second"] = tokens_per_second
    stats["tokenizer"] = lengths is not None
    if lengths is not None:
        stats["length_unit"] = "tokens"
        all_lens = np.array(lengths, dtype=np.int64)
        lens = all_lens[all_lens >= 0]
        kept_lines = {ex.line for ex in examples}
        for c, L in zip(convs, lengths):
            if L > max_seq_len and c.line in kept_lines:
                col.warn(c.line, None, f"{L} tokens, longer than max_seq_len {max_seq_len}: the last {L - max_seq_len} "
                                       f"tokens will be cut", "too_long", summary="examples longer than max_seq_len")
        stats["total_tokens"] = int(lens.sum())
        if totals is None:
            totals = (sum(ex.num_trained_tokens for ex in examples), sum(len(ex) for ex in examples))
        stats["trained_tokens"] = int(totals[0])
        stats["tokens_after_truncation"] = int(totals[1])
        stats["truncated_examples"] = int((lens > max_seq_len).sum())
        stats["tokens_cut"] = int(np.maximum(lens - max_seq_len, 0).sum())
        stats["dropped_examples"] = n - len(examples)
        used = [len(ex) for ex in examples]
        trainable = len(examples)
    else:
        stats["length_unit"] = "characters"
        lens = np.array([sum(len(m.content) for m in template_messages(c)) for c in convs], dtype=np.int64)
        stats["total_tokens"] = None
        stats["trained_tokens"] = None
        used = None
        trainable = n
    _length_stats(lens, stats)
    stats["steps_per_epoch"] = int(math.ceil(trainable / batch_size)) if batch_size > 0 else None
    if used:
        pad = padded_tokens(used, batch_size)
        stats["padded_tokens_per_epoch"] = pad
        stats["seconds_per_epoch"] = (pad / tokens_per_second) if tokens_per_second else None
    else:
        stats["padded_tokens_per_epoch"] = None
        stats["seconds_per_epoch"] = None


def _length_stats(lens: np.ndarray, stats: dict) -> None:
    if lens.size == 0:
        for k in ("length_p50", "length_p90", "length_p95", "length_max", "length_mean"):
            stats[k] = None
        stats["histogram"] = {"counts": [], "edges": []}
        return
    p50, p90, p95 = np.percentile(lens, [50, 90, 95])
    stats["length_p50"] = round(float(p50), 1)
    stats["length_p90"] = round(float(p90), 1)
    stats["length_p95"] = round(float(p95), 1)
    stats["length_max"] = int(lens.max())
    stats["length_mean"] = round(float(lens.mean()), 2)
    lo, hi = int(lens.min()), int(lens.max())
    bins = HIST_BINS if hi > lo else 1
    counts, edges = np.histogram(lens, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    stats["histogram"] = {"counts": [int(c) for c in counts], "edges": [round(float(e), 1) for e in edges]}
