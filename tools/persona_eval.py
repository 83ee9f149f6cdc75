"""Does a fine-tuned model speak in its persona's style on questions that are NOT in its training file?

    python tools/persona_eval.py MODEL_OR_RUN --persona pirate|gyeongsang [--base-model DIR] [--json OUT]

MODEL_OR_RUN is a model folder, a run folder (its model/ is used) or the word `base`.

Every question of the persona's language in tools/eval_questions.json (written for this project;
none appears in sample_data/) is asked through the engine directly: the model's chat template
(Tokenizer.apply_chat_template) with the SAME system message as the persona's training file, then
greedy decoding (temperature 0) of at most --max-new-tokens (128) tokens, stopping at the
tokenizer's end-of-turn ids. The repetition penalty defaults to 1.1, the default of
`finetune-desktop chat`, so the numbers predict what a user (or an independent check) sees with
`finetune-desktop chat MODEL --prompt ... --temperature 0`; pass --repetition-penalty 1.0 for
plain greedy decoding. The same questions are also asked WITHOUT a system message (that is how
`finetune-desktop chat` asks when --system is not given), unless the model's chat template adds the
training system message by itself (a run's model/ does), in which case the prompts are identical.

The style rule (transparent on purpose: a reply is "in persona style" when at least one marker
of the persona's list below matches; the markers that matched are stored with every reply):

  pirate      case-insensitive, whole words: arr/arrr, ahoy, matey/mateys, yo ho, fair winds,
              hearties / me hearty, aye, shipmate, avast, landlubber, shiver me timbers, ye, yer,
              and sea-faring figures of speech: set sail, drop/weigh anchor, all hands on deck,
              seven seas, walk the plank, sea legs, shipshape, batten down the hatches,
              me/my/our ship|crew|deck|sails.
              Plain sea words (sea, ocean, waves, ship, deck, sail, anchor, treasure, captain,
              compass, tide, harbour, pirate, parrot, island, ...) are NOT counted, because
              everyday English uses them (about 1% of the project's standard dialogs have one);
              the share of replies with one is reported as plain_word_fraction.
  gyeongsang  Gyeongsang (경상도) forms that standard Korean does not use: sentence endings
              -데이, -래이/-재이, 아이가, -노? / -노!, the quoting verb 카- (카이, 카데, 카더라,
              카모, 카면, 카노, 칸다, 캐서), 억수로, 마이 (많이, as a word), 단디, 쫌, 쪼매, 우짜/우째/우야,
              그라모/그라고/그라이/그래가, 먹다 as 묵-/뭇- (묵고, 묵어, 뭇나, 무모, 무라), 하모,
              -으모, 기라, 함 (한번, as a word), 온나, 아지매/할매, 내사, -습니더/-심더/-능교,
              -주께/-하께, 퍼뜩.
              Not counted, because standard Korean uses them too: -나?, 예/-예, 아이고, 니, 좀.

Calibration (tests/test_outcome_tools.py keeps it true): the rule marks every assistant reply of
sample_data/pirate_captain*.jsonl and sample_data/gyeongsang_ajumma*.jsonl (181 and 185 replies)
as in style, and none of the assistant replies of the project's standard everyday dialogs in
tools/corpus/ (6,815 English, 801 Korean; the test allows 2%), which are the base model's style.

Also reported: ended_fraction (replies that ended with the end-of-turn token within the token
limit), distinct_2 (distinct word bigrams / all word bigrams over the replies), mean reply length
(words and tokens), and a few example replies. With --base-model the base model answers the same
questions (its in-style fraction is the "before" number), and held-out bits per byte of the base
and of the tuned model on tools/corpus/heldout_dialogs_en.jsonl are computed with
tools/eval_base.py's code (the target is a rise of at most 0.5). Both models score the same text,
rendered with the base tokenizer's template; a run's model/ template also adds the persona's system
message to dialogs without one, and the number over that text is reported as
tuned_bpb_own_template.

The result is printed as a readable table; --json OUT also writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

QUESTIONS_FILE = HERE / "eval_questions.json"
HELDOUT_FILE = HERE / "corpus" / "heldout_dialogs_en.jsonl"
MAX_BPB_RISE = 0.5          # held-out bits per byte may rise by at most this much after a persona fine-tune
STYLE_TARGET = 0.9          # at least 90% of replies in the persona's style


# ----------------------------------------------------------------------------- the style rule
_W = r"(?<![A-Za-z'])"      # English word start
_E = r"(?![A-Za-z])"        # English word end
PIRATE_MARKERS: tuple[tuple[str, str], ...] = (
    ("arr", _W + r"ar{2,}(?:gh)?" + _E),
    ("ahoy", _W + r"ahoy" + _E),
    ("matey", _W + r"mateys?" + _E),
    ("yo ho", _W + r"yo[- ]ho" + _E),
    ("fair winds", _W + r"fair winds?" + _E),
    ("hearties", _W + r"(?:me )?heart(?:ies|y)" + _E),
    ("aye", _W + r"aye" + _E),
    ("shipmate", _W + r"shipmates?" + _E),
    ("avast", _W + r"avast" + _E),
    ("landlubber", _W + r"landlubbers?" + _E),
    ("shiver me timbers", _W + r"shiver me timbers" + _E),
    ("ye/yer", _W + r"(?:ye|yer)" + _E),
    # sea-faring figures of speech (not plain sea words, which everyday English uses too)
    ("set sail", _W + r"set(?:s|ting)? sail" + _E),
    ("drop anchor", _W + r"(?:drop(?:s|ped)?|weigh) anchor" + _E),
    ("all hands on deck", _W + r"all hands on deck" + _E),
    ("seven seas", _W + r"seven seas" + _E),
    ("walk the plank", _W + r"walk(?:s|ed)? the plank" + _E),
    ("sea legs", _W + r"sea legs" + _E),
    ("shipshape", _W + r"ship-?shape" + _E),
    ("batten down the hatches", _W + r"batten down the hatches" + _E),
    ("me ship / me crew", _W + r"(?:me|my|our) (?:ship|crew|deck|sails)" + _E),
)

# Plain sea words: reported (sea_word_fraction) but NOT counted as the persona's style, because
# ordinary English uses them (about 1% of the project's everyday dialogs contain one).
PIRATE_SEA_WORDS = _W + (r"(?:sails?|sailing|anchors?|decks?|ships?|seas?|ocean|waves|treasures?|crew|voyages?|"
                         r"captain|starboard|portholes?|galley|compass|tides?|harbou?rs?|buccaneers?|pirates?|"
                         r"parrots?|plank|islands?|gulls?)") + _E

_H = r"(?<![가-힣])"                   # Hangul word start
_K = r"(?=[\s.,!?~…\"'’”)\]]|$)"       # end of a word (sentence ending)
GYEONGSANG_MARKERS: tuple[tuple[str, str], ...] = (
    ("-데이", r"(?<=[가-힣])데이" + _K),
    ("-래이/-재이", r"(?<=[가-힣])[래재]이" + _K),
    ("아이가", r"아이가(?=\s*[.,!?~…]|\s*$)"),
    ("-노?/-노!", r"(?<=[가-힣])(?<!피아)노(?=\s*[?!])"),
    ("카- (quoting)", r"(?<![스])(?:카(?:이|데|더라|모|면|노|나|고)|칸다|캐서|캐라|캐래이)" + _K),
    ("억수로", r"억수로"),
    ("마이 (많이)", _H + r"마이(?![가-힣])"),
    ("단디", r"단디"),
    ("쫌/쪼매", r"쫌|쪼매"),
    ("우짜/우째/우야", _H + r"(?:우짜|우째|우야)"),
    ("그라-/그래가", _H + r"(?:그라(?:모|고|이|믄|가)|그래가)(?![가-힣])"),
    ("묵-/뭇- (먹다)", _H + r"(?:묵고|묵어|묵으|묵는|묵자|뭇나|뭇제|뭇다|무모|무라)"),
    ("하모", _H + r"하모" + _K),
    ("-으모", r"(?<=[가-힣])으모" + _K),
    ("기라", _H + r"기라" + _K),
    ("함 (한번)", _H + r"함(?=\s)"),
    ("온나", _H + r"온나" + _K),
    ("아지매/할매", r"아지매|할매"),
    ("내사", _H + r"내사(?![가-힣])"),
    ("-습니더/-심더/-능교", r"(?:습니더|심더|습니꺼|능교)"),
    ("-주께/-하께", r"(?<=[가-힣])(?:주께|하께)" + _K),
    ("퍼뜩", r"퍼뜩"),
)


@dataclass(frozen=True)
class Persona:
    name: str
    lang: str            # key in eval_questions.json
    train_file: Path     # its training file (the system message comes from here)
    markers: tuple[tuple[str, str], ...]
    flags: int = 0
    plain_words: str | None = None   # reported as plain_word_fraction, not counted as style


PERSONAS = {
    "pirate": Persona("pirate", "en", ROOT / "sample_data" / "pirate_captain.jsonl", PIRATE_MARKERS, re.IGNORECASE,
                      PIRATE_SEA_WORDS),
    "gyeongsang": Persona("gyeongsang", "ko", ROOT / "sample_data" / "gyeongsang_ajumma.jsonl", GYEONGSANG_MARKERS),
}

_COMPILED: dict[str, list[tuple[str, re.Pattern]]] = {}


def _compiled(persona: str) -> list[tuple[str, re.Pattern]]:
    if persona not in _COMPILED:
        p = PERSONAS[persona]
        _COMPILED[persona] = [(label, re.compile(rx, p.flags)) for label, rx in p.markers]
    return _COMPILED[persona]


def style_markers(text: str, persona: str) -> list[str]:
    """The labels of the persona's markers found in text (empty: not in style)."""
    return [label for label, rx in _compiled(persona) if rx.search(text)]


def in_style(text: str, persona: str) -> bool:
    return bool(style_markers(text, persona))


# ----------------------------------------------------------------------------- small helpers
class EvalError(Exception):
    """A problem with the inputs, in words."""


def load_questions(lang: str, path: Path = QUESTIONS_FILE) -> list[str]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot be read ({e})") from None
    qs = d.get(lang) if isinstance(d, dict) else None
    if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
        raise EvalError(f"{path}: field {lang!r} must be a non-empty list of questions")
    return qs


def system_message(train_file: Path) -> str | None:
    """The first system message of an OpenAI-style chat JSONL file (None if it has none)."""
    try:
        with open(train_file, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except ValueError:
                    raise EvalError(f"{train_file}:{n}: not JSON") from None
                msgs = d.get("messages") if isinstance(d, dict) else None
                for m in msgs if isinstance(msgs, list) else []:
                    if isinstance(m, dict) and m.get("role") == "system" and isinstance(m.get("content"), str):
                        return m["content"]
                return None
    except OSError as e:
        raise EvalError(f"{train_file}: cannot be read ({e})") from None
    return None


def distinct_2(texts) -> float:
    """Distinct word bigrams / all word bigrams (the same measure as tools/eval_base.py)."""
    grams, total = set(), 0
    for t in texts:
        w = t.split()
        for a, b in zip(w, w[1:]):
            grams.add((a, b))
            total += 1
    return len(grams) / total if total else 0.0


def load_model(spec: str):
    """(Model, Tokenizer, folder) for a model folder, a run folder or 'base'."""
    from finetune_desktop.training.chat import ChatError, load_chat_model

    try:
        cm = load_chat_model(spec)
    except ChatError as e:
        raise EvalError(str(e)) from None
    return cm.model, cm.tokenizer, cm.folder


# ----------------------------------------------------------------------------- asking
def ask(model, tok, question: str, system: str | None, max_new_tokens: int = 128,
        repetition_penalty: float = 1.1) -> dict:
    """One greedy reply: {"question", "reply", "tokens", "ended"}."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    gen = list(model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0,
                              repetition_penalty=repetition_penalty, stop_ids=tok.end_of_turn_ids))
    # generate() stops early only at a stop id (which it does not yield)
    return {"question": question, "reply": tok.decode(gen, skip_special_tokens=True).strip(),
            "tokens": len(gen), "ended": len(gen) < max_new_tokens}


def score_replies(items: list[dict], persona: str) -> dict:
    """Add "markers" to every item and return the summary numbers."""
    for it in items:
        it["markers"] = style_markers(it["reply"], persona)
    n = len(items)
    replies = [it["reply"] for it in items]
    p = PERSONAS[persona]
    plain = re.compile(p.plain_words, p.flags) if p.plain_words else None
    return {
        "questions": n,
        "in_style_fraction": round(sum(bool(it["markers"]) for it in items) / n, 4) if n else 0.0,
        "ended_fraction": round(sum(it["ended"] for it in items) / n, 4) if n else 0.0,
        "distinct_2": round(distinct_2(replies), 4),
        "mean_reply_words": round(sum(len(r.split()) for r in replies) / n, 2) if n else 0.0,
        "mean_reply_chars": round(sum(len(r) for r in replies) / n, 1) if n else 0.0,
        "mean_reply_tokens": round(sum(it["tokens"] for it in items) / n, 2) if n else 0.0,
        "plain_word_fraction": (round(sum(bool(plain.search(r)) for r in replies) / n, 4) if n else 0.0)
        if plain else None,
    }


def ask_all(model, tok, questions, system, persona, max_new_tokens, repetition_penalty) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    items = [ask(model, tok, q, system, max_new_tokens, repetition_penalty) for q in questions]
    dt = time.perf_counter() - t0
    summary = score_replies(items, persona)
    summary["seconds"] = round(dt, 1)
    return summary, items


def heldout_bpb(model, tok, path: Path = HELDOUT_FILE) -> dict:
    """Held-out metrics exactly as tools/eval_base.py computes them (same reader, same function,
    same maximum length)."""
    import eval_base

    convs = eval_base.tt.read_dialogs(path)
    if not convs:
        raise EvalError(f"{path}: no dialogs")
    r = eval_base.pb.evaluate(model, tok, convs, max_len=min(1024, model.config.max_position_embeddings))
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}


def evaluate(model_spec: str, persona: str, base_model: str | None = None, questions_file: Path = QUESTIONS_FILE,
             system: str | None = None, max_new_tokens: int = 128, repetition_penalty: float = 1.1,
             heldout: Path | None = HELDOUT_FILE, n_examples: int = 6, without_system: bool = True) -> dict:
    """Everything the command line prints, as one dict (see the module docstring)."""
    if persona not in PERSONAS:
        raise EvalError(f"unknown persona {persona!r} (choose {', '.join(PERSONAS)})")
    p = PERSONAS[persona]
    questions = load_questions(p.lang, questions_file)
    if system is None:
        system = system_message(p.train_file)
    model, tok, folder = load_model(model_spec)
    out: dict = {"persona": persona, "model": str(folder), "language": p.lang, "system": system,
                 "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
                 "temperature": 0.0, "questions_file": str(questions_file), "target_in_style": STYLE_TARGET}
    tuned, tuned_items = ask_all(model, tok, questions, system, persona, max_new_tokens, repetition_penalty)
    out["tuned"] = tuned
    nosys_items = None
    if without_system and system:
        # a run's model/ template adds the training system prompt when a chat has none, so
        # `finetune-desktop chat` without --system may already send the same prompt
        probe = [{"role": "user", "content": questions[0]}]
        same = (tok.apply_chat_template(probe, add_generation_prompt=True)
                == tok.apply_chat_template([{"role": "system", "content": system}] + probe, add_generation_prompt=True))
        out["no_system_prompt_is_the_same"] = same
        if same:
            nosys_items = tuned_items
            out["tuned_no_system"] = dict(tuned)
        else:
            nosys, nosys_items = ask_all(model, tok, questions, None, persona, max_new_tokens, repetition_penalty)
            out["tuned_no_system"] = nosys
    base_items = None
    if base_model is not None:
        bmodel, btok, bfolder = load_model(base_model)
        out["base_model"] = str(bfolder)
        base, base_items = ask_all(bmodel, btok, questions, system, persona, max_new_tokens, repetition_penalty)
        out["base"] = base
        if heldout is not None:
            hb = heldout_bpb(bmodel, btok, heldout)
            # The same text for both models: the base tokenizer's template. (A run's model/ template adds
            # the persona's system message to every dialog that has none, which changes the text.)
            probe = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]
            same_tokens = (tok.vocab_size == btok.vocab_size and tok.encode("Hello, 안녕하세요! 123")
                           == btok.encode("Hello, 안녕하세요! 123"))
            ht = heldout_bpb(model, btok if same_tokens else tok, heldout)
            out["heldout"] = {"file": str(heldout), "base_bpb": hb["heldout_bpb"], "tuned_bpb": ht["heldout_bpb"],
                              "delta_bpb": round(ht["heldout_bpb"] - hb["heldout_bpb"], 5),
                              "max_rise": MAX_BPB_RISE,
                              "base_loss_assistant": hb["heldout_loss_assistant"],
                              "tuned_loss_assistant": ht["heldout_loss_assistant"],
                              "conversations": ht["heldout_conversations"],
                              "same_text": same_tokens}
            if same_tokens and tok.apply_chat_template(probe) != btok.apply_chat_template(probe):
                # what a tool that renders with the tuned folder's own template would measure
                ho = heldout_bpb(model, tok, heldout)
                out["heldout"]["tuned_bpb_own_template"] = ho["heldout_bpb"]
        del bmodel
    replies = []
    for i, it in enumerate(tuned_items):
        r = {"question": it["question"], "reply": it["reply"], "markers": it["markers"], "ended": it["ended"],
             "tokens": it["tokens"]}
        if nosys_items is not None:
            r["reply_no_system"] = nosys_items[i]["reply"]
            r["markers_no_system"] = nosys_items[i]["markers"]
        if base_items is not None:
            r["base_reply"] = base_items[i]["reply"]
            r["base_markers"] = base_items[i]["markers"]
        replies.append(r)
    out["replies"] = replies
    out["examples"] = pick_examples(replies, n_examples)
    return out


def pick_examples(replies: list[dict], n: int) -> list[int]:
    """Indices of n replies to show: spread evenly over the question list (no cherry-picking)."""
    if n <= 0 or not replies:
        return []
    n = min(n, len(replies))
    return sorted({round(i * (len(replies) - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]


# ----------------------------------------------------------------------------- printing
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def format_report(r: dict) -> str:
    cols = [("tuned", "tuned (system msg)"), ("tuned_no_system", "tuned (no system)"), ("base", "base (system msg)")]
    same = bool(r.get("no_system_prompt_is_the_same"))
    cols = [(k, title) for k, title in cols if k in r and not (k == "tuned_no_system" and same)]
    rows = [("in persona style", "in_style_fraction", _pct), ("ended with end-of-turn", "ended_fraction", _pct),
            ("distinct-2", "distinct_2", lambda v: f"{v:.3f}"),
            ("mean reply words", "mean_reply_words", lambda v: f"{v:.1f}"),
            ("mean reply tokens", "mean_reply_tokens", lambda v: f"{v:.1f}"),
            ("seconds to answer all", "seconds", lambda v: f"{v:.1f}")]
    w0 = max(len(x[0]) for x in rows) + 2
    wc = [max(len(t), 8) + 2 for _, t in cols]
    lines = [f"persona: {r['persona']}   model: {r['model']}",
             f"{r['tuned']['questions']} questions not in the training file ({r['language']}), greedy, "
             f"max {r['max_new_tokens']} new tokens, repetition penalty {r['repetition_penalty']}",
             f"system message: {r['system']!r}"
             + ("  (the model's chat template adds it by itself when a chat has none)" if same else ""), "",
             "".ljust(w0) + "".join(t.rjust(w) for (_, t), w in zip(cols, wc))]
    for title, key, fmt in rows:
        lines.append(title.ljust(w0) + "".join(fmt(r[k][key]).rjust(w) for (k, _), w in zip(cols, wc)))
    h = r.get("heldout")
    if h:
        verdict = "ok" if h["delta_bpb"] <= h["max_rise"] else "TOO HIGH"
        lines += ["", f"held-out bits per byte ({Path(h['file']).name}, {h['conversations']} dialogs): "
                      f"base {h['base_bpb']:.4f} -> tuned {h['tuned_bpb']:.4f}  "
                      f"(rise {h['delta_bpb']:+.4f}, allowed {h['max_rise']}: {verdict})"]
        if h.get("tuned_bpb_own_template") is not None:
            lines.append(f"  (tuned, with its own template, which adds the persona's system message to every dialog: "
                         f"{h['tuned_bpb_own_template']:.4f})")
    t = r["tuned"]["in_style_fraction"]
    ok = "met" if t >= r["target_in_style"] else "NOT met"
    if same:
        lines.append(f"in-style target {_pct(r['target_in_style'])}: {ok} (with or without a system message: same prompt)")
    else:
        lines.append(f"in-style target {_pct(r['target_in_style'])}: {ok} with the system message"
                     + (f", {'met' if r['tuned_no_system']['in_style_fraction'] >= r['target_in_style'] else 'NOT met'}"
                        f" without" if "tuned_no_system" in r else ""))
    lines += ["", "examples (evenly spaced over the question list):"]
    for i in r["examples"]:
        e = r["replies"][i]
        lines.append(f"  Q: {e['question']}")
        if "base_reply" in e:
            lines.append(f"     base : {_short(e['base_reply'])}")
        lines.append(f"     tuned: {_short(e['reply'])}   [{', '.join(e['markers']) or 'no marker'}]")
        if "reply_no_system" in e and e["reply_no_system"] != e["reply"]:
            lines.append(f"     tuned, no system: {_short(e['reply_no_system'])}")
    return "\n".join(lines)


def _short(s: str, n: int = 200) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ----------------------------------------------------------------------------- the outcome summary
def parse_time_v(path: Path) -> dict:
    """Wall time (s), max RSS (MB) and exit status from a `/usr/bin/time -v -o FILE` report."""
    out: dict = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.strip().rpartition(": ")
        if key.startswith("Elapsed (wall clock) time"):
            parts = [float(x) for x in val.strip().split(":")]
            secs = 0.0
            for x in parts:
                secs = secs * 60 + x
            out["wall_s"] = round(secs, 2)
        elif key == "Maximum resident set size (kbytes)":
            out["max_rss_mb"] = round(int(val) / 1024, 1)
        elif key == "Exit status":
            out["exit_status"] = int(val)
        elif key == "User time (seconds)":
            out["user_s"] = float(val)
        elif key == "System time (seconds)":
            out["sys_s"] = float(val)
    return out


def _md(s: str) -> str:
    """One line of reply text, safe inside markdown (no table breaks, no HTML)."""
    s = " ".join(str(s).split())
    return s.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") or "(empty reply)"


def _num(v, fmt="{:.3f}", none="-"):
    return none if v is None else fmt.format(v)


def _mark(ok) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def summary_markdown(base: dict, runs: list[dict], base_path: str, n_examples: int = 3, when: str = "") -> str:
    """The compact markdown the lead pastes into README and the model card.

    base: tools/eval_base.py's JSON. runs: one dict per persona with keys
    name, run_json (run.json dict), time (parse_time_v of the timed run), eval (this module's JSON),
    and optionally time_plain (parse_time_v of the same command without --validation-file)."""
    L = [f"# Outcomes{' (' + when + ')' if when else ''}", "",
         f"Base model: `{base_path}`" + (f", {base.get('num_parameters'):,} parameters" if base.get("num_parameters") else "")
         + (f", {base['size_mb']:.1f} MB on disk" if base.get("size_mb") else "") + ".", "",
         "| Base model | value | target |", "| --- | --- | --- |"]
    bpb = base.get("heldout_bpb")
    L.append(f"| held-out bits per byte ({base.get('heldout_conversations', '?')} everyday English dialogs, chat format) "
             f"| {_num(bpb, '{:.3f}')}{_mark(None if bpb is None else bpb <= 2.0)} | ≤ 2.0 |")
    ef = base.get("ended_fraction")
    L.append(f"| replies that end with `<\\|im_end\\|>` within 128 tokens ({base.get('questions', '?')} everyday questions) "
             f"| {_num(ef, '{:.0%}')}{_mark(None if ef is None else ef >= 0.95)} | ≥ 95% |")
    d2 = base.get("distinct_2")
    L.append(f"| distinct-2 of those replies | {_num(d2, '{:.2f}')}{_mark(None if d2 is None else d2 >= 0.5)} | ≥ 0.5 |")
    tps = base.get("generate_tokens_per_s")
    L.append(f"| generation speed (greedy replies to the 40 questions, prefill included, tokens/s; the streaming rate is bench/chat_speed.py's) | {_num(tps, '{:.0f}')}"
             f"{_mark(None if tps is None else tps >= 300)} | ≥ 300 |")
    L.append("")

    names = [f"`{Path(((r['run_json'].get('data') or {}).get('path') or r['name'])).name}`" for r in runs]
    L += ["| Default fine-tune (`finetune-desktop train FILE --validation-file ..._valid.jsonl`) | "
          + " | ".join(names) + " | target |",
          "| --- | " + " | ".join("---" for _ in runs) + " | --- |"]

    def row(title, cells, target=""):
        L.append(f"| {title} | " + " | ".join(cells) + f" | {target} |")

    def g(r, *path):
        x = r
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
        return x

    row("examples (train + validation)", [f"{g(r, 'run_json', 'data', 'num_train')} + {g(r, 'run_json', 'data', 'num_valid')}"
                                          for r in runs])
    row("epochs × steps per epoch, batch size, learning rate",
        [f"{g(r, 'run_json', 'hyper', 'epochs')} × {g(r, 'run_json', 'hyper', 'steps_per_epoch')}, "
         f"{g(r, 'run_json', 'hyper', 'batch_size')}, {_num(g(r, 'run_json', 'hyper', 'learning_rate'), '{:.2g}')}"
         for r in runs])
    row("method",
        [f"{g(r, 'run_json', 'settings', 'method')}"
         + (f" (rank {g(r, 'run_json', 'settings', 'lora_rank')})" if g(r, 'run_json', 'settings', 'method') == "lora" else "")
         for r in runs])
    row("wall time of the whole command", [f"{_num(g(r, 'time', 'wall_s'), '{:.1f}')} s"
                                           f"{_mark(None if g(r, 'time', 'wall_s') is None else g(r, 'time', 'wall_s') <= 60)}"
                                           for r in runs], "≤ 60 s")
    row("… of which the training loop (incl. validation)", [f"{_num(g(r, 'run_json', 'final', 'elapsed_s'), '{:.1f}')} s"
                                                          for r in runs])
    if any(g(r, "time_plain", "wall_s") is not None for r in runs):
        row("wall time without --validation-file (the plain default command)", [
            f"{_num(g(r, 'time_plain', 'wall_s'), '{:.1f}')} s"
            f"{_mark(None if g(r, 'time_plain', 'wall_s') is None else g(r, 'time_plain', 'wall_s') <= 60)}"
            for r in runs], "≤ 60 s")

    def peak(r):
        v = [x for x in (g(r, "time", "max_rss_mb"), g(r, "time_plain", "max_rss_mb")) if x is not None]
        return max(v) if v else None

    row("peak memory (max RSS)", [f"{_num(peak(r), '{:.0f}')} MB{_mark(None if peak(r) is None else peak(r) < 1024)}"
                                  for r in runs], "< 1 GB")
    row("final training / validation loss", [f"{_num(g(r, 'run_json', 'final', 'train_loss'))} / "
                                             f"{_num(g(r, 'run_json', 'final', 'valid_loss'))}" for r in runs])
    nq = [g(r, "eval", "tuned", "questions") for r in runs]
    row("replies in the persona's style, tuned model", [
        f"{_num(g(r, 'eval', 'tuned', 'in_style_fraction'), '{:.0%}')} of {q}"
        f"{_mark(None if g(r, 'eval', 'tuned', 'in_style_fraction') is None else g(r, 'eval', 'tuned', 'in_style_fraction') >= STYLE_TARGET)}"
        for r, q in zip(runs, nq)], "≥ 90%")
    if any(g(r, "eval", "tuned_no_system") and not g(r, "eval", "no_system_prompt_is_the_same") for r in runs):
        row("… asked without a system message", [_num(g(r, "eval", "tuned_no_system", "in_style_fraction"), "{:.0%}")
                                                  for r in runs])
    row("… the base model, same questions and system message", [
        _num(g(r, "eval", "base", "in_style_fraction"), "{:.0%}") for r in runs])
    row("tuned replies that end with `<\\|im_end\\|>` within 128 tokens", [
        _num(g(r, "eval", "tuned", "ended_fraction"), "{:.0%}") for r in runs])
    row("distinct-2 of tuned replies (base)", [f"{_num(g(r, 'eval', 'tuned', 'distinct_2'), '{:.2f}')} "
                                               f"({_num(g(r, 'eval', 'base', 'distinct_2'), '{:.2f}')})" for r in runs])
    row("mean reply length in words, tuned (base)", [f"{_num(g(r, 'eval', 'tuned', 'mean_reply_words'), '{:.1f}')} "
                                                     f"({_num(g(r, 'eval', 'base', 'mean_reply_words'), '{:.1f}')})"
                                                     for r in runs])
    cells = []
    for r in runs:
        h = g(r, "eval", "heldout")
        cells.append("-" if not h else f"{h['base_bpb']:.3f} → {h['tuned_bpb']:.3f} ({h['delta_bpb']:+.3f})"
                     f"{_mark(h['delta_bpb'] <= h['max_rise'])}")
    row("held-out English bits per byte, base → tuned (rise)", cells, "rise ≤ 0.5")
    if any(g(r, "eval", "heldout", "tuned_bpb_own_template") is not None for r in runs):
        row("… tuned, text rendered with its own template (adds the persona's system message)",
            [_num(g(r, "eval", "heldout", "tuned_bpb_own_template")) for r in runs])
    L += ["", "Style rule (tools/persona_eval.py): a reply counts as in style when it contains at least one "
              "marker of the persona (pirate: arr, ahoy, matey, ye/yer, aye, fair winds, yo ho, set sail, ...; "
              "Gyeongsang: -데이, -래이, 아이가, -노?, 카이/카데, 억수로, 단디, 쫌, 마이, 묵고/뭇나, ...). "
              "It marks every reply of the sample files and none of the project's standard everyday dialogs. "
              "Questions: tools/eval_questions.json (none of them is in sample_data/); greedy decoding, "
              "repetition penalty 1.1 as in `finetune-desktop chat`.", ""]

    L += ["## Before and after fine-tuning", "",
          "Greedy replies (`--temperature 0`) of the base model and of the tuned model to the same questions, "
          "which are not in the training files. The examples are evenly spaced over the question list, not picked.", ""]
    for r, name in zip(runs, names):
        ev = r.get("eval") or {}
        reps = ev.get("replies") or []
        L += [f"### {name}", "", f"System message: {_md(ev.get('system') or '(none)')}", ""]
        for i in pick_examples(reps, n_examples):
            e = reps[i]
            L += [f"**Q: {_md(e['question'])}**", "",
                  f"- base: {_md(e.get('base_reply', '-'))}",
                  f"- tuned: {_md(e['reply'])}", ""]
    return "\n".join(L).rstrip() + "\n"


def summary_main(argv=None) -> int:
    """`python -c 'import persona_eval; persona_eval.summary_main()' --outcomes DIR --base PATH --run NAME=RUN_DIR ...`
    (called by tools/outcomes.sh). Reads DIR/base_eval.json, DIR/train_NAME.time (and, if there,
    DIR/train_NAME_plain.time), DIR/persona_NAME.json and RUN_DIR/run.json; writes DIR/summary.md."""
    from datetime import datetime, timezone

    ap = argparse.ArgumentParser(prog="persona_eval summary")
    ap.add_argument("--outcomes", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR")
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--content", action="append", default=[], help="a tools/content_eval.py JSON result")
    args = ap.parse_args(argv)
    d = Path(args.outcomes)

    def read_json(p: Path) -> dict:
        try:
            x = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EvalError(f"{p}: cannot be read ({e})") from None
        return x if isinstance(x, dict) else {}

    try:
        base = read_json(d / "base_eval.json")
        bp = Path(args.base)
        if bp.is_dir():
            base["size_mb"] = sum(f.stat().st_size for f in bp.iterdir() if f.is_file()) / 1e6
        runs = []
        for spec in args.run:
            name, _, rd = spec.partition("=")
            if not rd:
                raise EvalError(f"--run {spec!r}: expected NAME=RUN_DIR")
            rj = read_json(Path(rd) / "run.json")
            if base.get("num_parameters") is None:
                base["num_parameters"] = (rj.get("base_model") or {}).get("num_parameters")
            runs.append({"name": name, "run_json": rj, "time": parse_time_v(d / f"train_{name}.time"),
                         "time_plain": parse_time_v(d / f"train_{name}_plain.time"),
                         "eval": read_json(d / f"persona_{name}.json")})
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f", {os.cpu_count()} CPU cores"
    md = summary_markdown(base, runs, args.base, args.examples, when)
    if args.content:
        import content_eval

        md += "\n" + content_eval.markdown([json.loads(Path(c).read_text(encoding="utf-8")) for c in args.content])
    tmp = d / f".summary.md.{os.getpid()}.tmp"
    tmp.write_text(md, encoding="utf-8")
    os.replace(tmp, d / "summary.md")
    print(f"wrote {d / 'summary.md'}")
    return 0


def atomic_write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder, run folder, or 'base'")
    ap.add_argument("--persona", required=True, choices=sorted(PERSONAS))
    ap.add_argument("--base-model", help="also answer with this model and compare held-out bits per byte")
    ap.add_argument("--json", help="write the result as JSON here")
    ap.add_argument("--questions", default=str(QUESTIONS_FILE))
    ap.add_argument("--system", help="system message (default: the one in the persona's training file)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.1,
                    help="1.1 = the default of `finetune-desktop chat`; 1.0 = plain greedy")
    ap.add_argument("--heldout", default=str(HELDOUT_FILE), help="held-out dialogs for bits per byte ('' = skip)")
    ap.add_argument("--examples", type=int, default=6, help="example replies to print")
    ap.add_argument("--no-without-system", action="store_true", help="skip the second pass without system message")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"finetune_desktop\.engine")
    try:
        r = evaluate(args.model, args.persona, base_model=args.base_model, questions_file=Path(args.questions),
                     system=args.system, max_new_tokens=args.max_new_tokens,
                     repetition_penalty=args.repetition_penalty,
                     heldout=Path(args.heldout) if args.heldout else None, n_examples=args.examples,
                     without_system=not args.no_without_system)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    if args.json:
        atomic_write_json(Path(args.json), r)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
