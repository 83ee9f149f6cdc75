"""Weight snapshots for the weights view: what changed since the start, small enough to draw.

For each chosen matrix W (out, in) a snapshot carries
  matrices[name]  the change since the start, W - W0 (full fine-tuning) or scale * B @ A (LoRA),
                  block-averaged down to at most max_size x max_size;
  current[name]   the current values, block-averaged the same way (down(W0) + down(change): block
                  averaging is linear, so down(W0) is computed once);
and per layer ("layer 0" ..)
  relative_update ||W_after - W_before|| / ||W0|| of this step's update, over the layer's chosen
                  matrices (the effective weights W0 + scale B A with LoRA; computed from small
                  (2r, 2r) products, never a full-size matrix);
  grad_norms      the L2 norm of the layer's gradients (before clipping).
Bias vectors are sent now and at the start. Every array in a snapshot is a fresh copy or a
read-only array that the loop never writes again, so a receiver on another thread may keep it.
"""
from __future__ import annotations

import re

import numpy as np

from ..engine.lora import lora_names
from ..engine.model import ATTN, MLP
from .events import WeightSnapshot

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _blocks(n: int, max_size: int):
    b = -(-n // max_size)
    starts = np.arange(0, n, b)
    return starts, np.diff(np.append(starts, n))


def down_rows(M: np.ndarray, max_size: int = 64) -> np.ndarray:
    """Block-average axis 0 to at most max_size rows."""
    starts, cnt = _blocks(M.shape[0], max_size)
    if len(starts) == M.shape[0]:
        return np.array(M, dtype=np.float32)
    return (np.add.reduceat(M, starts, axis=0) / cnt[:, None]).astype(np.float32)


def down_cols(M: np.ndarray, max_size: int = 64) -> np.ndarray:
    """Block-average axis 1 to at most max_size columns."""
    starts, cnt = _blocks(M.shape[1], max_size)
    if len(starts) == M.shape[1]:
        return np.array(M, dtype=np.float32)
    return (np.add.reduceat(M, starts, axis=1) / cnt[None, :]).astype(np.float32)


def downsample(M: np.ndarray, max_size: int = 64) -> np.ndarray:
    """Block-average a matrix (or vector) to at most max_size per axis (uneven last blocks allowed).
    For a product, downsample(B @ A) == down_rows(B) @ down_cols(A): averaging is linear and the
    row and column blocks separate, so LoRA deltas never need their full-size product."""
    M = np.asarray(M, dtype=np.float32)
    if M.ndim == 1:
        return downsample(M[None], max_size)[0]
    return down_rows(down_cols(M, max_size), max_size)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def default_matrix_names(model) -> list[str]:
    """Every attention and MLP projection of every layer (with LoRA: the adapted ones)."""
    out = []
    targets = model.lora_config.target_modules if model.lora is not None else ATTN + MLP
    for l in range(model.config.num_hidden_layers):
        for mod in ATTN:
            if mod in targets:
                out.append(f"model.layers.{l}.self_attn.{mod}.weight")
        for mod in MLP:
            if mod in targets:
                out.append(f"model.layers.{l}.mlp.{mod}.weight")
    return out


class SnapshotMaker:
    def __init__(self, model, matrix_names=None, max_size: int = 64, bins: int = 40):
        self.model = model
        self.use_lora = model.lora is not None
        self.max_size = max_size
        names = list(matrix_names) if matrix_names else default_matrix_names(model)
        self.names = [n for n in names if n in model.params]
        p = model.params
        # W0: with LoRA the base weights are frozen, so the live arrays are the start values
        self.W0 = {n: (p[n] if self.use_lora else p[n].copy()) for n in self.names}
        self.W0_small = {n: _readonly(downsample(self.W0[n], max_size)) for n in self.names}
        self.bias_names = [n for n in p if n.endswith(".bias") and layer_of(n) is not None]
        self.b0 = {n: _readonly(p[n].copy()) for n in self.bias_names}
        lim = {n: float(np.abs(self.W0[n]).max()) * 1.25 + 1e-8 for n in self.names}
        self.edges = {n: _readonly(np.linspace(-lim[n], lim[n], bins + 1).astype(np.float32)) for n in self.names}
        self.layers = model.config.num_hidden_layers
        w0_sq = [0.0] * self.layers
        for n in self.names:
            l = layer_of(n)
            if l is not None:
                w0_sq[l] += float(np.vdot(self.W0[n], self.W0[n]))
        self.w0_norm = [float(np.sqrt(x)) for x in w0_sq]

    # ------------------------------------------------------------------ pieces
    def _lora_ab(self, name: str, src: dict | None = None):
        src = self.model.lora if src is None else src
        an, bn = lora_names(name)
        if an not in src:
            return None, None
        return src[an], src[bn]

    def _delta_small(self, name: str) -> np.ndarray:
        """down(change since start) without forming a full-size matrix for LoRA."""
        if self.use_lora:
            A, B = self._lora_ab(name)
            if A is None:
                return np.zeros_like(self.W0_small[name])
            return (self.model.lora_config.scale * (down_rows(B, self.max_size) @ down_cols(A, self.max_size))
                    ).astype(np.float32)
        return downsample(self.model.params[name] - self.W0[name], self.max_size)

    def _step_change_sq(self, name: str, before: dict) -> float:
        """||W_after - W_before||^2 of this step's LoRA update of the effective weight W0 + s B A."""
        A1, B1 = self._lora_ab(name)
        if A1 is None:
            return 0.0
        A0, B0 = self._lora_ab(name, before)
        # B1 A1 - B0 A0 = (B1 - B0) A1 + B0 (A1 - A0) = U V with U = [dB, B0], V = [A1; dA]
        U = np.concatenate([B1 - B0, B0], axis=1).astype(np.float64)  # (out, 2r)
        V = np.concatenate([A1, A1 - A0], axis=0).astype(np.float64)  # (2r, in)
        s = self.model.lora_config.scale
        return float(s * s * np.trace((U.T @ U) @ (V @ V.T)))  # ||U V||_F^2 from (2r, 2r) products

    def before_update(self) -> dict | None:
        """Copies of what this step's update will change (taken only on snapshot steps). Full
        fine-tuning needs none: the optimizer reports each tensor's relative update itself."""
        if not self.use_lora:
            return None
        out = {}
        for n in self.names:
            an, bn = lora_names(n)
            if an in self.model.lora:
                out[an] = self.model.lora[an].copy()
                out[bn] = self.model.lora[bn].copy()
        return out

    def grad_norms(self, grads: dict) -> dict[str, float]:
        sq = [0.0] * self.layers
        for k, g in grads.items():
            l = layer_of(k)
            if l is not None:
                sq[l] += float(np.vdot(g, g))
        return {f"layer {l}": float(np.sqrt(s)) for l, s in enumerate(sq)}

    def tensor_grad_norms(self, grads: dict) -> dict[str, float]:
        """L2 norm of each tensor's gradient; with LoRA, A and B of one matrix together, under the
        matrix's name."""
        sq: dict[str, float] = {}
        for k, g in grads.items():
            name = k.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
            sq[name] = sq.get(name, 0.0) + float(np.vdot(g, g))
        return {k: float(np.sqrt(v)) for k, v in sq.items()}

    def update_ratios(self, before: dict | None, optimizer_rel: dict[str, float]) -> dict[str, float]:
        """||change|| / ||weight|| of this step's update per tensor: the optimizer's own numbers
        for full fine-tuning; for LoRA, the change of the effective weight W0 + s B A relative to
        W0, per adapted matrix."""
        if not self.use_lora:
            return dict(optimizer_rel)
        out = {}
        for n in self.names:
            if before is not None and lora_names(n)[0] in before:
                w0 = float(np.sqrt(np.vdot(self.W0[n], self.W0[n])))
                out[n] = float(np.sqrt(max(self._step_change_sq(n, before), 0.0))) / w0 if w0 > 0 else 0.0
        return out

    def focus_values(self, name: str) -> np.ndarray:
        """Full-size current values of one matrix."""
        if self.use_lora:
            A, B = self._lora_ab(name)
            if A is None:
                return self.W0[name]
            return self.W0[name] + self.model.lora_config.scale * (B @ A)
        return self.model.params[name]

    # ------------------------------------------------------------------ the snapshot
    def build(self, step: int, before: dict | None, grad_norms: dict[str, float], focus: str | None = None,
              optimizer_rel: dict[str, float] | None = None) -> WeightSnapshot:
        """Matrices' change since start and current values (downsampled), per-layer relative size
        of this step's update ||W_after - W_before|| / ||W0||, gradient norms, biases now/start.
        With full fine-tuning the step's change comes from optimizer_rel (adamw_step's
        ||dW|| / ||W|| per tensor) times ||W||, so no copy of the weights is needed."""
        matrices, current = {}, {}
        upd_sq = [0.0] * self.layers
        for n in self.names:
            small = self._delta_small(n)
            matrices[n] = small
            current[n] = self.W0_small[n] + small
            l = layer_of(n)
            if l is None:
                continue
            if self.use_lora and before is not None:
                upd_sq[l] += self._step_change_sq(n, before)
            elif not self.use_lora and optimizer_rel is not None and n in optimizer_rel:
                w = self.model.params[n]
                upd_sq[l] += (optimizer_rel[n] ** 2) * float(np.vdot(w, w))
        rel = {f"layer {l}": (float(np.sqrt(max(upd_sq[l], 0.0))) / self.w0_norm[l] if self.w0_norm[l] > 0 else 0.0)
               for l in range(self.layers)}
        focus = focus if focus in self.W0 else (self.names[0] if self.names else None)
        hist = (np.zeros(0), np.zeros(0))
        if focus is not None:
            counts, _ = np.histogram(self.focus_values(focus), bins=self.edges[focus])
            hist = (counts.astype(np.float32), self.edges[focus])
        p = self.model.params
        biases = {n: (p[n].copy(), self.b0[n]) for n in self.bias_names}
        return WeightSnapshot(step=step, matrices=matrices, current=current, biases=biases,
                              relative_update=rel, grad_norms=dict(grad_norms), histogram=hist)
