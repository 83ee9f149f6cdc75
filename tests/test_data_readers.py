"""Readers: every accepted format, encodings, line endings, blank lines, binary and oversized
input. Each test writes a small file to tmp_path and validates it."""
import json

import pytest

from finetune_desktop.data import Message, validate_file
from finetune_desktop.data import textio


def chat(user="Hi there", reply="Hello, friend!", system=None, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs, **extra}


def write(tmp_path, name, data, encoding="utf-8"):
    p = tmp_path / name
    if isinstance(data, str):
        data = data.encode(encoding)
    p.write_bytes(data)
    return p


def jsonl(objs, nl="\n"):
    return nl.join(json.dumps(o, ensure_ascii=False) for o in objs) + nl


def assert_ok(report, n):
    assert report.ok, [str(e) for e in report.errors]
    assert report.stats["examples"] == n
    assert len(report.conversations) == n


# ------------------------------------------------------------------ formats

def test_jsonl_chat_multi_turn_with_name_and_weight(tmp_path):
    obj = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello there!", "weight": 0},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Very well, thanks.", "weight": 1},
    ]}
    r = validate_file(write(tmp_path, "a.jsonl", jsonl([obj, chat()])))
    assert_ok(r, 2)
    assert r.format == "jsonl"
    c = r.conversations[0]
    assert c.line == 1 and r.conversations[1].line == 2
    assert c.messages[1] == Message("user", "Hi", 1, "ann")
    assert c.messages[2].weight == 0 and c.messages[4].weight == 1
    assert r.stats["messages"] == 7


def test_jsonl_prompt_completion(tmp_path):
    objs = [{"prompt": "What is 2+2?", "completion": "Four."},
            {"prompt": "Capital of France?", "completion": "Paris.", "system": "Answer briefly."}]
    r = validate_file(write(tmp_path, "pc.jsonl", jsonl(objs)))
    assert_ok(r, 2)
    assert [m.role for m in r.conversations[0].messages] == ["user", "assistant"]
    assert [m.role for m in r.conversations[1].messages] == ["system", "user", "assistant"]
    assert r.stats["record_kinds"] == {"prompt_completion": 2}


def test_json_array_one_line_and_pretty(tmp_path):
    objs = [chat(user=f"q{i}", reply=f"answer {i}") for i in range(3)]
    r = validate_file(write(tmp_path, "a.json", json.dumps(objs)))
    assert_ok(r, 3)
    assert r.format == "json"
    pretty = json.dumps(objs, indent=2)
    r = validate_file(write(tmp_path, "b.json", pretty))
    assert_ok(r, 3)
    lines = pretty.splitlines()
    starts = [i + 1 for i, ln in enumerate(lines) if ln == "  {"]
    assert [c.line for c in r.conversations] == starts


def test_json_detected_by_content_not_extension(tmp_path):
    objs = [chat(user=f"q{i}") for i in range(2)]
    r = validate_file(write(tmp_path, "data.txt", json.dumps(objs, indent=1)))
    assert_ok(r, 2)
    assert r.format == "json"
    r = validate_file(write(tmp_path, "data.json", jsonl(objs)))  # JSON Lines named .json
    assert_ok(r, 2)
    assert r.format == "jsonl"
    r = validate_file(write(tmp_path, "data.jsonl", "question,answer\nhi,hello\n"))  # CSV named .jsonl
    assert_ok(r, 1)
    assert r.format == "csv"


def test_pretty_printed_objects_one_after_another(tmp_path):
    text = json.dumps(chat(), indent=2) + "\n" + json.dumps(chat(user="other"), indent=2) + "\n"
    r = validate_file(write(tmp_path, "p.jsonl", text))
    assert_ok(r, 2)
    assert r.conversations[1].line == len(json.dumps(chat(), indent=2).splitlines()) + 1


@pytest.mark.parametrize("header", ["prompt,response", "instruction,output", "question,answer", "user,assistant",
                                    "PROMPT,Response", "Question , ANSWER"])
def test_csv_column_pairs_any_case(tmp_path, header):
    text = f"{header}\nWhat is up?,\"Not much, you?\"\nHi,Hello\n"
    r = validate_file(write(tmp_path, "d.csv", text))
    assert_ok(r, 2)
    assert r.format == "csv"
    c = r.conversations[0]
    assert c.line == 2 and r.conversations[1].line == 3
    assert c.messages[0] == Message("user", "What is up?")
    assert c.messages[1] == Message("assistant", "Not much, you?")


def test_csv_system_column_multiline_field_and_line_numbers(tmp_path):
    text = ('system,question,answer\n'
            'Be kind.,"line one\nline two",Sure\n'
            '\n'
            ',Second?,Yes\n')
    r = validate_file(write(tmp_path, "d.csv", text))
    assert_ok(r, 2)
    a, b = r.conversations
    assert a.line == 2 and b.line == 5
    assert a.messages[0] == Message("system", "Be kind.")
    assert a.messages[1].content == "line one\nline two"
    assert [m.role for m in b.messages] == ["user", "assistant"]  # empty system cell: no system message


def test_tsv_and_semicolon_and_alpaca_input(tmp_path):
    r = validate_file(write(tmp_path, "d.tsv", "Prompt\tResponse\nhi, there\thello\n"))
    assert_ok(r, 1)
    assert r.format == "tsv"
    assert r.conversations[0].messages[0].content == "hi, there"
    r = validate_file(write(tmp_path, "d.csv", "question;answer\nhi;hello\n"))
    assert_ok(r, 1)
    r = validate_file(write(tmp_path, "alp.csv", "instruction,input,output\nTranslate,bonjour,hello\nSay hi,,hi there\n"))
    assert_ok(r, 2)
    assert r.conversations[0].messages[0].content == "Translate\n\nbonjour"
    assert r.conversations[1].messages[0].content == "Say hi"


def test_csv_extra_column_is_a_warning(tmp_path):
    r = validate_file(write(tmp_path, "d.csv", "id,question,answer\n1,hi,hello\n"))
    assert_ok(r, 1)
    assert any("'id'" in w.message and w.line == 1 for w in r.warnings)


# ------------------------------------------------------------------ encodings and line endings

def test_utf8_bom_crlf_and_blank_lines(tmp_path):
    body = jsonl([chat(user="안녕하세요"), chat(user="second")], nl="\r\n")
    body = "\r\n\r\n" + body.replace("\r\n", "\r\n\r\n   \r\n", 1)
    r = validate_file(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + body.encode("utf-8")))
    assert_ok(r, 2)
    assert r.stats["encoding"] == "UTF-8 with BOM"
    assert [c.line for c in r.conversations] == [3, 6]
    assert r.conversations[0].messages[0].content == "안녕하세요"
    assert not r.conversations[1].messages[1].content.endswith("\r")


def test_csv_with_bom_and_crlf(tmp_path):
    text = "\ufeffQuestion,Answer\r\nHi,\"Hello,\r\nfriend\"\r\nBye,Later\r\n"
    r = validate_file(write(tmp_path, "excel.csv", text))
    assert_ok(r, 2)
    assert r.conversations[0].messages[1].content == "Hello,\nfriend"
    assert r.conversations[1].line == 4


@pytest.mark.parametrize("enc", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom(tmp_path, enc):
    text = jsonl([chat(user="Grüß dich, 세계"), chat()], nl="\r\n")
    data = text.encode(enc)
    if enc == "utf-16-be":
        data = b"\xfe\xff" + data
    r = validate_file(write(tmp_path, "wide.jsonl", data))
    assert_ok(r, 2)
    assert r.conversations[0].messages[0].content == "Grüß dich, 세계"
    assert r.conversations[1].line == 2


def test_lone_cr_line_endings(tmp_path):
    r = validate_file(write(tmp_path, "mac.jsonl", jsonl([chat(), chat(user="x")], nl="\r")))
    assert_ok(r, 2)
    assert [c.line for c in r.conversations] == [1, 2]


def test_utf16_without_bom_is_rejected_with_hint(tmp_path):
    r = validate_file(write(tmp_path, "w.jsonl", jsonl([chat()]).encode("utf-16-le")))
    assert not r.ok
    assert "UTF-16" in r.errors[0].message and r.errors[0].line == 1


def test_invalid_utf8_names_line_and_offset_and_other_lines_still_checked(tmp_path):
    good = json.dumps(chat()).encode()
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    data = good + b"\n" + bad + b"\n" + good + b"\n"
    r = validate_file(write(tmp_path, "latin1.jsonl", data))
    assert not r.ok
    assert len(r.errors) == 1
    e = r.errors[0]
    assert e.line == 2
    offset = len(good) + 1 + bad.index(b"\xe9")
    assert f"byte offset {offset}" in e.message
    assert "0xe9" in e.message
    assert r.stats["examples"] == 2


def test_binary_files_rejected(tmp_path):
    r = validate_file(write(tmp_path, "x.jsonl", b"PK\x03\x04\x14\x00\x00\x00binarystuff"))
    assert not r.ok and "ZIP" in r.errors[0].message
    r = validate_file(write(tmp_path, "y.jsonl", b'{"a": 1}\n\x01\x02\x00\xff\xfe\x00garbage'))
    assert not r.ok
    assert r.errors[0].line == 2 and "offset 11" in r.errors[0].message


def test_nul_byte_after_the_sniffed_head(tmp_path):
    good = (json.dumps(chat()) + "\n").encode()
    data = good * 2000 + b'{"messages": "\x00"}\n' + good
    r = validate_file(write(tmp_path, "late.jsonl", data))
    assert [e.line for e in r.errors] == [2001]
    assert "NUL" in r.errors[0].message


def test_empty_and_whitespace_only_files(tmp_path):
    for name, data in (("e.jsonl", b""), ("w.jsonl", b"  \n\n\t\r\n"), ("b.jsonl", b"\xef\xbb\xbf\n")):
        r = validate_file(write(tmp_path, name, data))
        assert not r.ok, name
        assert r.errors[0].code == "empty_file" and r.errors[0].line == 1
        assert "empty" in str(r.errors[0])


def test_header_only_csv_has_no_examples(tmp_path):
    r = validate_file(write(tmp_path, "h.csv", "question,answer\n"))
    assert not r.ok and "no examples" in r.errors[0].message


# ------------------------------------------------------------------ size limits (streaming)

def test_line_over_the_limit_is_an_error_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 1000)
    big = json.dumps(chat(reply="x" * 5000))
    r = validate_file(write(tmp_path, "big.jsonl", jsonl([chat()]) + big + "\n" + jsonl([chat(user="after")])))
    assert [e.line for e in r.errors] == [2]
    assert "too long" in r.errors[0].message
    assert [c.line for c in r.conversations] == [1, 3]


def test_real_11mb_line_is_rejected_cleanly(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps(chat()) + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "a" * (11 * 1024 * 1024) + '"}]}\n')
        f.write(json.dumps(chat()) + "\n")
    r = validate_file(p)
    assert [e.line for e in r.errors] == [2] and r.errors[0].code == "line_too_long"
    assert r.stats["examples"] == 2


def test_json_array_element_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 2000)
    objs = [chat(), {"messages": [{"role": "user", "content": "y" * 100}] * 50}, chat()]
    text = json.dumps(objs, indent=2)
    r = validate_file(write(tmp_path, "big.json", text))
    assert not r.ok
    assert r.errors[0].code == "line_too_long"
    assert r.errors[0].line == len(json.dumps(objs[0], indent=2).splitlines()) + 2  # where the big element starts


def test_excel_unicode_text_utf16_tsv(tmp_path):
    """Excel's "Unicode Text" export: UTF-16 LE with a BOM, tab separated, CRLF."""
    text = "Question\tAnswer\r\n안녕?\t\"Hi, there\"\r\nBye\tSee you\r\n"
    r = validate_file(write(tmp_path, "export.txt", b"\xff\xfe" + text.encode("utf-16-le")))
    assert_ok(r, 2)
    assert r.format == "tsv" and r.stats["encoding"] == "UTF-16"
    assert r.conversations[0].messages[0].content == "안녕?"
    assert r.conversations[1].line == 3


def test_detection_of_broken_or_foreign_files(tmp_path):
    good = json.dumps(chat())
    # JSON Lines whose first line is broken: still JSON Lines, every line checked
    r = validate_file(write(tmp_path, "a.txt", '{"messages": [\n' + good + "\n" + good + "\n"))
    assert r.format == "jsonl" and [e.line for e in r.errors] == [1] and r.stats["examples"] == 2
    # a file that merely starts with '[' (an INI/TOML file): one clear error, not one per line
    r = validate_file(write(tmp_path, "setup.cfg", "[metadata]\nname = x\nversion = 1\n"))
    assert [e.code for e in r.errors] == ["unknown_format"] and r.errors[0].line == 1
    # a JSON object wrapping the examples
    r = validate_file(write(tmp_path, "w.json", json.dumps({"data": [chat()]}, indent=2)))
    assert r.errors[0].line == 1 and "top-level JSON array" in r.errors[0].message
