"""Export a model (a run's merged model/, a model folder, 'base' or a cached repo id) to one GGUF
file for llama.cpp, Ollama and LM Studio, written with the `gguf` package (llama.cpp's own
writer), plus an Ollama Modelfile beside it.

What the file carries, following llama.cpp's convert_hf_to_gguf.py:
  * architecture `llama` for Llama and Mistral, `qwen2` for Qwen2; sizes, context length, RoPE
    base (and linear or llama3 scaling), RMS-norm epsilon;
  * every tensor, biases included; for `llama`, q_proj and k_proj rows (weights and biases) are
    permuted the way llama.cpp's rotary embedding expects (its converter does the same; `qwen2`
    is not permuted); tied embeddings write no output.weight (llama.cpp then reuses token_embd);
  * the tokenizer: the byte-level BPE vocabulary, merges, token types, special token ids,
    add_bos, the pre-tokenizer name llama.cpp knows, and the chat template.

A tokenizer llama.cpp cannot reproduce exactly is refused, never approximated: the
pre-tokenizer must be GPT-2's ByteLevel regex ("gpt-2"), or the Llama-3 ("llama-bpe") or Qwen2
("qwen2") split regex compared character for character; SentencePiece / byte-fallback
tokenizers, other normalizers, and added tokens with strip rules are refused too.

Types: f32; f16 (matrices in f16, norms and biases f32); q8_0 (matrices in Q8_0 with gguf's
quantizer, norms and biases f32; a matrix whose rows do not split into 32-value blocks stays f16,
as llama.cpp's converter does). The file is written to a temp file and renamed into place.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.checkpoint import atomic_write_text
from ..engine.config import ModelConfig
from ..engine.tokenizer import END_OF_TURN_CANDIDATES
from .errors import InteropError, read_json_object

GGUF_TYPES = ("f32", "f16", "q8_0")

# The regexes llama.cpp implements, exactly as they appear in a tokenizer.json (after JSON decoding).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt-2"}

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str                       # llama.cpp's pre-tokenizer name
    add_bos: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eot_id: int | None
    chat_template: str | None
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    path: Path                     # the .gguf file
    modelfile: Path | None         # the Ollama Modelfile beside it
    architecture: str
    gguf_type: str
    num_tensors: int
    notes: list[str]               # things the user should know (e.g. no TEMPLATE in the Modelfile)


# ----------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(tj: dict, src: Path) -> str:
    """llama.cpp's name for the tokenizer.json's pre-tokenizer, or InteropError."""
    pre = tj.get("pre_tokenizer")
    if not isinstance(pre, dict):
        raise InteropError(f"{src}: pre_tokenizer is missing; llama.cpp needs a byte-level BPE pre-tokenizer")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise InteropError(f"{src}: pre_tokenizer ByteLevel with add_prefix_space=true has no llama.cpp equivalent")
        if not pre.get("use_regex", True):
            raise InteropError(f"{src}: pre_tokenizer ByteLevel without its regex has no llama.cpp equivalent")
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and isinstance(parts[0], dict) and isinstance(parts[1], dict)
                and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"):
            split, bl = parts
            pattern = split.get("pattern") or {}
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if (regex in SPLIT_REGEXES and split.get("behavior") == "Isolated" and not split.get("invert")
                    and not bl.get("add_prefix_space") and not bl.get("use_regex", True)):
                return SPLIT_REGEXES[regex]
            shown = (regex[:60] + "...") if isinstance(regex, str) and len(regex) > 60 else regex
            raise InteropError(
                f"{src}: pre_tokenizer split regex {shown!r} is not one llama.cpp implements exactly "
                "(known: GPT-2, Llama-3, Qwen2); the GGUF file would tokenize differently")
    raise InteropError(f"{src}: pre_tokenizer {kind!r} has no exact llama.cpp equivalent "
                       "(supported: byte-level BPE with the GPT-2, Llama-3 or Qwen2 regex)")


def _check_model_section(tj: dict, src: Path, pre: str) -> dict:
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise InteropError(f"{src}: model type {kind!r} is not byte-level BPE; only BPE tokenizers can be exported")
    if model.get("byte_fallback"):
        raise InteropError(f"{src}: model.byte_fallback=true (a SentencePiece-style tokenizer); llama.cpp needs the "
                           "SentencePiece model for that, which this export does not write")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise InteropError(f"{src}: model.{key}={model[key]!r} has no llama.cpp equivalent")
    ignore = bool(model.get("ignore_merges", False))
    if ignore != (pre == "llama-bpe"):
        raise InteropError(f"{src}: model.ignore_merges={str(ignore).lower()} does not match llama.cpp's "
                           f"{pre!r} pre-tokenizer (which {'ignores' if pre == 'llama-bpe' else 'applies'} merges)")
    return model


def _merges(model: dict, src: Path) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            if m.count(" ") != 1:
                raise InteropError(f"{src}: merge {m!r} is not two tokens separated by one space")
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            if " " in m[0] or " " in m[1]:
                raise InteropError(f"{src}: merge {m!r} has a space inside a token, which GGUF merges cannot hold")
            out.append(f"{m[0]} {m[1]}")
        else:
            raise InteropError(f"{src}: merge {m!r} is not a pair of tokens")
    return out


def _token_id(name, vocab_map: dict[str, int]):
    if isinstance(name, dict):
        name = name.get("content")
    return vocab_map.get(name) if isinstance(name, str) else None


def _add_bos(tj: dict, tcfg: dict, bos_id) -> bool:
    """Whether the HF tokenizer adds BOS to plain text (what llama.cpp's add_bos means)."""
    if isinstance(tcfg.get("add_bos_token"), bool):
        return bool(tcfg["add_bos_token"]) and bos_id is not None
    post = tj.get("post_processor")
    procs = [post]
    if isinstance(post, dict) and post.get("type") == "Sequence":
        procs = post.get("processors") or []
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0] if single else None
            if isinstance(first, dict) and "SpecialToken" in first:
                sp = first["SpecialToken"].get("id")
                ids = ((p.get("special_tokens") or {}).get(sp) or {}).get("ids") or []
                return bos_id is not None and ids == [bos_id]
    return False


def read_gguf_vocab(folder, cfg: ModelConfig) -> GGUFVocab:
    """The tokenizer of an HF folder as llama.cpp's gpt2-style vocabulary; InteropError when it
    cannot be represented exactly."""
    folder = Path(folder)
    src = folder / "tokenizer.json"
    if not src.exists():
        extra = " (only a SentencePiece tokenizer.model is there)" if (folder / "tokenizer.model").exists() else ""
        raise InteropError(f"{src}: file is missing{extra}; GGUF export needs a byte-level BPE tokenizer.json")
    tj = read_json_object(src)
    tcfg = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    notes: list[str] = []
    pre = _pre_tokenizer_name(tj, src)
    norm = tj.get("normalizer")
    if norm is not None:
        if isinstance(norm, dict) and norm.get("type") == "NFC" and pre == "qwen2":
            notes.append("the tokenizer NFC-normalizes text and llama.cpp does not; text typed normally is already "
                         "NFC and tokenizes the same, decomposed Unicode (NFD) may not")
        else:
            kind = norm.get("type") if isinstance(norm, dict) else norm
            raise InteropError(f"{src}: normalizer {kind!r} has no llama.cpp equivalent; the GGUF file would "
                               "tokenize differently")
    model = _check_model_section(tj, src, pre)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise InteropError(f"{src}: model.vocab is not a token -> id object")
    id_to_tok: dict[int, str] = {}
    types: dict[int, int] = {}
    for tok, i in vocab.items():
        if not isinstance(i, int) or i < 0:
            raise InteropError(f"{src}: model.vocab[{tok!r}] is not a token id")
        id_to_tok[i] = tok
        types[i] = NORMAL
    for k, at in enumerate(tj.get("added_tokens") or []):
        try:
            i, content = int(at["id"]), str(at["content"])
        except (KeyError, TypeError, ValueError):
            raise InteropError(f"{src}: added_tokens[{k}] has no id/content") from None
        for flag in ("lstrip", "rstrip", "single_word"):
            if at.get(flag):
                raise InteropError(f"{src}: added_tokens[{k}] ({content!r}) has {flag}=true, which llama.cpp "
                                   "does not reproduce for this token")
        if at.get("normalized") and norm is not None:
            raise InteropError(f"{src}: added_tokens[{k}] ({content!r}) is normalized before matching, "
                               "which llama.cpp does not do")
        id_to_tok[i] = content
        types[i] = CONTROL if at.get("special") else USER_DEFINED
    n = cfg.vocab_size
    too_big = [i for i in id_to_tok if i >= n]
    if too_big:
        raise InteropError(f"{src}: token id {max(too_big)} does not fit the model's vocab_size {n} (config.json)")
    tokens, ttypes = [], []
    for i in range(n):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            ttypes.append(types[i])
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(UNUSED)
    vmap = {t: i for i, t in id_to_tok.items()}
    bos = _token_id(tcfg.get("bos_token"), vmap)
    eos = _token_id(tcfg.get("eos_token"), vmap)
    pad = _token_id(tcfg.get("pad_token"), vmap)
    if eos is None:
        e = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) and cfg.eos_token_id else cfg.eos_token_id
        eos = e if isinstance(e, int) else None
    if bos is None and isinstance(cfg.bos_token_id, int) and "bos_token" not in tcfg:
        bos = cfg.bos_token_id
    if pad is None and isinstance(cfg.pad_token_id, int):
        pad = cfg.pad_token_id
    eot = next((vmap[t] for t in END_OF_TURN_CANDIDATES[:5] if t in vmap), None)
    template = _chat_template(folder, tcfg)
    return GGUFVocab(tokens, ttypes, _merges(model, src), pre, _add_bos(tj, tcfg, bos), bos, eos, pad, eot,
                     template, notes)


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    """The chat template the way engine.tokenizer.Tokenizer reads it."""
    from ..engine.tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(folder).chat_template
    except Exception:  # noqa: BLE001 - the vocabulary check above already named any tokenizer problem
        t = tcfg.get("chat_template")
        return t if isinstance(t, str) else None


# ----------------------------------------------------------------------------- tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise InteropError(f"tensor {hf_name!r} has no GGUF name")


def gguf_tensors(params: dict[str, np.ndarray], cfg: ModelConfig) -> list[tuple[str, str, np.ndarray]]:
    """-> [(gguf name, hf name, float32 array in llama.cpp's layout)], in a stable order."""
    arch = GGUF_ARCH[cfg.model_type]
    out = []
    for hf in sorted(params, key=_order_key):
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = np.ascontiguousarray(params[hf], dtype=np.float32)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            a = np.ascontiguousarray(permute_qk(a, cfg.num_attention_heads if ".q_proj." in hf else cfg.n_kv_heads))
        out.append((gguf_tensor_name(hf), hf, a))
    return out


def _order_key(name: str):
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def _encode(name: str, a: np.ndarray, gguf_type: str):
    """-> (array to write, raw ggml type or None)."""
    import gguf

    if a.ndim == 1 or gguf_type == "f32":
        return a.astype(np.float32), None
    if gguf_type == "f16" or a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# ----------------------------------------------------------------------------- checks
def check_exportable(cfg: ModelConfig) -> list[str]:
    """InteropError for a model llama.cpp would compute differently; -> notes."""
    notes = []
    if cfg.model_type not in GGUF_ARCH:
        raise InteropError(f"config.json: model_type {cfg.model_type!r} cannot be exported to GGUF")
    rt = (cfg.rope_scaling or {}).get("rope_type", "default")
    if rt == "llama3" and GGUF_ARCH[cfg.model_type] != "llama":
        raise InteropError(f"config.json: rope_scaling type llama3 on a {cfg.model_type} model has no "
                           "llama.cpp equivalent")
    if cfg.has_o_bias and cfg.model_type == "qwen2":
        raise InteropError("config.json: an o_proj bias on a qwen2 model is not loaded by llama.cpp")
    q = cfg.num_attention_heads * cfg.hd
    if (cfg.has_qkv_bias or cfg.has_o_bias) and GGUF_ARCH[cfg.model_type] == "llama" and q != cfg.hidden_size:
        raise InteropError(f"config.json: attention biases with num_attention_heads x head_dim ({q}) != hidden_size "
                           f"({cfg.hidden_size}) are not loaded by llama.cpp's llama architecture")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        notes.append(f"llama.cpp has no sliding-window attention for this architecture, so the GGUF context length "
                     f"is the window ({cfg.sliding_window} tokens) instead of {cfg.max_position_embeddings}")
    return notes


def _context_length(cfg: ModelConfig) -> int:
    if cfg.sliding_window is not None:
        return min(cfg.max_position_embeddings, cfg.sliding_window)
    return cfg.max_position_embeddings


# ----------------------------------------------------------------------------- writing
def write_gguf(path, params: dict[str, np.ndarray], cfg: ModelConfig, vocab: GGUFVocab, gguf_type: str = "f32",
               name: str = "model") -> int:
    """Write the GGUF file atomically; -> number of tensors."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise InteropError(f"unknown GGUF type {gguf_type!r} (choose {', '.join(GGUF_TYPES)})")
    arch = GGUF_ARCH[cfg.model_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch, use_temp_file=False)
        w.add_name(name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(_context_length(cfg))
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.hd)
        w.add_value_length(cfg.hd)
        w.add_rope_dimension_count(cfg.hd)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        rt = (cfg.rope_scaling or {}).get("rope_type", "default")
        if rt == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        # tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        if vocab.bos_id is not None:
            w.add_bos_token_id(vocab.bos_id)
        if vocab.eos_id is not None:
            w.add_eos_token_id(vocab.eos_id)
        if vocab.pad_id is not None:
            w.add_pad_token_id(vocab.pad_id)
        if vocab.eot_id is not None:
            w.add_eot_token_id(vocab.eot_id)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        n = 0
        if rt == "llama3":  # llama.cpp divides each RoPE frequency by rope_freqs[i]
            default = cfg.replace(rope_scaling=None).inv_freq()
            w.add_tensor("rope_freqs.weight", (default / cfg.inv_freq()).astype(np.float32))
            n += 1
        for gname, _, a in gguf_tensors(params, cfg):
            data, raw = _encode(gname, a, gguf_type)
            w.add_tensor(gname, data, raw_dtype=raw)
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return n


# ----------------------------------------------------------------------------- Ollama Modelfile
_S = "\ue000{}\ue001"  # sentinel contents (private-use characters)


def _role_blocks(render, roles=("system", "user", "assistant")):
    """Learn ({role: (prefix, suffix)}, generation prompt) of a template that writes each message
    as prefix + content + suffix, from renderings of growing conversations (each must extend the
    one before); None when the template is not of that shape. go_template then verifies the
    blocks on whole conversations."""
    msgs = [{"role": r, "content": _S.format(i)} for i, r in enumerate(roles)]
    blocks, prev = {}, ""
    for i, r in enumerate(roles):
        cur = render(msgs[: i + 1], False)
        if cur is None or not cur.startswith(prev):
            return None
        piece, s = cur[len(prev):], _S.format(i)
        if piece.count(s) != 1:
            return None
        k = piece.find(s)
        blocks[r] = (piece[:k], piece[k + len(s):])
        prev = cur
    full = render(msgs, True)
    if full is None or not full.startswith(prev):
        return None
    return blocks, full[len(prev):]


def go_template(render, default_system: str | None = None):
    """An Ollama (Go text/template) TEMPLATE equivalent to a chat template whose rendering is a
    concatenation of per-role blocks; None when that cannot be verified."""
    learned = _role_blocks(render)
    if learned is None:
        return None
    blocks, gen = learned
    # a template may add a default system message when the conversation has none
    only_user = render([{"role": "user", "content": _S.format(0)}], False)
    u_pre, u_suf = blocks["user"]
    if only_user is None or not only_user.endswith(u_pre + _S.format(0) + u_suf):
        return None
    implicit = only_user[: len(only_user) - len(u_pre + _S.format(0) + u_suf)]

    def go_literal(text: str) -> str:
        # Go template text outside actions is copied verbatim; only "{{" needs escaping
        return text.replace("{{", '{{ "{{" }}')

    parts = []
    if implicit:
        parts.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     + go_literal(implicit) + "{{ end }}")
    parts.append("{{ range .Messages }}")
    first = True
    for role in ("system", "user", "assistant"):
        pre, suf = blocks[role]
        kw = "if" if first else "else if"
        parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}' + go_literal(pre) + "{{ .Content }}" + go_literal(suf))
        first = False
    parts.append("{{ end }}{{ end }}")
    parts.append(go_literal(gen))
    tmpl = "".join(parts)

    # verify on conversations of several shapes, with awkward contents, that the blocks model the
    # template exactly (this is what the Go template will produce)
    samples = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": " sys \n"}, {"role": "user", "content": "a\n\nb "},
         {"role": "assistant", "content": "  reply\n"}, {"role": "user", "content": "안녕하세요"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
    ]
    for conv in samples:
        expect = render(conv, True)
        got = "" if conv[0]["role"] == "system" else implicit
        for m in conv:
            pre, suf = blocks[m["role"]]
            got += pre + m["content"] + suf
        got += gen
        if expect != got:
            return None
    return tmpl


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], note: str | None = None) -> str:
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    elif note:
        lines.append(f"# {note}")
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tok) -> tuple[Path, list[str]]:
    """Write folder/Modelfile for the GGUF file; -> (path, notes)."""
    notes = []

    def render(msgs, gen):
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt=gen)
        except Exception:  # noqa: BLE001
            return None

    template = go_template(render) if tok.chat_template else None
    note = None
    if template is None:
        note = ("no TEMPLATE: this model's chat template could not be translated to Ollama's template language "
                "exactly; Ollama then uses the raw prompt")
        notes.append(note)
    if template is not None and ('"""' in template):
        notes.append("no TEMPLATE: the chat template contains three double quotes, which a Modelfile cannot hold")
        template, note = None, notes[-1]
    stops = [tok.id_to_token(i) for i in tok.end_of_turn_ids]
    stops = [s for s in stops if s and '"' not in s and "\n" not in s]
    path = Path(folder) / "Modelfile"
    atomic_write_text(path, modelfile_text(gguf_name, template, stops, note))
    return path, notes


# ----------------------------------------------------------------------------- entry point
def export_gguf(spec: str, out, gguf_type: str = "f32", modelfile: bool = True) -> ExportResult:
    """Export a model spec ('base', a model folder, a run folder, a cached repo id) to a GGUF file
    (`out`: a .gguf path, or a folder to put model.gguf in) and an Ollama Modelfile beside it."""
    from ..training.loading import open_model

    if gguf_type not in GGUF_TYPES:
        raise InteropError(f"unknown GGUF type {gguf_type!r} (choose {', '.join(GGUF_TYPES)})")
    model, tok, folder, run_dir = open_model(spec, InteropError)
    cfg = model.config
    notes = check_exportable(cfg)
    vocab = read_gguf_vocab(folder, cfg)
    notes += vocab.notes
    out = Path(out).expanduser()
    if out.is_dir() or (not out.suffix and not out.exists()):
        out = out / "model.gguf"
    name = (run_dir.name if run_dir is not None else Path(folder).name) or "model"
    params = model.merged_params()
    n = write_gguf(out, params, cfg, vocab, gguf_type, name=name)
    mf = None
    if modelfile:
        mf, more = write_modelfile(out.parent, out.name, tok)
        notes += more
    return ExportResult(out, mf, GGUF_ARCH[cfg.model_type], gguf_type, n, notes)
