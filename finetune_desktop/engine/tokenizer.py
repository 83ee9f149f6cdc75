"""Tokenizer: HF `tokenizers` (tokenizer.json) plus the model's chat template, rendered in a
sandboxed Jinja environment (templates come from model folders and are untrusted)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
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


def _make_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def template_with_default_system(template: str, system_prompt: str) -> str:
    """The chat template, preceded by a line that adds `system_prompt` as the first message when a
    conversation has no system message of its own (as Qwen's templates do with their default)."""
    lit = json.dumps(system_prompt, ensure_ascii=False)  # JSON escapes are valid Jinja string escapes
    head = ("{%- set messages = messages if (messages and messages[0]['role'] == 'system') "
            f"else [{{'role': 'system', 'content': {lit}}}] + messages %}}")
    return head + template


class Tokenizer:
    def __init__(self, backend, config: dict | None = None, chat_template: str | None = None,
                 extra_eos_ids: Iterable[int] = ()):
        self._tok = backend
        self.backend = backend  # the `tokenizers.Tokenizer` (batch encoding, offsets)
        self.config = dict(config or {})
        self.chat_template = chat_template
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

        from .checkpoint import model_folder

        folder = model_folder(folder)
        tj = folder / "tokenizer.json"
        if not tj.exists():
            extra = ""
            if (folder / "tokenizer.model").exists():
                extra = " (only a SentencePiece tokenizer.model was found; a tokenizer.json is needed)"
            raise ModelFormatError(f"{tj}: tokenizer file is missing{extra}")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers error type is internal
            raise ModelFormatError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        cfg = {}
        tc = folder / "tokenizer_config.json"
        if tc.exists():
            try:
                cfg = json.loads(tc.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{tc}: not valid JSON ({e})") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        elif not template and (folder / "chat_template.json").exists():
            try:
                template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                template = None
        extra_eos = []
        gc = folder / "generation_config.json"
        if gc.exists():
            try:
                e = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id")
                extra_eos = e if isinstance(e, list) else ([e] if isinstance(e, int) else [])
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                pass
        return cls(backend, cfg, template, extra_eos)

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

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
        """Render a conversation with the model's template in a Jinja sandbox."""
        if not self.chat_template:
            raise ModelFormatError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        if self._template is None:
            try:
                self._template = _make_env().from_string(self.chat_template)
            except Exception as e:  # noqa: BLE001
                raise ModelFormatError(f"chat template does not compile: {e}") from None
        ctx = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                   pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                   add_generation_prompt=add_generation_prompt)
        ctx.update(kwargs)
        from jinja2.exceptions import TemplateError
        try:
            return self._template.render(messages=[dict(m) for m in messages], **ctx)
        except TemplateError as e:  # includes the sandbox's SecurityError
            raise ModelFormatError(f"chat template failed: {e}") from None


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
