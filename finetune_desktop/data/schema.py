"""The example schema: one parsed record (a JSON object or a CSV row) -> a Conversation, plus the
problems found in it, each with the path of the offending field.

Rules (the formats listed in docs/ARCHITECTURE.md):
  chat               {"messages": [{"role", "content", "weight"?: 0|1, "name"?: str}, ...]}
  prompt/completion  {"prompt": str, "completion": str, "system"?: str}
  CSV row            prompt column + response column (+ optional system column)

A conversation needs at least one assistant message. It may end with a user or system message:
that is allowed (a warning), and the messages after the last assistant reply are left out when
encoding, because in a causal model nothing after the last trained token can change the loss.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Optional

from .readers import CsvColumns
from .types import ROLES, Conversation, Message

MESSAGE_KEYS = ("role", "content", "weight", "name")
PC_KEYS = ("prompt", "completion", "system")

# A problem: (path inside the record, message, severity, code)
Problem = tuple[tuple, str, str, str]

_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
               "ai": "assistant", "chatbot": "assistant", "developer": "system", "instruction": "user",
               "question": "user", "answer": "assistant", "response": "assistant", "prompt": "user"}


def field_name(path: tuple) -> Optional[str]:
    """("messages", 1, "role") -> "messages[1].role"."""
    if not path:
        return None
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _did_you_mean(word: str, choices) -> str:
    m = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _quote(s: str, n: int = 40) -> str:
    s = repr(s)
    return s if len(s) <= n else s[: n - 4] + "...'"


def _weight(v: Any) -> Optional[int]:
    """0 or 1 from a JSON value, or None if it is not a valid weight."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, float) and math.isfinite(v) and v in (0.0, 1.0):
        return int(v)
    return None


_ROLE_SET = frozenset(ROLES)
_MESSAGE_KEY_SET = frozenset(MESSAGE_KEYS)


SHARED_SYSTEM_MESSAGES = 256   # distinct system prompts whose Message one reading keeps to share


def fast_chat(value: Any, line: int, short_chars: int = 0, shared: Optional[dict] = None):
    """The common case of a clean chat example, checked quickly: -> (conversation, its duplicate
    key hash(((role, content, weight), ...)), the index of the first trained assistant reply with
    fewer than short_chars non-space characters or -1), or None for "look closer" (the full check
    below finds and words every problem). Accepts exactly what the full check accepts without any
    error or warning. `shared` (a dict kept over one file) lets examples that open with the same
    system prompt share one Message: less memory, and its text is hashed once."""
    if type(value) is not dict or len(value) != 1:
        return None
    msgs = value.get("messages")
    if type(msgs) is not list or not msgs:
        return None
    out = []
    key = []
    short = -1
    trained = False
    for i, m in enumerate(msgs):
        if type(m) is not dict:
            return None
        role = m.get("role")
        content = m.get("content")
        if type(role) is not str or role not in _ROLE_SET or type(content) is not str or not content \
                or content.isspace():
            return None
        weight, name = 1, None
        if len(m) != 2:
            if not _MESSAGE_KEY_SET.issuperset(m):
                return None
            if "weight" in m:
                weight = m["weight"]
                if type(weight) is not int or weight not in (0, 1) or role != "assistant":
                    return None
            if "name" in m:
                name = m["name"]
                if type(name) is not str:
                    return None
        if role == "system":
            if i:
                return None
            msg = shared.get(content) if (shared is not None and name is None) else None
            if msg is None:
                msg = Message(role, content, weight, name)
                if shared is not None and name is None:
                    if len(shared) >= SHARED_SYSTEM_MESSAGES:
                        shared.clear()
                    shared[content] = msg
            content = msg.content
        else:
            msg = Message(role, content, weight, name)
            if weight and role == "assistant":
                trained = True
                if short < 0 and short_chars and len(content.strip()) < short_chars:
                    short = i
        out.append(msg)
        key.append((role, content, weight))
    if not trained or out[-1].role != "assistant":
        return None
    return Conversation(tuple(out), line), hash(tuple(key)), short


def _fast_chat(value: Any, line: int) -> Optional[Conversation]:
    """fast_chat's conversation, or None."""
    r = fast_chat(value, line)
    return r[0] if r is not None else None


def conversation_from_json(value: Any, line: int) -> tuple[Optional[Conversation], list[Problem]]:
    conv = _fast_chat(value, line)
    if conv is not None:
        return conv, []
    return check_json_example(value, line)


def check_json_example(value: Any, line: int) -> tuple[Optional[Conversation], list[Problem]]:
    """The full check of one JSON example, naming every problem."""
    problems: list[Problem] = []
    err = lambda path, msg, code: problems.append((path, msg, "error", code))  # noqa: E731
    warn = lambda path, msg, code: problems.append((path, msg, "warning", code))  # noqa: E731

    if not isinstance(value, dict):
        hint = ""
        if isinstance(value, list):
            hint = ' (each line must be one object such as {"messages": [...]}, not a list)'
        err((), f"not an object: found {_describe(value)}{hint}", "not_object")
        return None, problems

    if "messages" not in value:
        if "prompt" in value or "completion" in value:
            return _prompt_completion(value, line, problems)
        keys = ", ".join(repr(k) for k in list(value)[:6]) or "none"
        hint = ""
        if "conversations" in value:
            hint = " (this looks like the ShareGPT format; rename 'conversations' to 'messages', 'from' to 'role' and 'value' to 'content')"
        elif len(value) == 1 and isinstance(next(iter(value.values())), list):
            hint = (f" (if {next(iter(value))!r} holds the examples, save them as a top-level JSON array or as "
                    f"JSON Lines)")
        err((), f"no \"messages\" list: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}; "
                f"found keys {keys}{hint}", "no_messages")
        return None, problems

    for k in value:
        if k != "messages":
            err((k,), f"unknown key {_quote(str(k))} (an example has only \"messages\")", "unknown_key")

    msgs = value["messages"]
    if not isinstance(msgs, list):
        err(("messages",), f"must be a list of messages, found {_describe(msgs)}", "messages_not_list")
        return None, problems
    if not msgs:
        err(("messages",), "the list is empty: an example needs at least a user and an assistant message", "no_messages")
        return None, problems

    out: list[Message] = []
    role_trouble = False
    for i, m in enumerate(msgs):
        base = ("messages", i)
        if not isinstance(m, dict):
            err(base, f"not an object: found {_describe(m)} (a message is {{\"role\": ..., \"content\": ...}})",
                "message_not_object")
            role_trouble = True
            continue
        ok = True
        for k in m:
            if k not in MESSAGE_KEYS:
                err(base + (k,), f"unknown key {_quote(str(k))} (a message has role, content and optionally "
                                 f"weight and name){_did_you_mean(str(k), MESSAGE_KEYS)}", "unknown_key")
                ok = False
        role = m.get("role")
        if "role" not in m:
            err(base, "missing \"role\"", "missing_role")
            ok = False
            role_trouble = True
        elif not isinstance(role, str):
            err(base + ("role",), f"must be a string, found {_describe(role)}", "bad_role")
            ok = False
            role_trouble = True
        elif role not in ROLES:
            hint = ""
            if role.strip().lower() in ROLES:
                hint = f" (roles are lower case: '{role.strip().lower()}')"
            elif role.strip().lower() in _ROLE_HINTS:
                hint = f" (did you mean '{_ROLE_HINTS[role.strip().lower()]}'?)"
            elif role == "tool" or role == "function":
                hint = " (tool calls are not supported)"
            err(base + ("role",), f"unknown role {_quote(role)} (expected system, user or assistant){hint}", "unknown_role")
            ok = False
            role_trouble = True
        content = m.get("content")
        if "content" not in m:
            err(base, "missing \"content\"", "missing_content")
            ok = False
        elif not isinstance(content, str):
            hint = ""
            if isinstance(content, list):
                hint = " (content parts such as [{\"type\": \"text\", ...}] are not supported; use plain text)"
            err(base + ("content",), f"must be a string, found {_describe(content)}{hint}", "content_not_string")
            ok = False
        elif not content.strip():
            err(base + ("content",), "is empty" if not content else "is only whitespace", "empty_content")
            ok = False
        weight = 1
        if "weight" in m:
            w = _weight(m["weight"])
            if w is None:
                err(base + ("weight",), f"must be 0 or 1, found {_describe(m['weight'])}", "bad_weight")
                ok = False
            else:
                weight = w
                if isinstance(role, str) and role in ("system", "user"):
                    warn(base + ("weight",), f"has no effect on a {role} message (only assistant messages are "
                                             f"trained)", "weight_ignored")
        name = m.get("name")
        if "name" in m and not isinstance(name, str):
            err(base + ("name",), f"must be a string, found {_describe(name)}", "bad_name")
            ok = False
        if ok:
            out.append(Message(role, content, weight, name))

    if any(p[2] == "error" for p in problems):
        if not role_trouble and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            err(("messages",), "no assistant message: there is nothing to train on", "no_assistant")
        return None, problems
    return _check_structure(out, line, problems)


def _check_structure(msgs: list[Message], line: int, problems: list[Problem]):
    roles = [m.role for m in msgs]
    if "assistant" not in roles:
        problems.append((("messages",), "no assistant message: there is nothing to train on", "error", "no_assistant"))
        return None, problems
    if not any(m.role == "assistant" and m.weight for m in msgs):
        problems.append((("messages",), "every assistant message has weight 0: nothing in this example is "
                                        "trained, so it is skipped", "warning", "nothing_trained"))
    for i, r in enumerate(roles):
        if r == "system" and i > 0:
            problems.append((("messages", i), "a system message that is not the first message (most chat "
                                              "templates expect it first)", "warning", "system_position"))
            break
    last_a = max(i for i, r in enumerate(roles) if r == "assistant")
    if last_a < len(roles) - 1:
        problems.append((("messages", len(roles) - 1), f"the conversation ends with a {roles[-1]} message: messages "
                                                       f"after the last assistant reply are left out when training",
                         "warning", "trailing_messages"))
    return Conversation(tuple(msgs), line), problems


def _prompt_completion(value: dict, line: int, problems: list[Problem]):
    for k in value:
        if k not in PC_KEYS:
            problems.append(((k,), f"unknown key {_quote(str(k))} (a prompt/completion example has prompt, "
                                   f"completion and optionally system){_did_you_mean(str(k), PC_KEYS)}",
                             "error", "unknown_key"))
    texts = {}
    for k in ("prompt", "completion", "system"):
        if k not in value:
            if k != "system":
                problems.append(((), f"missing \"{k}\"", "error", "missing_content"))
            continue
        v = value[k]
        if not isinstance(v, str):
            problems.append(((k,), f"must be a string, found {_describe(v)}", "error", "content_not_string"))
        elif not v.strip():
            problems.append(((k,), "is empty" if not v else "is only whitespace", "error", "empty_content"))
        else:
            texts[k] = v
    if any(p[2] == "error" for p in problems):
        return None, problems
    msgs = []
    if "system" in texts:
        msgs.append(Message("system", texts["system"]))
    msgs += [Message("user", texts["prompt"]), Message("assistant", texts["completion"])]
    return Conversation(tuple(msgs), line), problems


def conversation_from_row(row: list[str], cols: CsvColumns, line: int) -> tuple[Optional[Conversation], list[Problem]]:
    problems: list[Problem] = []
    n = len(cols.header)
    if len(row) != n:
        problems.append(((), f"the row has {len(row)} field{'s' if len(row) != 1 else ''} but the header has {n} "
                             f"(a comma inside a text must be in double quotes)", "error", "csv_fields"))
        if len(row) < n:
            return None, problems

    def cell(i):
        return row[i] if i is not None and i < len(row) else ""

    prompt, response, system = cell(cols.prompt), cell(cols.response), cell(cols.system)
    if cols.extra_input is not None and cell(cols.extra_input).strip():
        prompt = f"{prompt}\n\n{cell(cols.extra_input)}" if prompt.strip() else cell(cols.extra_input)
    for idx, text in ((cols.prompt, prompt), (cols.response, response)):
        if not text.strip():
            problems.append(((cols.header[idx].strip(),), "is empty", "error", "empty_content"))
    if any(p[2] == "error" for p in problems):
        return None, problems
    msgs = []
    if system.strip():
        msgs.append(Message("system", system))
    msgs += [Message("user", prompt), Message("assistant", response)]
    return Conversation(tuple(msgs), line), problems
