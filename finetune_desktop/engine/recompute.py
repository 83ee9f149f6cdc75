"""Activation checkpointing: what a layer keeps when its activations are not stored (its input
and the random state of its LoRA dropout), so that the backward can run its forward again and
get exactly the same numbers (Model.activation_checkpointing)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Recompute:
    """What a checkpointed layer keeps for the backward: its input and how to run it again."""
    x: np.ndarray          # the residual stream entering the layer (B, T, C)
    rng_state: object       # the LoRA-dropout generators' state at the layer's start (or None)
    ctx: tuple             # (cos, sin, mask_bias, train, eff) shared by the shard's layers


def rng_state(rng):
    """The state of a generator, or of a list of them (one per batch row)."""
    if isinstance(rng, list):
        return [g.bit_generator.state for g in rng]
    return rng.bit_generator.state


def rng_from_state(state):
    """Fresh generators that continue exactly where rng_state's left off."""
    if state is None:
        return None
    if isinstance(state, list):
        return [rng_from_state(st) for st in state]
    g = np.random.default_rng()
    g.bit_generator.state = state
    return g
