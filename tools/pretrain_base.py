"""Pretrain the embedded base model with the project's own numpy engine.

Phase 1 (language): plain text (fortunes, WordNet glosses and examples) plus the dialogs written
as plain text, packed into rows of --seq-len tokens separated by <|endoftext|>; loss on every token.
Phase 2 (chat): dialogs rendered with the ChatML template, packed whole into rows, mixed with some
plain-text rows so the model does not forget language. The loss counts every token of each
conversation (--phase2-loss all, the default) or only the assistant replies and their <|im_end|>
(--phase2-loss assistant). Counting only the replies made the held-out bits per byte rise after a
while: the model forgot how people write while it memorised the replies.

Budget: each phase runs for a number of steps, given directly (--phase1-steps, deterministic) or
planned from a wall-clock budget (--phase1-minutes): the step count is estimated after a few
steps and re-estimated at each checkpoint; the counts used are logged so a run can be reproduced
exactly with --phaseN-steps. Learning rate: linear warmup + cosine decay within each phase.

Determinism and resuming: every batch is a pure function of (seed, phase, step) and of data
snapshots written into --out when a phase (or a phase-2 epoch) starts, so a killed run restarted
with the same --out continues bit for bit. Checkpoints (weights + AdamW moments + state) are
written atomically every --checkpoint-minutes. The dialog files are (re)read when phase 2 starts
and again at every phase-2 epoch, because they are still being written.

Held-out evaluation: 2% of the original dialogs (chosen by a hash of their content) plus
tools/corpus/heldout_dialogs_en.jsonl; logged as assistant-token loss and bits per byte over the
chat-formatted text (all tokens).

Output (--out DIR): run_config.json, tokenizer/, log.jsonl (one JSON object per step / eval),
checkpoint/ (resumable state), phase1_docs.jsonl and phase2_epochs/ (data snapshots).
Export with tools/export_base.py.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from finetune_desktop.engine import Model, Tokenizer, ops, optim  # noqa: E402
from finetune_desktop.engine.checkpoint import (atomic_write_json, make_temp_dir_beside,  # noqa: E402
                                                read_safetensors, replace_dir_atomically,
                                                write_safetensors)
from finetune_desktop.engine.config import ModelConfig  # noqa: E402

import faq_corpus  # noqa: E402
import train_tokenizer as tt  # noqa: E402

IGNORE = ops.IGNORE_INDEX
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
HELDOUT_FILE = "heldout_dialogs_en.jsonl"
SAMPLE_PROMPTS = ["Hello!", "What should I eat for breakfast?", "How are you today?"]


# ============================================================================ data
def dialog_key(msgs) -> str:
    return hashlib.sha1(json.dumps(msgs, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def is_heldout(msgs, frac: float) -> bool:
    """2% (frac) of the original dialogs, chosen by content hash: stable as files grow."""
    return int(dialog_key(msgs)[:8], 16) / 0xFFFFFFFF < frac


def load_original_dialogs(corpus_dir: Path, heldout_frac: float):
    """-> (train, heldout) lists of {"messages", "source"} from dialogs_*.jsonl (+ heldout file)."""
    train, held = [], []
    for p in tt.dialog_files(corpus_dir):
        for msgs in tt.read_dialogs(p):
            if not any(m["role"] == "assistant" for m in msgs):
                continue
            d = {"messages": msgs, "source": p.name}
            (held if is_heldout(msgs, heldout_frac) else train).append(d)
    hp = corpus_dir / HELDOUT_FILE
    if hp.exists():
        held += [{"messages": m, "source": hp.name} for m in tt.read_dialogs(hp)]
    return train, held


def load_thirdparty_dialogs(build_dir: Path):
    p = build_dir / "chat_thirdparty.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in open(p, encoding="utf-8") if line.strip()]


def dialog_as_plain(msgs) -> str:
    return "\n".join(m["content"] for m in msgs if m["role"] != "system")


def write_jsonl_atomic(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def assistant_labels(ids, header, im_end: int) -> np.ndarray:
    """Labels (HF-aligned) that count only assistant replies: the tokens after each
    `<|im_start|>assistant\\n` header up to and including the next <|im_end|>."""
    ids = list(ids)
    lab = np.full(len(ids), IGNORE, dtype=np.int64)
    h = len(header)
    i = 0
    while i <= len(ids) - h:
        if ids[i:i + h] == header:
            j = i + h
            while j < len(ids):
                lab[j] = ids[j]
                if ids[j] == im_end:
                    break
                j += 1
            i = j + 1
        else:
            i += 1
    return lab


class Data:
    """Token streams and packed rows; every batch is a pure function of (seed, phase, step)."""

    def __init__(self, args, tok: Tokenizer, out: Path):
        self.a = args
        self.tok = tok
        self.out = out
        self.T = args.seq_len
        self.eot = tok.token_to_id(EOT)
        self.im_end = tok.token_to_id(IM_END)
        self.header = tok.encode(IM_START + "assistant\n")
        self._p1 = None          # (stream epochs helper)
        self._p1_cache = {}
        self._p2_epochs = {}     # epoch -> (ids (R, T), labels (R, T))

    # ---------------------------------------------------------------- phase 1
    def phase1_snapshot(self) -> Path:
        """Write phase1_docs.jsonl once (plain text + dialogs as text) and return its path."""
        path = self.out / "phase1_docs.jsonl"
        if path.exists():
            return path
        a = self.a
        rng = np.random.default_rng([a.seed, 11])
        docs = []
        build = Path(a.build_dir)
        weights = {"wordnet/gloss": a.gloss_weight}
        for d in read_jsonl(build / "plain.jsonl"):
            w = weights.get(d["source"], 1.0)
            if w >= 1.0 or rng.random() < w:
                docs.append(d["text"])
        train, _ = load_original_dialogs(Path(a.corpus_dir), a.heldout_frac)
        for _ in range(a.phase1_dialog_repeat):
            docs += [dialog_as_plain(d["messages"]) for d in train]
        docs += [dialog_as_plain(d["messages"]) for d in load_thirdparty_dialogs(build)]
        if a.faq_weight > 0:
            docs += faq_corpus.plain_documents(Path(a.corpus_dir))
        write_jsonl_atomic(path, [{"text": t} for t in docs])
        return path

    def _p1_load(self):
        if self._p1 is None:
            docs = [d["text"] for d in read_jsonl(self.phase1_snapshot())]
            enc = self.tok.encode_batch(docs)
            self._p1 = [np.array(e + [self.eot], dtype=np.int32) for e in enc]
            self._p1_len = sum(len(x) for x in self._p1)
            self._p1_rows = self._p1_len // self.T
        return self._p1

    def _p1_epoch(self, e: int, stream: int) -> np.ndarray:
        key = (e, stream)
        if key not in self._p1_cache:
            docs = self._p1_load()
            perm = np.random.default_rng([self.a.seed, 1, stream, e]).permutation(len(docs))
            self._p1_cache = {key: np.concatenate([docs[i] for i in perm])}
        return self._p1_cache[key]

    def plain_rows(self, start_row: int, n: int, stream: int = 0):
        """Rows start_row .. start_row+n of the shuffled plain stream; labels = ids."""
        self._p1_load()
        rows = []
        for r in range(start_row, start_row + n):
            e, k = divmod(r, self._p1_rows)
            s = self._p1_epoch(e, stream)
            rows.append(s[k * self.T:(k + 1) * self.T])
        ids = np.stack(rows).astype(np.int64)
        return ids, ids.copy()

    def phase1_batch(self, step: int):
        B = self.a.batch_size
        return self.plain_rows(step * B, B, stream=0)

    # ---------------------------------------------------------------- phase 2
    def _p2_snapshot(self, e: int) -> Path:
        d = self.out / "phase2_epochs"
        d.mkdir(exist_ok=True)
        path = d / f"epoch_{e:04d}.jsonl"
        if not path.exists():
            a = self.a
            train, _ = load_original_dialogs(Path(a.corpus_dir), a.heldout_frac)
            convs = []
            for _ in range(a.phase2_dialog_repeat):
                convs += [d["messages"] for d in train]
            convs += [d["messages"] for d in load_thirdparty_dialogs(Path(a.build_dir))]
            # paraphrase families: faq_weight epochs' worth of them per dialog epoch (fractions
            # keep that share of one epoch's conversations)
            w = a.faq_weight
            k = 0
            while w > 0:
                fam = faq_corpus.epoch_conversations(a.seed, e * 100 + k, Path(a.corpus_dir))
                convs += fam[:int(round(len(fam) * min(1.0, w)))]
                w -= 1.0
                k += 1
            write_jsonl_atomic(path, [{"messages": m} for m in convs])
        return path

    def _p2_epoch(self, e: int):
        if e not in self._p2_epochs:
            convs = [r["messages"] for r in read_jsonl(self._p2_snapshot(e))]
            texts = [self.tok.apply_chat_template(m) for m in convs]
            enc = self.tok.encode_batch(texts)
            perm = np.random.default_rng([self.a.seed, 2, e]).permutation(len(enc))
            T = self.T
            rows_i, rows_l = [], []
            cur_i, cur_l = [], []

            def flush():
                if cur_i:
                    pad = T - len(cur_i)
                    rows_i.append(cur_i + [self.eot] * pad)
                    rows_l.append(cur_l + [IGNORE] * pad)

            for idx in perm:
                ids = enc[idx][:T]
                if self.a.phase2_loss == "all":
                    lab = list(ids)
                else:
                    lab = assistant_labels(ids, self.header, self.im_end).tolist()
                if len(cur_i) + len(ids) + 1 > T:
                    flush()
                    cur_i, cur_l = [], []
                if cur_i:
                    cur_i.append(self.eot)
                    cur_l.append(IGNORE)
                cur_i += ids
                cur_l += lab
            flush()
            self._p2_epochs = {k: v for k, v in self._p2_epochs.items() if k >= e - 1}
            self._p2_epochs[e] = (np.array(rows_i, dtype=np.int64), np.array(rows_l, dtype=np.int64))
        return self._p2_epochs[e]

    def _p2_rows(self, start: int, n: int):
        ids, labs = [], []
        e, base = 0, 0
        # walk the epochs (sizes vary because the dialog files grow)
        if not hasattr(self, "_p2_sizes"):
            self._p2_sizes = {}
        r = start
        while len(ids) < n:
            if e not in self._p2_sizes:
                self._p2_sizes[e] = len(self._p2_epoch(e)[0])
            size = self._p2_sizes[e]
            if r < base + size:
                I, L = self._p2_epoch(e)
                k = r - base
                take = min(n - len(ids), size - k)
                ids += list(I[k:k + take])
                labs += list(L[k:k + take])
                r += take
            else:
                base += size
                e += 1
        return np.stack(ids), np.stack(labs)

    def phase2_batch(self, step: int, plain_offset: int):
        B = self.a.batch_size
        n_plain = int(round(B * self.a.phase2_plain_frac))
        ids, labs = self._p2_rows(step * (B - n_plain), B - n_plain)
        if n_plain:
            pi, pl = self.plain_rows(plain_offset + step * n_plain, n_plain, stream=1)
            ids, labs = np.concatenate([ids, pi]), np.concatenate([labs, pl])
        return ids, labs


# ============================================================================ evaluation
def evaluate(model: Model, tok: Tokenizer, convs, max_len: int = 512, batch: int = 8) -> dict:
    """Held-out assistant-token loss and bits per byte over the chat-formatted text."""
    header = tok.encode(IM_START + "assistant\n")
    im_end = tok.token_to_id(IM_END)
    pad = tok.token_to_id(EOT)
    items = []
    for msgs in convs:
        ids = tok.encode(tok.apply_chat_template(msgs))[:max_len]
        items.append((ids, len(tok.decode(ids).encode("utf-8"))))
    nats_all = nats_asst = 0.0
    n_all = n_asst = 0
    nbytes = 0
    for b0 in range(0, len(items), batch):
        chunk = items[b0:b0 + batch]
        L = max(len(x[0]) for x in chunk)
        I = np.full((len(chunk), L), pad, dtype=np.int64)
        LA = np.full((len(chunk), L), IGNORE, dtype=np.int64)
        LS = np.full((len(chunk), L), IGNORE, dtype=np.int64)
        for i, (ids, nb) in enumerate(chunk):
            I[i, :len(ids)] = ids
            LA[i, :len(ids)] = ids
            LS[i, :len(ids)] = assistant_labels(ids, header, im_end)
            nbytes += nb
        logits, _ = model.forward(I)
        la, ca = ops.cross_entropy_forward(logits, LA)
        ls, cs = ops.cross_entropy_forward(logits, LS)
        nats_all += la * ca[5]
        n_all += ca[5]
        nats_asst += ls * cs[5]
        n_asst += cs[5]
    return {"heldout_loss_all": nats_all / max(n_all, 1), "heldout_loss_assistant": nats_asst / max(n_asst, 1),
            "heldout_bpb": nats_all / math.log(2) / max(nbytes, 1), "heldout_conversations": len(items),
            "heldout_tokens": n_all}


def faq_eval(model: Model, tok: Tokenizer, corpus_dir: Path, n: int = 80) -> dict:
    """Held-out wordings of facts the pretraining taught (greedy; right when the reply holds the
    whole answer) and the paraphrase probe on the project's sample FAQs."""
    from finetune_desktop.training.quiz import reproduces
    import paraphrase_probe

    items = faq_corpus.heldout_quiz(corpus_dir, max_items=n)
    right = 0
    for it in items:
        msgs = [{"role": "system", "content": it["system"]}, {"role": "user", "content": it["question"]}]
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
        gen = list(model.generate(ids, max_new_tokens=64, temperature=0.0, repetition_penalty=1.1,
                                  stop_ids=tok.end_of_turn_ids))
        right += reproduces(tok.decode(gen, skip_special_tokens=True), it["answer"])
    out = {"faq_heldout_wordings": right, "faq_heldout_items": len(items)}
    root = HERE.parent
    for name, data, quiz in (("bike", "sample_data/faq_bike_shop.jsonl", "sample_data/faq_bike_shop_quiz.jsonl"),
                             ("pool", "tools/eval_data/faq_swimming_pool.jsonl",
                              "tools/eval_data/faq_swimming_pool_quiz.jsonl"),
                             ("ko", "sample_data/faq_gimbap_cafe_ko.jsonl", "sample_data/faq_gimbap_cafe_ko_quiz.jsonl")):
        if (root / data).exists() and (root / quiz).exists():
            tq, ta, qq, qa = paraphrase_probe.load_pairs(root / data, root / quiz)
            te = paraphrase_probe.embed(model, tok, tq)
            qe = paraphrase_probe.embed(model, tok, qq)
            out[f"probe_{name}"] = [paraphrase_probe.nearest_hits(te[l], qe[l], ta, qa) for l in range(len(te))]
    return out


def sample_replies(model: Model, tok: Tokenizer, prompts, max_new: int = 48):
    out = {}
    for p in prompts:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        gen = list(model.generate(ids, max_new_tokens=max_new, temperature=0.0, stop_ids=tok.end_of_turn_ids))
        ended = len(gen) < max_new
        out[p] = tok.decode(gen) + ("" if ended else " [...]")
    return out


# ============================================================================ checkpoints
def save_checkpoint(out: Path, model: Model, adam: dict, state: dict) -> None:
    target = out / "checkpoint"
    tmp = make_temp_dir_beside(target)
    try:
        write_safetensors(tmp / "params.safetensors", model.params)
        opt = {f"m.{k}": v for k, v in adam["m"].items()}
        opt.update({f"v.{k}": v for k, v in adam["v"].items()})
        write_safetensors(tmp / "adam.safetensors", opt)
        atomic_write_json(tmp / "state.json", dict(state, adam_step=adam["step"]))
        replace_dir_atomically(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(out: Path, model: Model):
    d = out / "checkpoint"
    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    params = read_safetensors(d / "params.safetensors")
    for k in model.params:
        model.params[k][...] = params[k]
    model.weights_changed()
    opt = read_safetensors(d / "adam.safetensors")
    adam = {"step": state["adam_step"],
            "m": {k: opt[f"m.{k}"].copy() for k in model.params},
            "v": {k: opt[f"v.{k}"].copy() for k in model.params}}
    return state, adam


def truncate_log(path: Path, state: dict) -> None:
    """Drop log lines written after the checkpoint (they will be recomputed identically)."""
    if not path.exists():
        return
    keep = []
    order = (state["phase"], state["step"])
    for line in open(path, encoding="utf-8"):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (r.get("phase", 0), r.get("step", 0)) <= order or r.get("event") == "resume":
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


# ============================================================================ training
def model_config(args, vocab_size: int, eos_id: int, pad_id: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                       num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                       max_position_embeddings=args.max_position_embeddings, rope_theta=args.rope_theta,
                       tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                       bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)


SAVED_ARGS = ("seed", "build_dir", "corpus_dir", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "max_position_embeddings", "rope_theta", "seq_len",
              "batch_size", "phase1_steps", "phase2_steps", "phase1_minutes", "phase2_minutes",
              "lr1", "lr2", "min_lr_ratio", "warmup1", "warmup2", "weight_decay", "grad_clip",
              "beta2", "gloss_weight", "phase1_dialog_repeat", "phase2_dialog_repeat",
              "phase2_plain_frac", "heldout_frac", "max_heldout", "phase2_loss", "faq_weight", "init_from")
# settings added after the first runs: what a run folder without them used
SAVED_DEFAULTS = {"phase2_loss": "assistant", "faq_weight": 0.0, "init_from": None}


class Logger:
    def __init__(self, path: Path, quiet: bool = False):
        self.path = path
        self.quiet = quiet

    def __call__(self, rec: dict, echo: str | None = None):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if not self.quiet:
            print(echo if echo is not None else json.dumps(rec, ensure_ascii=False), flush=True)


def ensure_corpus_and_tokenizer(args) -> Path:
    build = Path(args.build_dir)
    if not (build / "plain.jsonl").exists():
        import build_corpus
        build_corpus.main(["--build-dir", str(build)])
    tokdir = Path(args.tokenizer) if args.tokenizer else build / "tokenizer"
    if not (tokdir / "tokenizer.json").exists():
        tt.main(["--build-dir", str(build), "--corpus-dir", args.corpus_dir, "--out", str(tokdir)])
    return tokdir


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "run_config.json"
    resuming = (out / "checkpoint" / "state.json").exists()
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
        for k in SAVED_ARGS:
            setattr(args, k, saved[k] if k in saved else SAVED_DEFAULTS[k])
    else:
        tokdir = ensure_corpus_and_tokenizer(args)
        shutil.copytree(tokdir, out / "tokenizer", dirs_exist_ok=True)
        atomic_write_json(cfg_path, {k: getattr(args, k) for k in SAVED_ARGS})
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    eos_id, pad_id = tok.token_to_id(IM_END), tok.token_to_id(EOT)
    cfg = model_config(args, tok.vocab_size, eos_id, pad_id)
    model = Model.from_config(cfg, seed=args.seed)
    if args.init_from and not resuming:
        init = Model.from_pretrained(args.init_from)
        if init.config.to_hf_dict() != model.config.to_hf_dict() and set(init.params) != set(model.params):
            raise SystemExit(f"error: --init-from {args.init_from}: its shape differs from the configured model")
        for k, v in init.params.items():
            if model.params[k].shape != v.shape:
                raise SystemExit(f"error: --init-from {args.init_from}: {k} has shape {v.shape}, "
                                 f"the configured model needs {model.params[k].shape}")
            model.params[k][...] = v
        model.weights_changed()
    log = Logger(out / "log.jsonl", quiet=args.quiet)
    if resuming:
        state, adam = load_checkpoint(out, model)
        truncate_log(out / "log.jsonl", state)
        log({"event": "resume", "phase": state["phase"], "step": state["step"]},
            f"resumed at phase {state['phase']} step {state['step']}")
    else:
        adam = optim.adamw_init(model.params)
        state = {"phase": 1, "step": 0, "total": None, "phase_elapsed_s": 0.0, "tokens_seen": 0,
                 "plain_rows_used": 0, "done": False}
        log({"event": "start", "phase": 1, "step": 0, "params": model.num_parameters(),
             "config": cfg.to_hf_dict()}, f"model {model!r}")
    if state.get("done"):
        print("this run is already finished; export it with tools/export_base.py")
        return 0
    data = Data(args, tok, out)
    acfg = optim.AdamWConfig(lr=args.lr1, beta1=0.9, beta2=args.beta2, eps=1e-8, weight_decay=args.weight_decay)
    B, T = args.batch_size, args.seq_len
    ckpt_every_s = args.checkpoint_minutes * 60
    eval_every_s = args.eval_minutes * 60
    steps_this_run = 0

    def load_heldout():
        _, held = load_original_dialogs(Path(args.corpus_dir), args.heldout_frac)
        held.sort(key=lambda d: dialog_key(d["messages"]))
        return [d["messages"] for d in held[:args.max_heldout]]

    heldout = load_heldout()

    def do_eval():
        if not heldout:
            return
        t0 = time.time()
        r = evaluate(model, tok, heldout, max_len=min(512, cfg.max_position_embeddings))
        rec = {"event": "eval", "phase": state["phase"], "step": state["step"],
               "tokens_seen": state["tokens_seen"], **{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}}
        if state["phase"] == 2 and not args.no_samples:
            rec["samples"] = sample_replies(model, tok, SAMPLE_PROMPTS)
        if state["phase"] == 2 and args.faq_weight > 0:
            rec.update(faq_eval(model, tok, Path(args.corpus_dir)))
        rec["eval_s"] = round(time.time() - t0, 2)
        log(rec)

    while state["phase"] <= 2:
        phase = state["phase"]
        fixed_steps = args.phase1_steps if phase == 1 else args.phase2_steps
        budget_s = (args.phase1_minutes if phase == 1 else args.phase2_minutes) * 60
        if fixed_steps is not None:
            state["total"] = fixed_steps
        base_lr = args.lr1 if phase == 1 else args.lr2
        warm = args.warmup1 if phase == 1 else args.warmup2
        if phase == 2 and state["step"] == 0:
            heldout = load_heldout()
            data._p2_snapshot(0)
        if state["step"] == 0:
            log({"event": "phase_start", "phase": phase, "step": 0, "planned_steps": state["total"],
                 "budget_minutes": budget_s / 60 if fixed_steps is None else None})
            do_eval()
        t_phase0 = time.time() - state["phase_elapsed_s"]
        last_ckpt = last_eval = time.time()
        window = []  # recent step times
        while True:
            step = state["step"]
            total = state["total"]
            if total is not None and step >= total:
                break
            if fixed_steps is None and time.time() - t_phase0 > budget_s * 1.1:
                log({"event": "budget_stop", "phase": phase, "step": step})
                break
            t0 = time.time()
            if phase == 1:
                ids, labels = data.phase1_batch(step)
            else:
                ids, labels = data.phase2_batch(step, state["plain_rows_used"])
            # schedule: during calibration (total unknown) stay in warmup
            sched_total = total if total is not None else 10 ** 9
            lr = optim.lr_at(step, sched_total, base_lr, "cosine", warmup_steps=warm, min_lr_ratio=args.min_lr_ratio)
            loss, grads = model.loss_and_grads(ids, labels)
            gnorm = optim.clip_grads(grads, args.grad_clip)
            optim.adamw_step(model.params, grads, adam, lr, acfg)
            model.weights_changed()
            del grads
            dt = time.time() - t0
            n_tok = int((labels[:, 1:] != IGNORE).sum())
            state["step"] = step + 1
            state["tokens_seen"] += B * T
            state["phase_elapsed_s"] = time.time() - t_phase0
            steps_this_run += 1
            window.append(dt)
            window = window[-50:]
            log({"phase": phase, "step": step + 1, "total": total, "loss": round(loss, 5), "lr": lr,
                 "grad_norm": round(gnorm, 4), "counted_tokens": n_tok, "tokens_seen": state["tokens_seen"],
                 "tokens_per_s": round(B * T / dt, 1), "step_s": round(dt, 3),
                 "elapsed_s": round(state["phase_elapsed_s"], 1)},
                f"p{phase} step {step + 1}/{total} loss {loss:.4f} lr {lr:.2e} gn {gnorm:.2f} "
                f"{B * T / dt:.0f} tok/s")
            # plan the step count from the wall-clock budget
            if fixed_steps is None:
                sps = float(np.median(window))
                remaining = budget_s - state["phase_elapsed_s"]
                if state["total"] is None and len(window) >= args.calibration_steps:
                    state["total"] = max(state["step"] + 1, state["step"] + int(remaining / sps))
                    log({"event": "plan", "phase": phase, "step": state["step"], "planned_steps": state["total"],
                         "step_s": round(sps, 3)})
            now = time.time()
            stop_now = args.max_steps_this_run is not None and steps_this_run >= args.max_steps_this_run
            if now - last_eval >= eval_every_s:
                do_eval()
                last_eval = time.time()
            if now - last_ckpt >= ckpt_every_s or stop_now or (
                    args.checkpoint_every is not None and state["step"] % args.checkpoint_every == 0):
                if fixed_steps is None and state["total"] is not None and now - last_ckpt >= ckpt_every_s:
                    sps = float(np.median(window))
                    remaining = budget_s - state["phase_elapsed_s"]
                    new_total = max(state["step"] + 1, state["step"] + int(remaining / sps))
                    if abs(new_total - state["total"]) > 0.03 * state["total"]:
                        state["total"] = new_total
                        log({"event": "plan", "phase": phase, "step": state["step"],
                             "planned_steps": new_total, "step_s": round(sps, 3)})
                save_checkpoint(out, model, adam, state)
                last_ckpt = time.time()
            if stop_now:
                log({"event": "paused", "phase": phase, "step": state["step"]},
                    f"stopped after {steps_this_run} steps (checkpoint written); rerun to continue")
                return 0
        # phase end
        do_eval()
        log({"event": "phase_end", "phase": phase, "step": state["step"], "steps": state["step"],
             "tokens_seen": state["tokens_seen"], "elapsed_s": round(state["phase_elapsed_s"], 1)})
        if phase == 1:
            state.update(phase=2, step=0, total=None, phase_elapsed_s=0.0,
                         plain_rows_used=state["step"] * B)
        else:
            state.update(phase=3, done=True)
        save_checkpoint(out, model, adam, state)
    log({"event": "done", "phase": 3, "step": 0, "tokens_seen": state["tokens_seen"]},
        "pretraining finished; export with tools/export_base.py --run " + str(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (resumes when it holds a checkpoint)")
    ap.add_argument("--build-dir", default=str(HERE / "_build"))
    ap.add_argument("--corpus-dir", default=str(HERE / "corpus"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default BUILD/tokenizer; built if missing)")
    ap.add_argument("--seed", type=int, default=1234)
    # model
    ap.add_argument("--hidden-size", type=int, default=192)
    ap.add_argument("--intermediate-size", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=6)
    ap.add_argument("--num-heads", type=int, default=6)
    ap.add_argument("--num-kv-heads", type=int, default=6)
    ap.add_argument("--max-position-embeddings", type=int, default=1024)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    # batches and budget
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--phase1-steps", type=int, default=None, help="fixed step count (overrides minutes)")
    ap.add_argument("--phase2-steps", type=int, default=None)
    ap.add_argument("--phase1-minutes", type=float, default=30.0)
    ap.add_argument("--phase2-minutes", type=float, default=55.0)
    ap.add_argument("--calibration-steps", type=int, default=8)
    # optimisation
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup1", type=int, default=40)
    ap.add_argument("--warmup2", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    # data mixture
    ap.add_argument("--gloss-weight", type=float, default=0.3, help="fraction of WordNet gloss blocks kept")
    ap.add_argument("--phase1-dialog-repeat", type=int, default=2)
    ap.add_argument("--phase2-dialog-repeat", type=int, default=1)
    ap.add_argument("--phase2-plain-frac", type=float, default=0.125)
    ap.add_argument("--phase2-loss", choices=("all", "assistant"), default="all",
                    help="phase-2 loss on every conversation token or only on the assistant replies")
    ap.add_argument("--faq-weight", type=float, default=1.0,
                    help="phase-2 epochs of paraphrase-family conversations (tools/faq_corpus.py) per "
                         "epoch of everyday dialogs; 0 = none")
    ap.add_argument("--init-from", default=None,
                    help="start from this model folder's weights instead of random ones (same shape and "
                         "tokenizer); with --phase1-steps 0 this continues pretraining in phase 2")
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--max-heldout", type=int, default=160)
    # housekeeping
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    ap.add_argument("--eval-minutes", type=float, default=6.0)
    ap.add_argument("--max-steps-this-run", type=int, default=None, help="stop (with a checkpoint) after N steps")
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept, rerun the same command to continue")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
