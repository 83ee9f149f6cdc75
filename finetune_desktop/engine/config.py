"""ModelConfig: the decoder-only transformer's shape, read from and written to HF `config.json`.

Supported families: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM. Anything that
would change the maths in a way this engine does not implement is refused with a clear
error instead of giving silently wrong numbers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError

__all__ = ["ModelConfig", "ModelFormatError"]


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Sane bounds, checked before anything is allocated: a config.json from a model folder decides
# how much memory the model takes, so absurd values are refused with the field's name.
INT_BOUNDS = {
    "vocab_size": (1, 4_000_000), "hidden_size": (1, 65_536), "intermediate_size": (1, 1_048_576),
    "num_hidden_layers": (1, 1_024), "num_attention_heads": (1, 4_096), "num_key_value_heads": (1, 4_096),
    "head_dim": (2, 4_096), "max_position_embeddings": (1, 10_000_000), "sliding_window": (1, 10_000_000),
}
MAX_PARAMETERS = 200_000_000_000


def _int_field(d: dict, key: str, source: str, default=None, required: bool = False):
    v = d.get(key, default)
    if v is None:
        if required:
            raise ModelFormatError(f"{source}: {key} must be a whole number, not null")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ModelFormatError(f"{source}: {key} must be a whole number, not {v!r}")
    lo, hi = INT_BOUNDS[key]
    if not lo <= v <= hi:
        raise ModelFormatError(f"{source}: {key} = {v} is outside the sane range {lo:,}..{hi:,}")
    return int(v)


def _float_field(d: dict, key: str, source: str, default: float, lo: float, hi: float, inclusive_lo=False) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ModelFormatError(f"{source}: {key} must be a finite number, not {v!r}")
    if not ((lo <= v) if inclusive_lo else (lo < v)) or v > hi:
        raise ModelFormatError(f"{source}: {key} = {v} must be {'at least' if inclusive_lo else 'above'} {lo} "
                               f"and at most {hi}")
    return float(v)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256                 # C
    intermediate_size: int = 688           # I, the SwiGLU width
    num_hidden_layers: int = 6             # L
    num_attention_heads: int = 8           # H
    num_key_value_heads: int | None = None # KVH (grouped-query attention); None = H
    head_dim: int | None = None            # hd; None = C // H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # bias on q, k, v and o (Llama)
    qkv_bias: bool = False                 # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False                 # bias on gate, up and down (Llama)
    sliding_window: int | None = None      # Mistral: each query sees the last `sliding_window` keys
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict, compare=False)  # other keys, written back unchanged

    # ---------------------------------------------------------------- derived
    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias

    @property
    def architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM"}[self.model_type]

    def validate(self, source: str = "config.json") -> None:
        if self.num_attention_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.n_kv_heads})")
        if self.hd % 2 or self.hd < 2:
            raise ModelFormatError(f"{source}: head_dim must be even for RoPE, got {self.hd}")
        if self.hidden_act not in ("silu", "swish"):
            raise ModelFormatError(f"{source}: hidden_act {self.hidden_act!r} is not supported (only silu)")
        rt = (self.rope_scaling or {}).get("rope_type", "default")
        if rt not in SUPPORTED_ROPE_TYPES:
            raise ModelFormatError(
                f"{source}: rope scaling type {rt!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ModelFormatError(f"{source}: rms_norm_eps must be above 0, got {self.rms_norm_eps}")
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise ModelFormatError(f"{source}: these sizes make {n:,} parameters, more than any model this app "
                                   f"can load ({MAX_PARAMETERS:,})")

    def num_parameters(self) -> int:
        C, I, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.hd
        kv = self.n_kv_heads * self.hd
        per = C * (q + 2 * kv) + q * C + 3 * C * I + 2 * C
        if self.has_qkv_bias:
            per += q + 2 * kv
        if self.has_o_bias:
            per += C
        if self.mlp_bias:
            per += 2 * I + C
        n = V * C + L * per + C
        if not self.tie_word_embeddings:
            n += V * C
        return n

    # ---------------------------------------------------------------- rope
    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (hd/2,), float64, with the configured scaling applied."""
        hd = self.hd
        inv = 1.0 / (self.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float64) / hd))
        sc = self.rope_scaling or {}
        rt = sc.get("rope_type", "default")
        if rt == "linear":
            inv = inv / float(sc["factor"])
        elif rt == "llama3":
            factor = float(sc["factor"])
            low = float(sc.get("low_freq_factor", 1.0))
            high = float(sc.get("high_freq_factor", 4.0))
            old_ctx = float(sc.get("original_max_position_embeddings", 8192))
            low_wl, high_wl = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wl) & (wavelen <= low_wl)
            inv = np.where(medium, smoothed, scaled)
        return inv

    # ---------------------------------------------------------------- HF json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ModelFormatError(f"{source}: architectures must be a list of names")
        mt = d.get("model_type")
        arch = archs[0] if archs else None
        if arch is not None and arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if arch is None and mt not in SUPPORTED_ARCHITECTURES.values():
            raise ModelFormatError(f"{source}: unknown model_type {mt!r} and no supported 'architectures' entry")
        model_type = SUPPORTED_ARCHITECTURES.get(arch, mt)
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelFormatError(f"{source}: missing required key(s): {', '.join(missing)}")
        sizes = {k: _int_field(d, k, source, required=True) for k in required}
        kv = _int_field(d, "num_key_value_heads", source)
        head_dim = _int_field(d, "head_dim", source)
        max_pos = _int_field(d, "max_position_embeddings", source, default=2048) or 2048
        eps = _float_field(d, "rms_norm_eps", source, 1e-6, 0.0, 1.0)

        # RoPE: transformers v4 uses rope_theta + rope_scaling, v5 uses rope_parameters.
        rp = d.get("rope_parameters")
        rope_theta = d.get("rope_theta")
        scaling = d.get("rope_scaling")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                rope_theta = rp["rope_theta"]
            rt = rp.get("rope_type", rp.get("type", "default"))
            if rt != "default":
                scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            if "rope_type" not in scaling and "type" in scaling:
                scaling["rope_type"] = scaling.pop("type")
            if scaling.get("rope_type", "default") == "default":
                scaling = None
        if rope_theta is None:
            rope_theta = 10000.0  # transformers' default for all three families
        rope_theta = _float_field({"rope_theta": rope_theta}, "rope_theta", source, 10000.0, 0.0, 1e12)
        if scaling is not None and not isinstance(scaling, dict):
            raise ModelFormatError(f"{source}: rope_scaling must be an object or null")

        sliding = None
        L = int(d["num_hidden_layers"])
        if model_type == "mistral":
            sliding = d.get("sliding_window", 4096)  # transformers' default when the key is absent
        elif model_type == "qwen2":
            # transformers: a layer slides when use_sliding_window and its index >= max_window_layers
            # (default 28), unless config.json lists layer_types explicitly.
            sw = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
            kinds = d.get("layer_types")
            if not isinstance(kinds, list) or len(kinds) != L:
                maxw = d.get("max_window_layers", 28)
                kinds = ["sliding_attention" if sw is not None and i >= maxw else "full_attention" for i in range(L)]
            if sw is None or "sliding_attention" not in kinds:
                sliding = None
            elif set(kinds) == {"sliding_attention"}:
                sliding = sw
            else:
                raise ModelFormatError(
                    f"{source}: Qwen2 sliding-window attention on only some layers is not supported "
                    f"({kinds.count('sliding_attention')} of {L} layers slide)")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ModelFormatError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported")
        if d.get("attention_dropout", 0.0) not in (0, 0.0):
            raise ModelFormatError(f"{source}: attention_dropout is not supported")

        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
            "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
            "use_sliding_window", "max_window_layers", "model_type", "architectures", "bos_token_id",
            "eos_token_id", "pad_token_id", "hidden_act", "torch_dtype", "dtype", "transformers_version",
            "pretraining_tp", "attention_dropout", "initializer_range", "use_cache", "layer_types",
        }
        cfg = cls(
            **sizes,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) if model_type != "qwen2" else False,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=_int_field({"sliding_window": sliding}, "sliding_window", source) if sliding else None,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hidden_act=d.get("hidden_act", "silu"),
            extra={k: v for k, v in d.items() if k not in known},
        )
        cfg.validate(source)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.hd,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
            "attention_dropout": 0.0,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            slides = self.sliding_window is not None
            d["use_sliding_window"] = slides
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0 if slides else self.num_hidden_layers
            d["layer_types"] = ["sliding_attention" if slides else "full_attention"] * self.num_hidden_layers
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        from .checkpoint import read_json

        path = Path(path)
        return cls.from_hf_dict(read_json(path, "config.json"), source=str(path))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
