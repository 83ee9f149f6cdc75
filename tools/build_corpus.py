"""Build the third-party part of the pretraining corpus from package registries.

Fetches (network: Debian archive via apt, PyPI via pip; nothing else):
  * Debian `fortunes-min` and `fortunes` (BSD-licensed fortune cookie files; only a curated,
    non-offensive subset of files is used: the `off/` set is never downloaded by these packages
    and several other files are skipped as well),
  * Debian `wordnet-base` (WordNet 3.0 licence): glosses and example sentences,
  * PyPI `chatterbot-corpus` (BSD-3): English and Korean YAML dialogs.

Everything downloaded or derived goes under tools/_build/ (git-ignored):
  tools/_build/dl/                  the downloaded .deb and .whl files
  tools/_build/x_<package>/         their extracted contents
  tools/_build/plain.txt            cleaned plain text, one document per block, blocks separated by a blank line
  tools/_build/plain.jsonl          the same documents as {"source": ..., "text": ...}
  tools/_build/chat_thirdparty.jsonl  chatterbot dialogs as {"messages": [...], "source": ..., "lang": ...}
  tools/_build/sources.json         package names, versions and licences actually used

Usage: python tools/build_corpus.py [--build-dir tools/_build] [--no-update] [--offline]
  --offline reuses already downloaded files (no network at all).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BUILD = HERE / "_build"

DEBS = {
    "fortunes-min": "BSD-3-Clause (fortune-mod, University of California)",
    "fortunes": "BSD-3-Clause (fortune-mod, University of California)",
    "wordnet-base": "WordNet 3.0 licence (Princeton University; permissive, notice required)",
}
PYPI = {"chatterbot-corpus": "BSD-3-Clause (Gunther Cox)"}

# fortune files we keep: everyday, quotable English. Skipped: computer/OS jokes, ascii art,
# zippy, politics, ethnic, men-women, drugs, law, news, startrek, perl, etc.
FORTUNE_FILES = ["fortunes", "literature", "riddles", "wisdom", "people", "food", "kids", "pets",
                 "love", "work", "education", "platitudes", "humorists", "miscellaneous",
                 "science", "art", "sports", "songs-poems", "goedel", "tao", "medicine"]
BAD_WORDS = re.compile(r"\b(sex\w*|fuck\w*|shit\w*|damn\w*|hell|bitch\w*|bastard\w*|ass(hole)?s?|"
                       r"kill\w*|nigg\w*|whore\w*|rape\w*|drunk\w*|god\w*|jesus|christ\w*|suicide|"
                       r"penis|breast\w*|naked|nude|porn\w*|crap|piss\w*|virgin\w*)\b", re.I)
CHATTERBOT_LANGS = {"english": "en", "korean": "ko"}
CHATTERBOT_SKIP = {"politics.yml", "gossip.yml", "coding.yml", "tech_support.yml", "history.yml"}


def run(cmd, cwd=None):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


# ---------------------------------------------------------------------------- fetching
def fetch(build: Path, update: bool, offline: bool) -> dict:
    dl = build / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    if not offline:
        if update:
            run(["apt-get", "update", "-qq"])
        for pkg in DEBS:
            if not glob.glob(str(dl / f"{pkg}_*.deb")):
                run(["apt-get", "download", pkg], cwd=dl)
        for pkg in PYPI:
            if not glob.glob(str(dl / f"{pkg.replace('-', '_')}-*.whl")):
                run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                     "-d", str(dl), pkg])
    used = {}
    for pkg, lic in DEBS.items():
        debs = sorted(glob.glob(str(dl / f"{pkg}_*.deb")))
        if not debs:
            raise SystemExit(f"error: {dl}: no {pkg} .deb found (run without --offline)")
        deb = debs[-1]
        ver = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
        out = build / f"x_{pkg}"
        if not out.exists():
            run(["dpkg-deb", "-x", deb, str(out)])
        used[pkg] = {"registry": "Debian 12 (bookworm) archive", "version": ver, "license": lic,
                     "file": os.path.basename(deb)}
    for pkg, lic in PYPI.items():
        whls = sorted(glob.glob(str(dl / f"{pkg.replace('-', '_')}-*.whl")))
        if not whls:
            raise SystemExit(f"error: {dl}: no {pkg} wheel found (run without --offline)")
        whl = whls[-1]
        out = build / f"x_{pkg}"
        if not out.exists():
            with zipfile.ZipFile(whl) as z:
                for n in z.namelist():
                    if n.endswith((".yml", "METADATA", "LICENSE")):
                        z.extract(n, out)
        ver = os.path.basename(whl).split("-")[1]
        used[pkg] = {"registry": "PyPI", "version": ver, "license": lic, "file": os.path.basename(whl)}
    return used


# ---------------------------------------------------------------------------- cleaning
def clean_text(s: str) -> str:
    s = s.replace("\t", " ").replace("\r", "")
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", s)
    s = re.sub(r"_\x08|\x08.", "", s)
    lines = [re.sub(r" {2,}", " ", ln).strip() for ln in s.split("\n")]
    out = "\n".join(ln for ln in lines if ln)
    return out.strip()


def fortunes_docs(build: Path) -> list[dict]:
    docs = []
    for name in FORTUNE_FILES:
        for pkg in ("fortunes-min", "fortunes"):
            p = build / f"x_{pkg}" / "usr/share/games/fortunes" / name
            if p.exists():
                break
        else:
            continue
        raw = p.read_text(encoding="latin-1", errors="replace")
        for entry in raw.split("\n%\n"):
            t = clean_text(entry)
            if not t or len(t) < 20 or len(t) > 700:
                continue
            letters = sum(c.isalpha() for c in t)
            if letters < 0.6 * len(t.replace(" ", "").replace("\n", "")):
                continue  # ascii art, tables, code
            if BAD_WORDS.search(t) or "http" in t or "@" in t:
                continue
            docs.append({"source": f"fortunes/{name}", "text": t})
    return docs


def wordnet_docs(build: Path) -> list[dict]:
    """WordNet glosses as 'word: definition.' lines and the quoted example sentences, grouped
    in blocks of 12 entries so each document has some length."""
    root = build / "x_wordnet-base/usr/share/wordnet"
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    docs = []
    for pos, pname in pos_name.items():
        block, ex_block = [], []
        with open(root / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                n = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(n)]
                words = [re.sub(r"\(.*\)$", "", w) for w in words]
                gloss = gloss.strip()
                examples = re.findall(r'"([^"]{8,})"', gloss)
                definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()
                if BAD_WORDS.search(gloss) or BAD_WORDS.search(" ".join(words)):
                    continue
                if definition:
                    head_word = words[0]
                    syn = f" (also: {', '.join(words[1:4])})" if len(words) > 1 else ""
                    block.append(f"{head_word}{syn}, {pname}: {definition}.")
                for e in examples:
                    e = e.strip()
                    if e and e[0].isalpha():
                        e = e[0].upper() + e[1:]
                    if e and e[-1] not in ".!?":
                        e += "."
                    ex_block.append(e)
                if len(block) >= 12:
                    docs.append({"source": "wordnet/gloss", "text": "\n".join(block)})
                    block = []
                if len(ex_block) >= 8:
                    docs.append({"source": "wordnet/example", "text": " ".join(ex_block)})
                    ex_block = []
        if block:
            docs.append({"source": "wordnet/gloss", "text": "\n".join(block)})
        if ex_block:
            docs.append({"source": "wordnet/example", "text": " ".join(ex_block)})
    return docs


def chatterbot_dialogs(build: Path) -> list[dict]:
    import yaml  # PyYAML; only needed at corpus build time

    root = build / "x_chatterbot-corpus/chatterbot_corpus/data"
    out = []
    for lang_dir, lang in CHATTERBOT_LANGS.items():
        for p in sorted((root / lang_dir).glob("*.yml")):
            if p.name in CHATTERBOT_SKIP:
                continue
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                print(f"warning: {p}: skipped ({e.__class__.__name__})", file=sys.stderr)
                continue
            for conv in (data or {}).get("conversations", []) or []:
                if not isinstance(conv, list):
                    continue
                turns = [clean_text(str(t)) for t in conv if t is not None]
                turns = [t for t in turns if t]
                if len(turns) % 2:
                    turns = turns[:-1]
                if len(turns) < 2 or any(BAD_WORDS.search(t) for t in turns):
                    continue
                msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)]
                out.append({"messages": msgs, "source": f"chatterbot/{lang_dir}/{p.stem}", "lang": lang})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    ap.add_argument("--no-update", action="store_true", help="skip apt-get update")
    ap.add_argument("--offline", action="store_true", help="reuse downloaded files, no network")
    args = ap.parse_args(argv)
    build = Path(args.build_dir)
    build.mkdir(parents=True, exist_ok=True)
    used = fetch(build, update=not args.no_update, offline=args.offline)

    docs = fortunes_docs(build) + wordnet_docs(build)
    dialogs = chatterbot_dialogs(build)
    tmp = build / "plain.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, build / "plain.jsonl")
    tmp = build / "plain.txt.tmp"
    tmp.write_text("\n\n".join(d["text"] for d in docs) + "\n", encoding="utf-8")
    os.replace(tmp, build / "plain.txt")
    tmp = build / "chat_thirdparty.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in dialogs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, build / "chat_thirdparty.jsonl")

    stats = {}
    for d in docs:
        k = d["source"].split("/")[0]
        s = stats.setdefault(k, [0, 0])
        s[0] += 1
        s[1] += len(d["text"])
    for d in dialogs:
        k = "chatterbot-" + d["lang"]
        s = stats.setdefault(k, [0, 0])
        s[0] += 1
        s[1] += sum(len(m["content"]) for m in d["messages"])
    summary = {"packages": used, "stats": {k: {"docs": v[0], "chars": v[1]} for k, v in stats.items()}}
    tmp = build / "sources.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, build / "sources.json")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
