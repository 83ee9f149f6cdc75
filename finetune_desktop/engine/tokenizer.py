"""Tokenizer: HF `tokenizers` (tokenizer.json) plus the model's chat template, rendered in a
sandboxed Jinja environment (templates come from model folders and are untrusted)."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime
from typing import Iterable, Sequence

from .config import ModelFormatError

END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def _token_text(tok) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


# Limits on what a chat template from a model folder can make us do. A template is code from the
# folder; Jinja's sandbox stops it from reaching Python objects, these stop it from eating the
# machine: string and list repetition, powers and range() are capped, loops over range() and the
# whole render check a deadline, and the rendered text has a maximum size. The first render of a
# tokenizer (a small synthetic chat) also runs under a tracer that checks time and memory on
# every line of template code, so a template that would loop for ever or build a huge value on
# its own is refused when the model is opened.
MAX_TEMPLATE_OUTPUT = 4_000_000      # characters of rendered text
MAX_TEMPLATE_SEQUENCE = 1_000_000    # length of a string or list made by * or range()
MAX_TEMPLATE_POWER_BITS = 4096       # size of an integer made by **
TEMPLATE_SECONDS = 2.0               # one render
VET_MEMORY_BYTES = 128 * 2**20       # growth allowed while vetting


class TemplateLimitError(Exception):
    """A chat template went over one of the limits above."""


_deadline = threading.local()


def _check_deadline() -> None:
    d = getattr(_deadline, "t", None)
    if d is not None and time.monotonic() > d:
        raise TemplateLimitError(f"rendering took more than {TEMPLATE_SECONDS:g} s")


def _capped_range(*args):
    r = range(*args)
    if len(r) > MAX_TEMPLATE_SEQUENCE:
        raise TemplateLimitError(f"range() of {len(r):,} items (at most {MAX_TEMPLATE_SEQUENCE:,})")
    for i in r:
        _check_deadline()
        yield i


def _sequence_len(x):
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _make_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GuardedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    ln = _sequence_len(seq)
                    if ln is not None and isinstance(n, int) and ln * max(n, 0) > MAX_TEMPLATE_SEQUENCE:
                        raise TemplateLimitError(f"a repetition that makes {ln * n:,} items "
                                                 f"(at most {MAX_TEMPLATE_SEQUENCE:,})")
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_TEMPLATE_POWER_BITS:
                    raise TemplateLimitError(f"{left} ** {right} is too large")
            return super().call_binop(context, operator, left, right)

    env = GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _capped_range
    return env


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Tracer:
    """sys.settrace hook for vetting a template: every line of template code checks the deadline
    and how much the process has grown (a few microseconds a line; vetting renders tiny chats)."""

    def __init__(self):
        self.base = _rss_bytes()
        self.active = True   # frames keep their local tracer after sys.settrace(None): this ends it

    def __call__(self, frame, event, arg):
        if not self.active or frame.f_code.co_filename != "<template>":
            return None
        return self._line

    def _line(self, frame, event, arg):
        if not self.active:
            return None
        _check_deadline()
        if self.base and _rss_bytes() - self.base > VET_MEMORY_BYTES:
            raise TemplateLimitError(f"rendering used more than {VET_MEMORY_BYTES // 2**20} MB")
        return self._line


VET_CHATS = (
    ({"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello! 안녕하세요?"},
     {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Thanks."}),
    ({"role": "user", "content": "Hello!"},),
)


def template_with_default_system(template: str, system_prompt: str) -> str:
    """The chat template, preceded by a line that adds `system_prompt` as the first message when a
    conversation has no system message of its own (as Qwen's templates do with their default)."""
    lit = json.dumps(system_prompt, ensure_ascii=False)  # JSON escapes are valid Jinja string escapes
    head = ("{%- set messages = messages if (messages and messages[0]['role'] == 'system') "
            f"else [{{'role': 'system', 'content': {lit}}}] + messages %}}")
    return head + template


class Tokenizer:
    def __init__(self, backend, config: dict | None = None, chat_template: str | None = None,
                 extra_eos_ids: Iterable[int] = (), template_source: str = "the chat template"):
        self._tok = backend
        self.backend = backend  # the `tokenizers.Tokenizer` (batch encoding, offsets)
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.template_source = template_source   # the file it came from, for messages
        self._template = None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        pid = self.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_token_id = pid if pid is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        eot = set(int(i) for i in extra_eos_ids)
        if self.eos_token_id is not None:
            eot.add(self.eos_token_id)
        for t in END_OF_TURN_CANDIDATES[:5]:
            i = self.token_to_id(t)
            if i is not None:
                eot.add(i)
        self.end_of_turn_ids = tuple(sorted(eot))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        from .checkpoint import check_file, model_folder, read_json

        folder = model_folder(folder)
        tj = folder / "tokenizer.json"
        if not os.path.lexists(tj) and (folder / "tokenizer.model").exists():
            raise ModelFormatError(f"{tj}: tokenizer file is missing (only a SentencePiece tokenizer.model was "
                                   "found; a tokenizer.json is needed)")
        check_file(tj, "tokenizer file")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers error type is internal
            raise ModelFormatError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        cfg = {}
        tc = folder / "tokenizer_config.json"
        source = str(tc)
        if os.path.lexists(tc):
            cfg = read_json(tc, "tokenizer configuration")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if os.path.lexists(jinja_file):
            check_file(jinja_file, "chat template")
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ModelFormatError(f"{jinja_file}: not UTF-8 text ({e.reason})") from None
            source = str(jinja_file)
        elif not template and (folder / "chat_template.json").exists():
            template = read_json(folder / "chat_template.json", "chat template").get("chat_template")
            source = str(folder / "chat_template.json")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{source}: chat_template must be a string, not {type(template).__name__}")
        extra_eos = []
        gc = folder / "generation_config.json"
        if gc.exists():
            try:
                e = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id")
                extra_eos = e if isinstance(e, list) else ([e] if isinstance(e, int) else [])
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                pass
        return cls(backend, cfg, template, extra_eos, template_source=source)

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> set[int]:
        """Ids of the added tokens (special tokens such as <|im_start|>, and any others added)."""
        return {int(i) for i in self._tok.get_added_tokens_decoder()}

    def token_to_id(self, token: str | None):
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. <|im_start|>) become their ids;
        no BOS/EOS is added (chat templates write them themselves)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        """-> (ids, offsets): offsets[i] = (start, end) character span of token i in text."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render a conversation with the model's template in a guarded Jinja sandbox (see the
        limits above). The first render also vets the template (check_chat_template)."""
        self.check_chat_template()
        return self._render(messages, add_generation_prompt, **kwargs)

    def check_chat_template(self) -> None:
        """Compile and vet the chat template once; ModelFormatError, naming its file, when it has
        none, does not compile, runs away, or fails on every ordinary conversation."""
        if self._template is not None:
            return
        if not self.chat_template:
            raise ModelFormatError(f"{self.template_source}: this tokenizer has no chat_template")
        try:
            self._template = _make_env().from_string(self.chat_template)
        except Exception as e:  # noqa: BLE001
            raise ModelFormatError(f"{self.template_source}: the chat template does not compile: {e}") from None
        self._vet()

    def _render(self, messages, add_generation_prompt: bool, tracer=None, **kwargs) -> str:
        ctx = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                   pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                   add_generation_prompt=add_generation_prompt)
        ctx.update(kwargs)
        from jinja2.exceptions import TemplateError

        _deadline.t = time.monotonic() + TEMPLATE_SECONDS
        old = sys.gettrace() if tracer is not None else None
        if tracer is not None:
            sys.settrace(tracer)
        gen = self._template.generate(messages=[dict(m) for m in messages], **ctx)
        try:
            parts, n = [], 0
            for piece in gen:
                n += len(piece)
                if n > MAX_TEMPLATE_OUTPUT:
                    raise TemplateLimitError(f"the rendered text is longer than {MAX_TEMPLATE_OUTPUT:,} characters")
                parts.append(piece)
                _check_deadline()
            return "".join(parts)
        except TemplateLimitError as e:
            raise ModelFormatError(f"{self.template_source}: the chat template was stopped: {e}") from None
        except (TemplateError, OverflowError, MemoryError, RecursionError) as e:  # the sandbox's SecurityError too
            raise ModelFormatError(f"{self.template_source}: the chat template failed: {e}") from None
        finally:
            if tracer is not None:
                tracer.active = False
                sys.settrace(old)
            _deadline.t = None
            gen.close()  # a render stopped half-way: end the template's frame now, not at garbage collection

    def _vet(self) -> None:
        """Render small synthetic chats under the tracer, so a template that runs away on its own,
        or that fails on every ordinary conversation, is refused when the tokenizer is first used
        (a problem of the model folder, not of the training data)."""
        errors = []
        for msgs in VET_CHATS:
            try:
                self._render(msgs, True, tracer=_Tracer())
                return
            except ModelFormatError as e:
                if "was stopped" in str(e):
                    self._template = None
                    raise
                errors.append(e)
        self._template = None
        raise ModelFormatError(f"{errors[0]} (it fails on every ordinary conversation tried)")


class StreamDecoder:
    """Turns a stream of ids into text pieces without breaking multi-byte characters (Korean
    syllables are often split across byte-level tokens)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next byte(s)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece

    @property
    def text(self) -> str:
        return self.emitted
