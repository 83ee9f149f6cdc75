"""Chat streaming speed of the embedded base model, measured the way the chat pane streams:
`training.chat.stream_reply` with the chat defaults (temperature 0.7, top-p 0.9, repetition
penalty 1.1), the stream decoder included, stopping at <|im_end|>.

    python bench/chat_speed.py [--model base] [--max-new-tokens 200] [--rounds 2]

Prints, as LM Studio does, the streaming rate (tokens per second after the first token:
sampling and text decoding included) and the time to the first token (template, tokenizing and
prefill) separately, the end-to-end rate, and the decode-only rate of greedy generation without
a stop token. Where torch + transformers are installed, greedy generation of the same model in
transformers runs in the same process, interleaved, and the ratio is printed (same tokens
checked). The target is >= 150 tokens/s for the streamed chat."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Hello!", "What should I eat for breakfast?", "Can you tell me a story about your weekend?",
    "How do I make a cup of tea?", "What can I do on a rainy day?", "How can I sleep better?",
    "What is a good hobby to start?", "I am bored. What should I do?", "How do I make a friend?",
    "What fruit is good in summer?",
]


class CountingDecoder:
    """Wraps a stream decoder to count the tokens stream_reply pushes through it."""

    def __init__(self, inner):
        self.inner, self.n, self.first = inner, 0, None

    def push(self, t):
        self.n += 1
        if self.first is None:
            self.first = time.perf_counter()
        return self.inner.push(t)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the questions")
    args = ap.parse_args(argv)

    from finetune_desktop.engine.runtime import configure_process
    from finetune_desktop.training.chat import load_chat_model, prompt_ids, stream_reply

    configure_process()
    cm = load_chat_model(args.model)
    tok = cm.tokenizer
    made = []
    real_factory = tok.stream_decoder

    def counting_factory(*a, **kw):
        d = CountingDecoder(real_factory(*a, **kw))
        made.append(d)
        return d

    tok.stream_decoder = counting_factory
    firsts, n_all, t_all, n_stream, t_stream, ended, replies = [], 0, 0.0, 0, 0.0, 0, 0
    for r in range(args.rounds):
        for i, q in enumerate(QUESTIONS):
            msgs = [{"role": "user", "content": q}]
            t0 = time.perf_counter()
            for _piece in stream_reply(cm, msgs, max_new_tokens=args.max_new_tokens, seed=1000 * r + i):
                pass
            t1 = time.perf_counter()
            d = made[-1]
            replies += 1
            ended += d.n < args.max_new_tokens
            n_all, t_all = n_all + d.n, t_all + (t1 - t0)
            if d.first is not None:
                firsts.append(d.first - t0)
                # after the first token: d.n - 1 more tokens and the end-of-turn token, each one step
                n_stream, t_stream = n_stream + d.n, t_stream + (t1 - d.first)
    tok.stream_decoder = real_factory
    print(f"model: {cm.folder}")
    print(f"chat replies (stream_reply, chat defaults, {replies} replies, {n_all} tokens, "
          f"{ended}/{replies} ended with the end-of-turn token):")
    print(f"  streaming rate after the first token: {n_stream / t_stream:.0f} tokens/s   <- the target (>= 150)")
    print(f"  time to first token: {1000 * statistics.median(firsts):.1f} ms (median; prompt template, tokenizing "
          f"and prefill)")
    print(f"  end to end (first token latency included): {n_all / t_all:.0f} tokens/s")

    # decode-only rate: greedy, no stop token, fixed length
    ids = prompt_ids(tok, [{"role": "user", "content": QUESTIONS[2]}])
    n = args.max_new_tokens
    ours_t = []
    for _ in range(3):
        t0 = time.perf_counter()
        ours = list(cm.model.generate(ids, max_new_tokens=n, temperature=0.0))
        ours_t.append(time.perf_counter() - t0)
    print(f"greedy generation, {n} tokens without stopping: {n / min(ours_t):.0f} tokens/s (best of 3)")
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers not installed: no side-by-side comparison")
        return 0
    hf = AutoModelForCausalLM.from_pretrained(str(cm.folder), torch_dtype=torch.float32)
    hf.eval()
    theirs_t = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
            theirs_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(cm.model.generate(ids, max_new_tokens=n, temperature=0.0))
            ours_t.append(time.perf_counter() - t0)
    theirs = out[0, len(ids):].tolist()
    print(f"transformers greedy generate (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"{n / min(theirs_t):.0f} tokens/s | RATIO numpy/transformers = {min(theirs_t) / min(ours_t):.2f}x | "
          f"same tokens: {ours == theirs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
