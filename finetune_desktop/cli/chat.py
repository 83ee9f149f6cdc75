"""`finetune-desktop chat MODEL [--prompt TEXT] [--system TEXT] ...`

With --prompt only the reply is printed (streamed, flushed as it comes). Without it, an
interactive chat that keeps the history; an empty line or end of input ends it."""
from __future__ import annotations

import sys

from ..training.chat import GenerationSettings, load_chat_model, stream_reply
from .common import MODEL_HELP, pos_int
from .errors import CliError

NAME = "chat"


def register(sub) -> None:
    d = GenerationSettings()
    c = sub.add_parser(NAME, help="chat with a model (one reply with --prompt, else interactive)")
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument("--prompt", help="ask this one question, print only the reply and exit")
    c.add_argument("--system", help="a system message (the model's instructions or persona)")
    c.add_argument("--temperature", type=float, default=d.temperature,
                   help="randomness of the reply; 0 always takes the most likely token (greedy)")
    c.add_argument("--top-p", type=float, default=d.top_p,
                   help="sample only from the most likely tokens that together hold this probability")
    c.add_argument("--top-k", type=int, default=d.top_k, help="sample only from the K most likely tokens (0 = off)")
    c.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="above 1 makes tokens already used less likely")
    c.add_argument("--max-new-tokens", type=pos_int, default=d.max_new_tokens, help="longest reply, in tokens")
    c.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")
    c.set_defaults(run=run)


def settings_from_args(args) -> GenerationSettings:
    if args.temperature < 0:
        raise CliError(f"--temperature must be 0 or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise CliError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")
    if args.top_k < 0:
        raise CliError(f"--top-k must be 0 or more, got {args.top_k}")
    return GenerationSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)


def _reply(cm, messages, settings, out) -> str:
    parts = []
    for piece in stream_reply(cm, messages, settings):
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def run(args) -> int:
    settings = settings_from_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise CliError("--prompt is empty")
    cm = load_chat_model(args.model)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    out = sys.stdout
    if args.prompt is not None:
        _reply(cm, messages + [{"role": "user", "content": args.prompt}], settings, out)
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
        reply = _reply(cm, messages, settings, out)
        messages.append({"role": "assistant", "content": reply})
    return 0
