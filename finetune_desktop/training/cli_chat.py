"""`finetune-desktop chat MODEL [--prompt TEXT] [--system TEXT] ...`

With --prompt only the reply is printed (streamed, flushed as it comes). Without it, an
interactive chat that keeps the history; an empty line or end of input ends it."""
from __future__ import annotations

import sys
import warnings

import numpy as np

from ..cli import CliError
from .chat import ChatError, load_chat_model, stream_reply
from .threads import blas_threads


def _gen_kwargs(args) -> dict:
    if args.temperature < 0:
        raise CliError(f"--temperature must be 0 or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if getattr(args, "repetition_penalty", 1.0) <= 0:
        raise CliError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=getattr(args, "top_k", 0) or None,
                repetition_penalty=getattr(args, "repetition_penalty", 1.0), max_new_tokens=args.max_new_tokens,
                seed=args.seed)


def _reply(cm, messages, kw, out) -> str:
    parts = []
    for piece in stream_reply(cm, messages, **kw):
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def run_chat(args) -> int:
    # the engine's padding mask adds two very negative numbers on purpose (numpy warns about the
    # overflow); a real overflow shows up as a non-finite loss, which the loop reports in words
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"finetune_desktop\.engine")
    with blas_threads(), np.errstate(over="ignore"):
        return _run_chat(args)


def _run_chat(args) -> int:
    kw = _gen_kwargs(args)
    try:
        cm = load_chat_model(args.model)
    except ChatError as e:
        raise CliError(str(e), 2) from None
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    out = sys.stdout
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("--prompt is empty")
        _reply(cm, messages + [{"role": "user", "content": args.prompt}], kw, out)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {cm.folder} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = _reply(cm, messages, kw, out)
        messages.append({"role": "assistant", "content": reply})
    return 0
