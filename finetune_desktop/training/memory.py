"""Peak-memory estimate for a training run, checked before it starts.

The estimate adds up, in bytes (float32 = 4 bytes):
  weights           all parameters (+ one merged copy when the model is saved; with LoRA one more,
                    the weights with the adapters folded in for the step)
  trainable state   trainable params x 3 (gradients, AdamW m and v) + W0 copies for the weights view
  activations       what the forward keeps for the backward, for the largest batch (B, T):
                    per layer about (12 C + 6 I) B T floats + the attention probabilities
                    B H T T (twice: the probabilities and the backward's temporary)
  logits            B T V x 3 (logits, the softmax inside the loss, dlogits)
  runtime           Python + numpy + tokenizers, about 150 MB
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..engine.config import ModelConfig

RUNTIME_BYTES = 150 * 2**20
SAFETY = 0.85  # refuse when the estimate is above this fraction of the available memory


@dataclass(frozen=True)
class MemoryEstimate:
    total_bytes: int
    parts: dict          # name -> bytes
    available_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= SAFETY * self.available_bytes

    def explain(self) -> str:
        mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
        parts = ", ".join(f"{k} {mb(v)}" for k, v in self.parts.items())
        avail = "unknown" if self.available_bytes is None else mb(self.available_bytes)
        return f"estimated peak memory {mb(self.total_bytes)} ({parts}); available {avail}"


def available_memory_bytes() -> int | None:
    """Memory the process can still use: psutil if present, else /proc/meminfo, else sysconf."""
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - optional dependency
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_peak_memory(cfg: ModelConfig, num_params: int, trainable_params: int, batch_size: int,
                         seq_len: int, full: bool, available: int | None = -1) -> MemoryEstimate:
    B, T = max(1, batch_size), max(1, seq_len)
    C, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    f = 4
    weights = num_params * f * 2  # the weights + one merged copy while saving
    if not full:
        weights += num_params * f  # LoRA: the step's weights with the adapters folded in (Model._lora_effective_weights)
    state = trainable_params * f * 3
    if full:
        state += num_params * f  # W0 copies for the change-since-start view
    acts = L * ((12 * C + 6 * I) * B * T + 2 * B * H * T * T) * f
    logits = 3 * B * T * V * f
    parts = {"weights": weights, "optimizer": state, "activations": acts, "logits": logits, "runtime": RUNTIME_BYTES}
    if available == -1:
        available = available_memory_bytes()
    return MemoryEstimate(total_bytes=int(sum(parts.values())), parts=parts, available_bytes=available)
