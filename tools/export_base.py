"""Export a pretraining checkpoint (tools/pretrain_base.py --out RUN) as an HF model folder.

    python tools/export_base.py --run tools/_build/pretrain --out tools/_build/base_model_preview [--dtype BF16]

Writes config.json, model.safetensors (F16 or BF16), tokenizer.json, tokenizer_config.json and
generation_config.json (eos = <|im_end|>) atomically, and general_eval.jsonl: the first
GENERAL_EVAL_DIALOGS dialogs of the held-out set (never pretrained on), which the forgetting meter
scores at every evaluation of a fine-tune. The shipped folder is
finetune_desktop/resources/base_model/ (the model card README.md there is written separately and
is kept if it exists). --check loads the result back with Model.from_pretrained and, when
installed, transformers (logits compared within 1e-4 relative).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from finetune_desktop.engine import Model, Tokenizer  # noqa: E402
from finetune_desktop.engine.checkpoint import read_safetensors  # noqa: E402

import pretrain_base as pb  # noqa: E402


GENERAL_EVAL_DIALOGS = 40
GENERAL_EVAL_FILE = "general_eval.jsonl"


def general_eval_bytes(corpus_dir: Path = HERE / "corpus") -> bytes:
    """The forgetting meter's dialogs for the shipped model: held-out lines, copied as they are."""
    lines = (corpus_dir / pb.HELDOUT_FILE).read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in lines if ln.strip()][:GENERAL_EVAL_DIALOGS]
    return ("\n".join(lines) + "\n").encode("utf-8")


def load_run_model(run: Path) -> tuple[Model, Tokenizer, dict]:
    cfg = json.loads((run / "run_config.json").read_text(encoding="utf-8"))
    args = pb.build_parser().parse_args(["--out", str(run)])
    for k, v in cfg.items():
        setattr(args, k, v)
    tok = Tokenizer.from_pretrained(run / "tokenizer")
    mcfg = pb.model_config(args, tok.vocab_size, tok.token_to_id(pb.IM_END), tok.token_to_id(pb.EOT))
    params = read_safetensors(run / "checkpoint" / "params.safetensors")
    model = Model(mcfg, {k: v.astype(np.float32) for k, v in params.items()})
    state = json.loads((run / "checkpoint" / "state.json").read_text(encoding="utf-8"))
    return model, tok, state


def export(run: Path, out: Path, dtype: str = "BF16") -> dict:
    model, tok, state = load_run_model(run)
    eos = tok.token_to_id(pb.IM_END)
    pad = tok.token_to_id(pb.EOT)
    gen = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None, "do_sample": True,
           "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128}
    extra = {
        "tokenizer.json": (run / "tokenizer" / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (run / "tokenizer" / "tokenizer_config.json").read_bytes(),
        "generation_config.json": (json.dumps(gen, indent=2) + "\n").encode("utf-8"),
        GENERAL_EVAL_FILE: general_eval_bytes(),
    }
    card = out / "README.md"
    if card.exists():
        extra["README.md"] = card.read_bytes()
    model.save_pretrained(out, dtype=dtype, extra_files=extra)
    return {"out": str(out), "params": model.num_parameters(), "dtype": dtype,
            "phase": state.get("phase"), "step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
            "size_bytes": sum(p.stat().st_size for p in out.iterdir())}


def check(out: Path) -> dict:
    """Our engine vs transformers on the exported folder."""
    m = Model.from_pretrained(out)
    tok = Tokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello! How are you today?"}],
                                   add_generation_prompt=True)
    ids = np.array([tok.encode(text)])
    ours = m.logits(ids)
    r = {"engine_loads": True}
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return r
    hm = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    hm.eval()
    with torch.no_grad():
        theirs = hm(torch.tensor(ids)).logits.numpy()
    rel = float(np.abs(ours - theirs).max() / (np.abs(theirs).max() + 1e-12))
    ht = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    r.update(max_rel_logit_diff=rel, logits_match=rel < 1e-4,
             template_match=ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
             == tok.apply_chat_template(msgs, add_generation_prompt=True),
             ids_match=list(ht(text)["input_ids"]) == ids[0].tolist())
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="pretraining folder (has checkpoint/ and tokenizer/)")
    ap.add_argument("--out", required=True, help="HF folder to write")
    ap.add_argument("--dtype", default="BF16", choices=["F16", "BF16", "F32"])
    ap.add_argument("--check", action="store_true", help="load back with the engine and transformers")
    ap.add_argument("--general-eval-only", action="store_true",
                    help="only (re)write OUT/general_eval.jsonl from the held-out dialogs")
    args = ap.parse_args(argv)
    if args.general_eval_only:
        (Path(args.out) / GENERAL_EVAL_FILE).write_bytes(general_eval_bytes())
        print(f"wrote {Path(args.out) / GENERAL_EVAL_FILE}")
        return 0
    if not args.run:
        ap.error("--run is required (unless --general-eval-only)")
    run = Path(args.run)
    if not (run / "checkpoint" / "state.json").exists():
        print(f"error: {run}: no checkpoint/state.json (not a pretrain_base.py run folder)", file=sys.stderr)
        return 2
    r = export(run, Path(args.out), args.dtype)
    if args.check:
        r.update(check(Path(args.out)))
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
