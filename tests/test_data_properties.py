"""Property-based tests: random bytes, random JSON and random CSV thrown at the readers. Nothing
may raise anything but DataError, and every problem must be an issue with a line number."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_desktop.data import DataError, read_conversations, validate_file

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)

roles = st.sampled_from(["system", "user", "assistant", "robot", "", "User"])
message = st.fixed_dictionaries({}, optional={
    "role": roles | json_values, "content": st.text(max_size=30) | json_values,
    "weight": st.sampled_from([0, 1, 2, True, None, 0.0, "1"]), "name": st.text(max_size=5) | st.integers(),
    "extra": st.integers()})
example = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=10) | json_values,
                                        "completion": st.text(max_size=10) | json_values,
                                        "system": st.text(max_size=5)}),
    json_values)


def check(path):
    try:
        convs = read_conversations(path)
    except DataError as e:
        r = e.report
        assert r is not None and not r.ok and r.errors
        for i in r.errors:
            assert i.severity == "error" and str(i)
            if i.code not in ("more_errors", "unreadable"):
                assert isinstance(i.line, int) and i.line >= 1, i
        json.dumps(r.to_dict())
        return None
    for c in convs:
        assert any(m.role == "assistant" for m in c.messages)
        assert all(isinstance(m.content, str) and m.content.strip() for m in c.messages)
    return convs


@SETTINGS
@given(data=st.binary(max_size=600), name=st.sampled_from(["d.jsonl", "d.json", "d.csv", "d.tsv", "d.txt"]))
def test_random_bytes(tmp_path, data, name):
    p = tmp_path / name
    p.write_bytes(data)
    check(p)


@SETTINGS
@given(rows=st.lists(example, max_size=6), blank=st.booleans(), crlf=st.booleans(), bom=st.booleans())
def test_random_json_lines(tmp_path, rows, blank, crlf, bom):
    nl = "\r\n" if crlf else "\n"
    text = nl.join(json.dumps(r) for r in rows) + (nl * 2 if blank else "")
    p = tmp_path / "d.jsonl"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))
    convs = check(p)
    if convs is not None:  # a valid file: the reader saw exactly the valid rows
        assert len(convs) == len(rows)


@SETTINGS
@given(rows=st.lists(example, max_size=5), indent=st.sampled_from([None, 1, 2]), cut=st.integers(0, 40))
def test_random_json_arrays_and_truncated_documents(tmp_path, rows, indent, cut):
    text = json.dumps(rows, indent=indent)
    p = tmp_path / "d.json"
    p.write_bytes(text[:len(text) - cut].encode("utf-8", "surrogatepass"))
    check(p)


@SETTINGS
@given(cells=st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=8),
                               min_size=0, max_size=4), max_size=6),
       header=st.sampled_from(["question,answer", "Prompt,Response,System", "foo,bar", "instruction,input,output", ""]))
def test_random_csv(tmp_path, cells, header):
    import csv
    import io
    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf).writerows(cells)
    p = tmp_path / "d.csv"
    p.write_text(buf.getvalue(), encoding="utf-8")
    check(p)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_utf16_body(tmp_path, data):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xff\xfe" + data)
    r = validate_file(p)
    assert r.ok or r.errors


@settings(max_examples=200, deadline=None)
@given(value=example)
def test_fast_schema_path_agrees_with_full_check(value):
    from finetune_desktop.data.schema import _fast_chat, check_json_example
    fast = _fast_chat(value, 3)
    full, problems = check_json_example(value, 3)
    if fast is not None:
        assert problems == [] and full == fast
    floats = isinstance(value, dict) and any(isinstance(m.get("weight"), float) for m in value.get("messages", ()))
    if full is not None and not problems and "messages" in value and not floats:
        assert fast == full  # a clean chat example takes the fast path
