"""Forward/backward pairs of every op in the transformer, side by side.

Each op is a pair `x_forward(...) -> (y, cache)` and `x_backward(dy, cache) -> (dx, grads...)`,
with the cache an explicit tuple. Ops keep the dtype of their inputs, so the gradient tests
run them in float64 while the model runs them in float32.

Shape legend:
    B  batch size              T  sequence length (queries)      S  key length (cache + T)
    C  hidden size             V  vocabulary size                I  SwiGLU width
    H  query heads             KVH key/value heads               G  = H // KVH (queries per KV head)
    hd head dim                N  = B * T (flattened tokens)
"""
from __future__ import annotations

import numpy as np

from .parallel import matmul, rowwise, run_all, spare

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- embedding
def embedding_forward(ids, W):
    """ids (B, T) int, W (V, C) -> x (B, T, C)."""
    return W[ids], (ids, W.shape)


def embedding_backward(dx, cache):
    """dx (B, T, C) -> dW (V, C): rows scatter-added at the looked-up ids."""
    ids, wshape = cache
    dW = np.zeros(wshape, dtype=dx.dtype)  # (V, C)
    np.add.at(dW, ids.reshape(-1), dx.reshape(-1, wshape[1]))
    return dW


# ----------------------------------------------------------------------------- rmsnorm
def rmsnorm_forward(x, w, eps):
    """x (..., C), w (C,) -> y = x / rms(x) * w. (Written to make few passes over the activations
    and few temporary arrays, and split by rows over spare threads: at 135M-500M sizes the
    elementwise passes are a good part of what in a step is not matrix products.)"""
    y = np.empty(x.shape, x.dtype)
    xhat = np.empty(x.shape, x.dtype)
    rstd = np.empty(x.shape[:-1] + (1,), x.dtype)

    def rows(x, y, xhat, rstd):
        ms = np.einsum("nc,nc->n", x, x)[:, None]  # sum of squares, no (rows, C) temporary
        ms *= x.dtype.type(1.0 / x.shape[-1])
        ms += eps
        np.reciprocal(np.sqrt(ms, out=ms), out=rstd)
        np.multiply(x, rstd, out=xhat)
        np.multiply(xhat, w, out=y)

    rowwise(rows, (x,), (y, xhat, rstd))
    return y, (xhat, w, rstd)


def rmsnorm_backward(dy, cache, need_dw=True):
    xhat, w, rstd = cache
    dx = np.empty(dy.shape, dy.dtype)

    def rows(dy, xhat, rstd, dx):
        dxhat = dy * w
        m = np.einsum("nc,nc->n", dxhat, xhat)[:, None]
        m *= dy.dtype.type(1.0 / dy.shape[-1])
        np.multiply(xhat, m, out=dx)
        np.subtract(dxhat, dx, out=dx)
        dx *= rstd

    rowwise(rows, (dy, xhat, rstd), (dx,))
    dw = np.einsum("nc,nc->c", dy.reshape(-1, dy.shape[-1]), xhat.reshape(-1, xhat.shape[-1])) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------------------- linear
def linear_forward(x, W, b=None, out=None):
    """x (..., in), W (out, in) [HF layout], b (out,) or None -> y (..., out).
    `out`, a C-contiguous array of y's shape, receives the result (no new allocation)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = matmul(x2, W.T, out=None if out is None else out.reshape(-1, W.shape[0]))
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0]), (x, W, b is not None)


def linear_backward(dy, cache, need_dW=True, need_dx=True):
    """-> dx (..., in), dW (out, in) or None, db (out,) or None.

    With need_dW=False (a frozen weight) no full-size weight gradient is computed."""
    x, W, has_b = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = matmul(dy2, W).reshape(x.shape) if need_dx else None
    dW = matmul(dy2.T, x.reshape(-1, x.shape[-1])) if need_dW else None
    db = dy2.sum(axis=0) if (has_b and need_dW) else None
    return dx, dW, db


# ----------------------------------------------------------------------------- rope
def rope_tables(inv_freq, positions, dtype):
    """inv_freq (hd/2,), positions (T,) -> cos, sin (T, hd) in the HF half-split layout."""
    ang = np.outer(positions.astype(np.float64), inv_freq)  # (T, hd/2)
    emb = np.concatenate([ang, ang], axis=-1)  # (T, hd)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rope_forward(x, cos, sin):
    """x (..., T, hd), cos/sin (T, hd) -> rotated x (same shape):
    x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] for the halves x1, x2 of hd,
    done on the halves in place (no rotated copy of x is made)."""
    h = x.shape[-1] // 2
    y = x * cos
    t = x[..., h:] * sin[:, :h]
    y[..., :h] -= t
    np.multiply(x[..., :h], sin[:, h:], out=t)
    y[..., h:] += t
    return y, (cos, sin)


def rope_backward(dy, cache):
    """The transpose of rope_forward: dy * cos + [dy2 * sin2, -dy1 * sin1]."""
    cos, sin = cache
    h = dy.shape[-1] // 2
    dx = dy * cos
    t = dy[..., h:] * sin[:, h:]
    dx[..., :h] += t
    np.multiply(dy[..., :h], sin[:, :h], out=t)
    dx[..., h:] -= t
    return dx


# ----------------------------------------------------------------------------- attention
def attention_mask_bias(T, S, dtype, key_mask=None, window=None):
    """Additive mask (B or 1, 1, T, S): query t (at absolute position S - T + t) sees keys j <= its
    position, and with a sliding window only keys with position - j < window; key_mask (B, S) with
    0 for padding keys hides those keys too."""
    qpos = np.arange(S - T, S)[:, None]
    kpos = np.arange(S)[None, :]
    allowed = kpos <= qpos  # (T, S)
    if window is not None:
        allowed = allowed & (qpos - kpos < window)
    neg = np.finfo(dtype).min
    if key_mask is not None:
        allowed = allowed[None, None] & (np.asarray(key_mask)[:, None, None, :] > 0)  # (B, 1, T, S)
    else:
        allowed = allowed[None, None]  # (1, 1, T, S)
    return np.where(allowed, 0.0, neg).astype(dtype)


ATTN_BLOCK = 64  # queries per block: blocks skip the keys that the causal mask would hide anyway


def attention_forward(q, k, v, mask_bias, block=ATTN_BLOCK):
    """Causal grouped-query attention.

    q (B, KVH, G, T, hd), k/v (B, KVH, S, hd), mask_bias (B|1, 1, T, S) additive
    -> out (B, KVH, G, T, hd). The G query heads that share a KV head are stacked into one
    matrix (G*T rows), so each KV head needs one matmul and no K/V copies. Queries go in blocks
    of `block`; block i only looks at keys up to its last query's position (the rest are masked
    by causality), which saves almost half the work on long sequences. The scale 1/sqrt(hd)
    is applied to the queries (T x hd numbers) rather than to the scores (T x S)."""
    B, KVH, G, T, hd = q.shape
    S = k.shape[2]
    scale = 1.0 / np.sqrt(hd)
    out = np.empty_like(q)  # (B, KVH, G, T, hd)
    blocks = []
    for qs in range(0, T, block):
        qe = min(T, qs + block)
        n, ke = qe - qs, S - T + qe  # queries in this block; keys they can see
        qb = np.multiply(q[:, :, :, qs:qe], q.dtype.type(scale)).reshape(B, KVH, G * n, hd)  # a scaled copy
        kb, vb = k[:, :, :ke], v[:, :, :ke]
        att = qb @ kb.swapaxes(-1, -2)  # (B, KVH, G*n, ke)
        att = att.reshape(B, KVH, G, n, ke)
        att += mask_bias[:, :, None, qs:qe, :ke]  # broadcast over KVH and G
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        p = att.reshape(B, KVH, G * n, ke)
        out[:, :, :, qs:qe] = (p @ vb).reshape(B, KVH, G, n, hd)
        blocks.append((qs, qe, ke, qb, p))
    return out, (k, v, blocks, scale, G, out)


def attention_backward(dout, cache):
    """-> dq (B, KVH, G, T, hd), dk, dv (B, KVH, S, hd).

    Softmax backward needs, per query, sum_j p_j * dp_j with dp_j = dout . v_j; that sum equals
    dout . out (out = sum_j p_j v_j), a dot product of hd numbers instead of S."""
    k, v, blocks, scale, G, out = cache
    B, KVH, S, hd = k.shape
    dq = np.empty(dout.shape, dtype=dout.dtype)  # (B, KVH, G, T, hd)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for qs, qe, ke, qb, p in blocks:
        n = qe - qs
        do = np.ascontiguousarray(dout[:, :, :, qs:qe]).reshape(B, KVH, G * n, hd)
        rowdot = np.einsum("bkgtd,bkgtd->bkgt", dout[:, :, :, qs:qe], out[:, :, :, qs:qe]).reshape(B, KVH, G * n, 1)
        dv[:, :, :ke] += p.swapaxes(-1, -2) @ do  # summed over the G heads
        dp = do @ v[:, :, :ke].swapaxes(-1, -2)  # (B, KVH, G*n, ke)
        dp -= rowdot  # softmax backward: ds = p * (dp - sum(dp * p)), scores were of the scaled q
        dp *= p
        dq[:, :, :, qs:qe] = ((dp @ k[:, :, :ke]) * dout.dtype.type(scale)).reshape(B, KVH, G, n, hd)
        dk[:, :, :ke] += dp.swapaxes(-1, -2) @ qb
    return dq, dk, dv


# ----------------------------------------------------------------------------- swiglu
def swiglu_forward(gate, up):
    """gate, up (..., I) -> silu(gate) * up (split by rows over spare threads, see rmsnorm)."""
    act = np.empty(gate.shape, gate.dtype)
    sg = np.empty(gate.shape, gate.dtype)

    def rows(gate, up, act, sg):
        with np.errstate(over="ignore"):  # exp overflow for very negative gates gives 1/inf = 0, exact
            np.negative(gate, out=sg)
            np.exp(sg, out=sg)
            sg += 1.0
            np.reciprocal(sg, out=sg)
        np.multiply(gate, sg, out=act)
        act *= up

    rowwise(rows, (gate, up), (act, sg))
    return act, (gate, up, sg)


def swiglu_backward(dy, cache, stacked: bool = False):
    """-> (dgate, dup), or with stacked one array (..., 2I) = [dgate | dup], the layout of the
    fused gate/up projection's output, written in place (no concatenation afterwards)."""
    gate, up, sg = cache
    I = gate.shape[-1]
    out = np.empty(dy.shape[:-1] + (2 * I,), dy.dtype)

    def rows(dy, gate, up, sg, out):
        dgate, dup = out[:, :I], out[:, I:]
        t = np.subtract(1.0, sg, dtype=sg.dtype)  # d silu(g) / dg = sg * (1 + g * (1 - sg))
        t *= gate
        t += 1.0
        t *= sg
        np.multiply(t, up, out=dgate)
        dgate *= dy
        np.multiply(gate, sg, out=dup)  # silu(gate)
        dup *= dy

    rowwise(rows, (dy, gate, up, sg), (out,))
    return out if stacked else (out[..., :I], out[..., I:])


# ----------------------------------------------------------------------------- cross entropy
def cross_entropy_forward(logits, labels, inplace=False):
    """HF causal-LM loss. logits (B, T, V), labels (B, T) aligned with the inputs: position t
    predicts labels[t + 1]; IGNORE_INDEX (-100) is skipped; mean over counted tokens.

    Returns (loss, cache); the cache keeps the softmax of the counted rows for the backward,
    and cache[5], cache[6] are the counted and correctly predicted token counts. With
    inplace=True the caller gives up `logits` (a C-contiguous array): when every position
    counts, the softmax is computed in its memory instead of in a copy."""
    B, T, V = logits.shape
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    targets[:, :-1] = labels[:, 1:]
    t = targets.reshape(-1)  # (N,)
    valid = t != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return 0.0, (logits.shape, valid, t[valid], None, None, 0, 0)
    if inplace and n == B * T and logits.flags.c_contiguous:
        lg = logits.reshape(-1, V)  # (n, V) a view: becomes the softmax in place
    else:
        lg = logits.reshape(-1, V)[valid]  # (n, V) a copy: becomes the softmax in place
    tv = t[valid]
    rows = np.arange(n)
    correct = int((lg.argmax(axis=-1) == tv).sum())
    lg -= lg.max(axis=-1, keepdims=True)
    picked = lg[rows, tv].astype(np.float64)
    np.exp(lg, out=lg)
    s = lg.sum(axis=-1, keepdims=True)
    lg /= s
    nll = np.log(s[:, 0].astype(np.float64)) - picked
    loss = float(nll.sum() / n)
    return loss, (logits.shape, valid, tv, lg, None, n, correct)


def cross_entropy_backward(cache, dtype=np.float32, denom=None, out=None):
    """-> dlogits (B, T, V) for d(loss)/d(logits) with loss as the mean over counted tokens.

    denom: divide by this count instead of this call's own (a batch split into shards, each
    shard's share of the mean over the whole batch). out: a C-contiguous (B, T, V) array of
    `dtype` to write into (it may be the logits array given to the forward with inplace=True)."""
    shape, valid, tv, probs, _, n, _ = cache
    B, T, V = shape
    d = n if denom is None else denom
    if out is None and not (n and n == B * T and probs.dtype == dtype):
        out = np.zeros(shape, dtype=dtype)
    elif out is not None and n < B * T:
        out.reshape(-1, V)[~valid] = 0.0
    if n:
        g = probs  # reuse the cached softmax (the cache is spent after this)
        g[np.arange(n), tv] -= 1.0
        g *= 1.0 / d
        if n == B * T:
            if out is None:
                return g.reshape(shape)
            if not np.shares_memory(g, out):
                out.reshape(-1, V)[...] = g
        else:
            out.reshape(-1, V)[valid] = g
    return out.reshape(shape)


# ----------------------------------------------------------------------------- output head + loss, by rows
def head_xent_forward(h, W, targets, denom: int, need_dh: bool = True, need_dW: bool = False,
                      chunk_rows: int = 256, row_losses=None):
    """The output layer and the cross-entropy together, a chunk of rows at a time, only for rows
    whose target counts: logits (rows, V) are never made for the whole batch, and positions that
    do not count (prompt, padding) cost nothing. h (N, C), W (V, C), targets (N,) with
    IGNORE_INDEX where nothing is predicted; denom: the number of counted tokens of the whole
    batch (the loss is their mean). Each chunk's softmax becomes its gradient at once, so the
    backward through the head happens here too: dh = dlogits @ W, and with need_dW
    dW = dlogits.T @ h.
    -> (loss sum over counted rows (float), counted, correct, dh (N, C) or None, dW (V, C) or None);
    row_losses, a float array (N,), receives each counted row's loss."""
    N, C = h.shape
    idx = np.flatnonzero(targets != IGNORE_INDEX)
    dh = np.zeros((N, C), h.dtype) if need_dh else None  # (N, C)
    inv = h.dtype.type(1.0 / max(denom, 1))
    chunks = [idx[a:a + chunk_rows] for a in range(0, len(idx), chunk_rows)]
    # with spare threads (a one-row batch), the chunks themselves run in parallel: the softmax
    # over a 152k vocabulary is as much work as the products
    n = max(1, min(spare(), len(chunks)))

    def run(part):
        """The chunks part, part + n, ...: (loss sum, correct, dW or None); dh and row_losses
        are written in place (rows differ between chunks)."""
        total, correct = 0.0, 0
        dW = np.zeros(W.shape, h.dtype) if need_dW else None  # (V, C)
        for rows in chunks[part::n]:
            tv = targets[rows]
            hr = h[rows]  # (R, C)
            lg = matmul(hr, W.T)  # (R, V)
            r = np.arange(len(rows))
            best = lg.argmax(axis=-1)
            correct += int((best == tv).sum())
            lg -= lg[r, best][:, None]  # the row maximum, without a second pass to find it
            picked = lg[r, tv].astype(np.float64)
            np.exp(lg, out=lg)
            ssum = lg.sum(axis=-1, keepdims=True)
            nll = np.log(ssum[:, 0].astype(np.float64)) - picked  # (R,)
            total += float(nll.sum())
            if row_losses is not None:
                row_losses[rows] = nll
            if need_dh or need_dW:
                lg *= inv / ssum  # softmax / denom, then the gradient (p - onehot) / denom in place
                lg[r, tv] -= inv
                if need_dh:
                    dh[rows] = matmul(lg, W)
                if need_dW:
                    dW += matmul(lg.T, hr)
        return total, correct, dW

    parts = run_all(run, n) if n > 1 else [run(0)]
    dW = parts[0][2]
    for x in parts[1:]:
        if dW is not None:
            dW += x[2]
    return sum(x[0] for x in parts), len(idx), sum(x[1] for x in parts), dh, dW


def shifted_targets(labels):
    """labels (B, T) aligned with the inputs -> targets (B, T): position t predicts labels[t + 1]."""
    labels = np.asarray(labels)
    t = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    t[:, :-1] = labels[:, 1:]
    return t


def token_accuracy(ce_cache):
    n, correct = ce_cache[5], ce_cache[6]
    return correct / n if n else 0.0
