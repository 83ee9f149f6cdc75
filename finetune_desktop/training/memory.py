"""Peak-memory estimate for a training run, checked before it starts.

The estimate adds up, in bytes (float32 = 4 bytes), for a training step:
  weights           all parameters, once (q/k/v and gate/up are stacked in place, not copied);
                    with LoRA on a small model, one more copy of the adapted weights with the
                    adapters folded in (engine/lora.merging_pays_off)
  trainable state   trainable params x 3 (gradients, AdamW m and v) + the starting weights that
                    the weights view compares with (full fine-tuning)
  activations       what the forward keeps for the backward, for the largest batch (B, T):
                    per layer about (12 C + 2 I) B T floats + the attention probabilities B H T T;
                    with activation checkpointing, each layer's input (B T C) + one layer's worth
  output layer      the final hidden states and their gradient (2 B T C) + two chunks of logits
                    (the loss is computed a chunk of rows at a time, never for the whole batch)
  runtime           Python + numpy + tokenizers, about 150 MB
Saving the model at the end makes one merged copy of the weights, after the activations are
gone; the estimate is the larger of the two moments. Fitted to measured peaks (bench/real_models.py,
VmHWM): a SmolLM2-135M shape, LoRA 4 x 256: 2.2 GB measured; a Qwen2.5-0.5B shape, LoRA 1 x 512:
3.5 GB.
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
                         seq_len: int, full: bool, available: int | None = -1,
                         checkpointing: bool = False) -> MemoryEstimate:
    B, T = max(1, batch_size), max(1, seq_len)
    C, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    f = 4
    weights = num_params * f
    if not full:
        from ..engine.lora import MERGE_MAX_WEIGHTS

        adapted = L * C * (C + 2 * cfg.n_kv_heads * cfg.hd + C + 3 * I)  # q, k, v, o, gate, up, down
        if adapted <= MERGE_MAX_WEIGHTS:
            weights += adapted * f  # the step's weights with the adapters folded in
    state = trainable_params * f * 3
    if full:
        state += num_params * f  # starting weights for the change-since-start view
    layer = ((12 * C + 2 * I) * B * T + B * H * T * T) * f
    acts = (L * B * T * C * f + layer) if checkpointing else L * layer  # checkpointing: layer inputs + one layer
    from ..engine.loss import head_chunk_rows

    chunk = head_chunk_rows(V)
    head = (2 * B * T * C + 2 * chunk * V) * f
    step = weights + state + acts + head + RUNTIME_BYTES
    save = 2 * num_params * f + state + RUNTIME_BYTES
    parts = {"weights": weights, "optimizer": state, "activations": acts, "output layer": head,
             "runtime": RUNTIME_BYTES}
    if save > step:
        parts["saving"] = save - step
    if available == -1:
        available = available_memory_bytes()
    return MemoryEstimate(total_bytes=int(sum(parts.values())), parts=parts, available_bytes=available)
