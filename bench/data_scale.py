"""Scale benchmark for finetune_desktop.data: a 100,000-example (~50 MB) JSONL file is read,
validated and tokenized. Target on a 2-core laptop: under 15 s and under 1 GB peak memory.

    python bench/data_scale.py [--examples 100000] [--tokenizer FOLDER] [--max-seq-len 512]

The tokenizer is the embedded base model's when it has one, else tools/_build/tokenizer, else a
6,144-token byte-level BPE with a ChatML template trained here on part of the generated data
(the training is not timed). Generating the file is not timed either.

After the timed run it prints a per-phase breakdown: the CPU time of the main (Python) thread and
of the tokenizer's threads during that run, then each phase on its own in separate runs: read +
validate without a tokenizer, and encoding the conversations already read (template, tokenize,
labels), with the time spent inside the `tokenizers` library's batch calls. --no-phases skips
those runs."""
from __future__ import annotations

import argparse
import copy
import gc
import threading
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a an and or but so because when while after before if then that this these those it they we you "
         "i he she my your our their sea ship sail wind storm island harbour anchor captain crew parrot map gold "
         "treasure rope deck mast wave tide fish bread soup tea coffee rain sun cloud morning evening night day "
         "week year friend family school book story song dance walk run swim cook bake read write learn teach "
         "help ask answer think know feel like love want need make take give find keep tell show try call use "
         "work play rest sleep eat drink good great small big old new happy kind brave calm quick slow warm cold "
         "bright dark green blue red yellow always never often sometimes today tomorrow yesterday here there "
         "very really quite just only also even still again together alone far near high low fair matey ahoy "
         "arr yo ho weather cat dog bird tree flower garden river mountain city town road house door window "
         "question problem idea plan reason way time place thing people child water fire earth air star moon").split()
KOREAN = ("안녕하세요 오늘 날씨가 좋네요 밥 뭇나 억수로 좋다 아이가 단디 챙기라 우짜노 머하노 그라모 "
          "아지매 학교 친구 공부 시장 바다 부산 사투리 맛있다 고맙데이 괜찮다 천천히 조심해라").split()


def _sentence(rng: random.Random, n: int, korean: bool) -> str:
    words = KOREAN if korean else WORDS
    s = " ".join(rng.choice(words) for _ in range(n))
    return s[0].upper() + s[1:] + rng.choice((".", "!", "?", "."))


def generate(path: Path, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    system = "You are Captain Marigold Finch, a cheerful pirate captain who answers kindly."
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            korean = i % 10 == 9
            msgs = [{"role": "system", "content": system}]
            turns = 2 if i % 7 == 0 else 1
            for _ in range(turns):
                msgs.append({"role": "user", "content": _sentence(rng, rng.randint(5, 18), korean)})
                reply = " ".join(_sentence(rng, rng.randint(8, 18), korean) for _ in range(rng.randint(2, 3)))
                msgs.append({"role": "assistant", "content": reply})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def find_tokenizer(arg, tmp: Path, data: Path):
    from finetune_desktop.engine import Tokenizer
    from finetune_desktop.training.loading import base_model_dir

    if arg:
        return Tokenizer.from_pretrained(arg), arg
    for cand in (base_model_dir(), ROOT / "tools" / "_build" / "tokenizer"):
        if (cand / "tokenizer.json").exists():
            return Tokenizer.from_pretrained(cand), str(cand)
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=6144, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        with open(data, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 5000:
                    break
                for m in json.loads(line)["messages"]:
                    yield m["content"]

    tok.train_from_iterator(texts(), trainer=tr)
    folder = tmp / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                              "chat_template": template}), encoding="utf-8")
    return Tokenizer.from_pretrained(folder), "trained here (6,144 tokens)"


class _TimedBackend:
    """Wraps a `tokenizers.Tokenizer`: the encode_batch* calls are timed (wall time, summed over calls)."""

    def __init__(self, backend):
        self._b = backend
        self.seconds = 0.0
        self.calls = 0
        self.texts = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._b, name)
        if not name.startswith("encode_batch"):
            return attr

        def timed(texts, *a, **k):
            t = time.perf_counter()
            try:
                return attr(texts, *a, **k)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - t
                    self.calls += 1
                    self.texts += len(texts)
        return timed


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def phases(data: Path, tok, max_seq_len: int) -> None:
    """Each phase on its own, after the timed run (the file is in the page cache by then)."""
    from finetune_desktop.data import encode_conversations, validate_file

    gc.collect()
    t, c = time.perf_counter(), _cpu()
    r = validate_file(data, tokenizer=None, max_seq_len=max_seq_len)
    print(f"  read + validate alone (no tokenizer): {time.perf_counter() - t:.2f} s wall, {_cpu() - c:.2f} s CPU")
    if tok is None:
        return
    convs = r.conversations
    del r
    timed_tok = copy.copy(tok)
    timed_tok.backend = _TimedBackend(tok.backend)
    gc.collect()
    t, c = time.perf_counter(), _cpu()
    was = gc.isenabled()
    gc.disable()  # as validate_file does
    try:
        exs = encode_conversations(timed_tok, convs, max_seq_len)
    finally:
        if was:
            gc.enable()
    b = timed_tok.backend
    print(f"  encode alone (template + tokenize + labels, {len(exs):,} examples): {time.perf_counter() - t:.2f} s wall, "
          f"{_cpu() - c:.2f} s CPU; inside tokenizers batch calls: {b.seconds:.2f} s wall "
          f"({b.calls} calls, {b.texts:,} texts)")


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / (1024 * 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--no-tokenize", action="store_true", help="only read and validate")
    ap.add_argument("--no-phases", action="store_true", help="skip the per-phase runs after the timed run")
    args = ap.parse_args()

    from finetune_desktop.data import validate_file

    with tempfile.TemporaryDirectory(prefix="ftd_bench_") as d:
        tmp = Path(d)
        data = tmp / "big.jsonl"
        t = time.perf_counter()
        size = generate(data, args.examples)
        print(f"generated {args.examples:,} examples, {size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s (not timed)")
        tok = None
        if not args.no_tokenize:
            tok, where = find_tokenizer(args.tokenizer, tmp, data)
            print(f"tokenizer: {where}, vocab {tok.vocab_size:,}")
        gc.collect()
        rss0 = peak_rss_mb()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        main0 = time.thread_time()
        t0 = time.perf_counter()
        report = validate_file(data, tokenizer=tok, max_seq_len=args.max_seq_len, batch_size=8)
        wall = time.perf_counter() - t0
        main_cpu = time.thread_time() - main0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = peak_rss_mb()
        s = report.stats
        print(f"read + validate{' + tokenize' if tok else ''}: {wall:.2f} s wall, "
              f"{(cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime):.2f} s CPU, "
              f"{size / 1e6 / wall:.1f} MB/s")
        print(f"  ok={report.ok} examples={s['examples']:,} errors={len(report.errors)} warnings={len(report.warnings)}")
        if tok is not None:
            print(f"  tokens={s['total_tokens']:,} trained={s['trained_tokens']:,} "
                  f"p50={s['length_p50']} max={s['length_max']} encoded examples kept={len(report.examples):,}")
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(f"peak RSS: {peak:.0f} MB (before the run: {rss0:.0f} MB)")
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        target = wall < 15 and peak < 1024
        print(f"target (< 15 s, < 1 GB): {'met' if target else 'NOT met'} (cores: {os.cpu_count()})")
        if not args.no_phases:
            print("per phase:")
            print(f"  in the timed run: main (Python) thread {main_cpu:.2f} s CPU, other threads (tokenizer) "
                  f"{cpu - main_cpu:.2f} s CPU")
            del report
            phases(data, tok, args.max_seq_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
