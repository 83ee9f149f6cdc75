"""Validation report: each error kind names the right line (and field), warnings, statistics,
the JSON form, and read_conversations / DataError."""
import json

import pytest

from finetune_desktop.data import DataError, Issue, read_conversations, validate_file
from finetune_desktop.data import textio


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


GOOD = {"messages": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello, friend! Nice to see you."}]}


def good(i=0):
    g = json.loads(json.dumps(GOOD))
    g["messages"][1]["content"] = f"Question number {i}?"
    return json.dumps(g)


def msgs(*ms):
    return json.dumps({"messages": list(ms)})


U = {"role": "user", "content": "Hello"}
A = {"role": "assistant", "content": "Hi, how can I help?"}

# (bad line, expected code, expected field, text that must appear in the message)
BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}', "not_json", None, "not valid JSON"),
    ("not json at all", "not_json", None, "not valid JSON"),
    ('[{"role": "user", "content": "hi"}]', "not_object", None, "not an object"),
    ('"just a string"', "not_object", None, "not an object"),
    ('{"conversation": []}', "no_messages", None, "no \"messages\""),
    ('{"messages": "hello"}', "messages_not_list", "messages", "must be a list"),
    ('{"messages": []}', "no_messages", "messages", "empty"),
    (msgs(U, "oops"), "message_not_object", "messages[1]", "not an object"),
    (msgs({"content": "hi"}, A), "missing_role", "messages[0]", "missing \"role\""),
    (msgs({"role": "user"}, A), "missing_content", "messages[0]", "missing \"content\""),
    (msgs({"role": "robot", "content": "beep"}, A), "unknown_role", "messages[0].role", "unknown role 'robot'"),
    (msgs({"role": "User", "content": "x"}, A), "unknown_role", "messages[0].role", "lower case"),
    (msgs({"role": 3, "content": "x"}, A), "bad_role", "messages[0].role", "must be a string"),
    (msgs(U, {"role": "assistant", "content": 42}), "content_not_string", "messages[1].content", "must be a string"),
    (msgs(U, {"role": "assistant", "content": None}), "content_not_string", "messages[1].content", "null"),
    (msgs(U, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}), "content_not_string",
     "messages[1].content", "plain text"),
    (msgs(U, {"role": "assistant", "content": ""}), "empty_content", "messages[1].content", "empty"),
    (msgs(U, {"role": "assistant", "content": "  \n "}), "empty_content", "messages[1].content", "whitespace"),
    (msgs(U, {"role": "user", "content": "again"}), "no_assistant", "messages", "no assistant message"),
    (msgs({"role": "system", "content": "s"}), "no_assistant", "messages", "no assistant message"),
    (msgs(U, {**A, "weight": 2}), "bad_weight", "messages[1].weight", "0 or 1"),
    (msgs(U, {**A, "weight": True}), "bad_weight", "messages[1].weight", "0 or 1"),
    (msgs(U, {**A, "weight": "1"}), "bad_weight", "messages[1].weight", "0 or 1"),
    (msgs(U, {**A, "weight": 0.5}), "bad_weight", "messages[1].weight", "0 or 1"),
    (msgs({**U, "contnet": "x"}, A), "unknown_key", "messages[0].contnet", "did you mean 'content'"),
    (json.dumps({**GOOD, "id": 7}), "unknown_key", "id", "unknown key 'id'"),
    (msgs(U, {**A, "name": 5}), "bad_name", "messages[1].name", "must be a string"),
    ('{"prompt": "hi"}', "missing_content", None, "missing \"completion\""),
    ('{"prompt": "hi", "completion": 3}', "content_not_string", "completion", "must be a string"),
    ('{"prompt": "", "completion": "x"}', "empty_content", "prompt", "empty"),
    ('{"prompt": "a", "completion": "b", "extra": 1}', "unknown_key", "extra", "unknown key"),
    ('{"messages": [{"role": "user", "content": "hi"}], "a": 1e999999}', None, None, ""),  # inf: still JSON
]


@pytest.mark.parametrize("bad,code,field,text", BAD_LINES)
def test_each_error_names_its_line(tmp_path, bad, code, field, text):
    lines = [good(i) for i in range(12)]
    lines[6] = bad  # line 7
    r = validate_file(write(tmp_path, "d.jsonl", "\n".join(lines) + "\n"))
    assert not r.ok
    assert r.stats["examples"] == 11
    errs = [e for e in r.errors if e.line == 7]
    assert errs and all(e.line == 7 for e in r.errors), [str(e) for e in r.errors]
    if code is not None:
        e = next((e for e in errs if e.code == code), None)
        assert e is not None, [str(x) for x in errs]
        assert e.field == field
        assert text in e.message, e.message
        assert str(e).startswith("line 7: ")


def test_issue_string_format():
    i = Issue(7, "messages[1].role", "unknown role 'robot' (expected system, user or assistant)", "error")
    assert str(i) == "line 7: messages[1].role: unknown role 'robot' (expected system, user or assistant)"
    assert str(Issue(None, None, "only 3 examples", "warning")) == "only 3 examples"


def test_sample_like_mistakes_file(tmp_path):
    """Many kinds of mistakes in one file, each reported on its own line; blank lines are fine."""
    lines = [good(0), '{"messages": [', "[1, 2]", "", msgs({"role": "robot", "content": "x"}, A), good(1)]
    r = validate_file(write(tmp_path, "m.jsonl", "\n".join(lines) + "\n"))
    assert [e.line for e in r.errors] == [2, 3, 5]
    assert [c.line for c in r.conversations] == [1, 6]


def test_error_line_inside_pretty_json_array(tmp_path):
    objs = [GOOD, {"messages": [U, {"role": "robot", "content": "x"}, A]}, {"messages": [U, {"role": "assistant"}]}]
    text = json.dumps(objs, indent=2)
    r = validate_file(write(tmp_path, "a.json", text))
    lines = text.splitlines()
    robot = next(i for i, ln in enumerate(lines) if '"robot"' in ln) + 1
    assert [e.code for e in r.errors] == ["unknown_role", "missing_content"]
    assert r.errors[0].line == robot
    missing = max(i for i, ln in enumerate(lines) if '"role": "assistant"' in ln)  # its "{" is the line before
    assert r.errors[1].line == missing


def test_syntax_error_in_json_array_names_its_line(tmp_path):
    text = "[\n" + good(0) + ",\n" + good(1) + "\n" + good(2) + "\n]\n"  # missing comma after line 3
    r = validate_file(write(tmp_path, "a.json", text))
    assert not r.ok
    assert r.errors[0].line == 4 and "expected ','" in r.errors[0].message
    assert r.stats["examples"] == 2
    r = validate_file(write(tmp_path, "b.json", "[\n" + good(0) + ",\n]\n"))
    assert r.errors[0].line == 3 and "trailing comma" in r.errors[0].message
    r = validate_file(write(tmp_path, "c.json", "[\n" + good(0) + ",\n" + good(1) + "\n"))
    assert "not closed" in r.errors[0].message
    r = validate_file(write(tmp_path, "d.json", "[\n" + good(0) + ",\n{\"messages\": [}\n]"))
    assert r.errors[0].line == 3 and "not valid JSON" in r.errors[0].message


def test_json_array_element_larger_than_buffer_and_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 100_000)
    big = {"messages": [U, {"role": "assistant", "content": "z" * 300_000}]}
    text = "[\n" + good(0) + ",\n" + json.dumps(big) + "\n]\n"
    r = validate_file(write(tmp_path, "a.json", text))
    assert r.errors[0].line == 3 and r.errors[0].code == "line_too_long"


def test_csv_errors(tmp_path):
    r = validate_file(write(tmp_path, "a.csv", "foo,bar\n1,2\n"))
    assert not r.ok and r.errors[0].code == "csv_columns" and r.errors[0].line == 1
    assert "'foo'" in r.errors[0].message
    r = validate_file(write(tmp_path, "b.csv", "question,answer\nhi,hello\n,empty prompt\nthree,fields,here\nok,\n"))
    assert [(e.line, e.code) for e in r.errors] == [(3, "empty_content"), (4, "csv_fields"), (5, "empty_content")]
    assert r.errors[0].field == "question"
    assert r.errors[2].field == "answer"


def test_unrecognised_text_file(tmp_path):
    r = validate_file(write(tmp_path, "notes.txt", "\n\nJust some notes\nmore notes\n"))
    assert not r.ok and r.errors[0].line == 3 and r.errors[0].code == "unknown_format"


def test_unreadable_paths(tmp_path):
    r = validate_file(tmp_path / "missing.jsonl")
    assert not r.readable and not r.ok and "no such file" in r.errors[0].message
    r = validate_file(tmp_path)
    assert not r.readable and "folder" in r.errors[0].message
    with pytest.raises(DataError):
        read_conversations(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------ warnings

def test_warnings(tmp_path):
    lines = [good(i) for i in range(4)]
    lines.append(good(1))                                                 # 5: duplicate of line 2
    lines.append(msgs(U, {"role": "assistant", "content": "ok"}))         # 6: very short reply, no system
    lines.append(msgs(U, A, {"role": "user", "content": "and?"}))          # 7: ends with user
    lines.append(msgs(U, {**A, "weight": 0}))                              # 8: nothing trained
    lines.append(msgs({**U, "weight": 1}, A))                              # 9: weight on a user message
    r = validate_file(write(tmp_path, "w.jsonl", "\n".join(lines) + "\n"))
    assert r.ok, [str(e) for e in r.errors]
    by = {w.code: w for w in r.warnings}
    assert by["duplicate"].line == 5 and "line 2" in by["duplicate"].message
    assert by["short_reply"].line == 6
    assert by["trailing_messages"].line == 7
    assert by["nothing_trained"].line == 8
    assert by["weight_ignored"].line == 9
    assert by["few_examples"].line is None and "only 9 examples" in by["few_examples"].message
    assert "4 of 9 examples have no system message" in by["no_system"].message
    assert "line 6" in by["no_system"].message
    r = validate_file(write(tmp_path, "ten.jsonl", "\n".join(good(i) for i in range(10)) + "\n"))
    assert r.ok and not r.warnings


def test_many_warnings_of_a_kind_are_summarised(tmp_path):
    lines = [msgs(U, {"role": "assistant", "content": "k"}) for _ in range(60)]
    r = validate_file(write(tmp_path, "w.jsonl", "\n".join(lines) + "\n"))
    shorts = [w for w in r.warnings if w.code == "short_reply"]
    assert len(shorts) == 21 and "40 more" in shorts[-1].message
    dups = [w for w in r.warnings if w.code == "duplicate"]
    assert "39 more duplicate examples" in dups[-1].message


def test_error_count_is_bounded(tmp_path):
    r = validate_file(write(tmp_path, "bad.jsonl", "x\n" * 1500))
    assert len(r.errors) == 1001 and "500 more errors" in r.errors[-1].message


# ------------------------------------------------------------------ stats and report

def test_stats_without_tokenizer_and_json_roundtrip(tmp_path):
    p = write(tmp_path, "d.jsonl", "\n".join(good(i) for i in range(12)) + "\n")
    r = validate_file(p, batch_size=5)
    s = r.stats
    assert s["examples"] == 12 and s["messages"] == 36
    assert s["total_tokens"] is None and s["length_unit"] == "characters"
    assert s["steps_per_epoch"] == 3
    assert sum(s["histogram"]["counts"]) == 12
    assert len(s["histogram"]["edges"]) == len(s["histogram"]["counts"]) + 1
    assert s["length_p50"] <= s["length_p90"] <= s["length_p95"] <= s["length_max"]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ok"] is True and d["format"] == "jsonl" and "conversations" not in d
    assert d["stats"]["examples"] == 12


def test_read_conversations_and_data_error(tmp_path):
    p = write(tmp_path, "ok.jsonl", "\n".join(good(i) for i in range(3)) + "\n")
    assert len(read_conversations(p)) == 3
    p = write(tmp_path, "bad.jsonl", good(0) + "\nnope\n" + msgs({"role": "x", "content": "y"}, A) + "\n")
    with pytest.raises(DataError) as ei:
        read_conversations(p)
    msg = str(ei.value)
    assert "line 2" in msg and "line 3" in msg
    assert ei.value.report is not None and len(ei.value.issues) == 2


def test_file_is_not_modified(tmp_path):
    p = write(tmp_path, "d.jsonl", "\ufeff" + good(0) + "\r\n\r\nbad\r\n")
    before = p.read_bytes()
    mtime = p.stat().st_mtime_ns
    validate_file(p)
    assert p.read_bytes() == before and p.stat().st_mtime_ns == mtime
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]
