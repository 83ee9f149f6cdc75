"""Gradient tests for every forward/backward pair in engine/ops.py and engine/lora.py.

House style: central differences in float64 on small random shapes, compared entry by entry
with the hand-written backward; the worst relative error goes in the assert message. Each op
is also checked against a slow, obviously correct reference where one is cheap to write.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from finetune_desktop.engine import ops
from finetune_desktop.engine.lora import group_backward, group_forward, lora_backward, lora_forward
from finetune_desktop.engine.ops import IGNORE_INDEX

EPS = 1e-6
TOL = 1e-6


# ----------------------------------------------------------------------------- helpers
def numerical_grad(f, x, eps=EPS):
    """Central differences of the scalar f() with respect to every entry of x (perturbed in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        fp = f()
        x[idx] = old - eps
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def rel_err(analytic, numeric):
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    assert analytic.shape == numeric.shape, f"shape {analytic.shape} != {numeric.shape}"
    scale = max(float(np.max(np.abs(numeric))), 1e-12)
    return float(np.max(np.abs(analytic - numeric))) / scale


def check(name, analytic, numeric, tol=TOL):
    err = rel_err(analytic, numeric)
    assert np.abs(numeric).max() > 0, f"{name}: numerical gradient is all zero (test would prove nothing)"
    assert err < tol, f"{name}: max relative error {err:.3e} >= {tol:.0e}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- embedding
def test_embedding_grad_with_repeated_ids(rng):
    V, C = 7, 3
    ids = np.array([[1, 3, 3, 0, 6], [3, 1, 5, 5, 5]])  # repeats: rows must accumulate
    W = rng.standard_normal((V, C))
    R = rng.standard_normal((2, 5, C))
    x, cache = ops.embedding_forward(ids, W)
    np.testing.assert_array_equal(x, W[ids])
    dW = ops.embedding_backward(R, cache)
    check("embedding dW", dW, numerical_grad(lambda: float((ops.embedding_forward(ids, W)[0] * R).sum()), W))
    assert np.all(dW[[2, 4]] == 0), "rows of ids never looked up must get zero gradient"


# ----------------------------------------------------------------------------- rmsnorm
def test_rmsnorm_forward_matches_definition(rng):
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal(6)
    y, _ = ops.rmsnorm_forward(x, w, 1e-5)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_rmsnorm_grads(rng):
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal(6)
    R = rng.standard_normal((2, 3, 6))
    eps = 1e-5
    f = lambda: float((ops.rmsnorm_forward(x, w, eps)[0] * R).sum())  # noqa: E731
    _, cache = ops.rmsnorm_forward(x, w, eps)
    dx, dw = ops.rmsnorm_backward(R, cache)
    check("rmsnorm dx", dx, numerical_grad(f, x))
    check("rmsnorm dw", dw, numerical_grad(f, w))
    dx2, dw2 = ops.rmsnorm_backward(R, cache, need_dw=False)
    assert dw2 is None, "need_dw=False must not compute the weight gradient"
    np.testing.assert_allclose(dx2, dx, rtol=0, atol=0)


# ----------------------------------------------------------------------------- linear
@pytest.mark.parametrize("bias", [True, False])
def test_linear_grads(rng, bias):
    x = rng.standard_normal((2, 3, 5))
    W = rng.standard_normal((4, 5))
    b = rng.standard_normal(4) if bias else None
    R = rng.standard_normal((2, 3, 4))
    f = lambda: float((ops.linear_forward(x, W, b)[0] * R).sum())  # noqa: E731
    y, cache = ops.linear_forward(x, W, b)
    np.testing.assert_allclose(y, x @ W.T + (b if bias else 0.0), rtol=1e-12, atol=1e-12)
    dx, dW, db = ops.linear_backward(R, cache)
    check("linear dx", dx, numerical_grad(f, x))
    check("linear dW", dW, numerical_grad(f, W))
    if bias:
        check("linear db", db, numerical_grad(f, b))
    else:
        assert db is None


def test_linear_frozen_weight_computes_no_weight_grad(rng):
    x = rng.standard_normal((2, 3, 5))
    W = rng.standard_normal((4, 5))
    b = rng.standard_normal(4)
    R = rng.standard_normal((2, 3, 4))
    _, cache = ops.linear_forward(x, W, b)
    dx, dW, db = ops.linear_backward(R, cache, need_dW=False)
    assert dW is None and db is None, "need_dW=False must return no weight or bias gradient"
    check("linear dx (frozen W)", dx,
          numerical_grad(lambda: float((ops.linear_forward(x, W, b)[0] * R).sum()), x))
    dx3, dW3, _ = ops.linear_backward(R, cache, need_dx=False)
    assert dx3 is None and dW3 is not None


# ----------------------------------------------------------------------------- rope
def _tables(hd, positions, theta=100.0, dtype=np.float64):
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    return ops.rope_tables(inv, np.asarray(positions), dtype)


def test_rope_grad(rng):
    x = rng.standard_normal((2, 3, 5, 8))  # (B, heads, T, hd)
    cos, sin = _tables(8, np.arange(3, 8))  # positions offset as after a KV cache
    R = rng.standard_normal(x.shape)
    _, cache = ops.rope_forward(x, cos, sin)
    dx = ops.rope_backward(R, cache)
    check("rope dx", dx, numerical_grad(lambda: float((ops.rope_forward(x, cos, sin)[0] * R).sum()), x))


def test_rope_is_hf_half_split_rotation(rng):
    """Slow reference: dimension i and i + hd/2 form one complex pair rotated by pos * inv_freq[i]."""
    hd, T = 6, 4
    x = rng.standard_normal((T, hd))
    inv = 1.0 / 50.0 ** (np.arange(0, hd, 2) / hd)
    cos, sin = ops.rope_tables(inv, np.arange(T), np.float64)
    y, _ = ops.rope_forward(x, cos, sin)
    z = (x[:, : hd // 2] + 1j * x[:, hd // 2:]) * np.exp(1j * np.outer(np.arange(T), inv))
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], axis=-1), rtol=1e-12, atol=1e-12)
    # relative positions: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = rng.standard_normal(hd), rng.standard_normal(hd)

    def dot_at(m, n):
        cq, sq = ops.rope_tables(inv, np.array([m]), np.float64)
        ck, sk = ops.rope_tables(inv, np.array([n]), np.float64)
        return float((ops.rope_forward(q[None], cq, sq)[0] * ops.rope_forward(k[None], ck, sk)[0]).sum())

    assert abs(dot_at(5, 2) - dot_at(13, 10)) < 1e-10


# ----------------------------------------------------------------------------- attention
def _attention_reference(q, k, v, key_mask=None, window=None):
    """Naive attention, one head and one query at a time. q (B, KVH, G, T, hd), k/v (B, KVH, S, hd)."""
    B, KVH, G, T, hd = q.shape
    S = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(KVH):
            for g in range(G):
                for t in range(T):
                    pos = S - T + t
                    ok = [j for j in range(S) if j <= pos and (window is None or pos - j < window)
                          and (key_mask is None or key_mask[b, j] > 0)]
                    s = np.array([q[b, h, g, t] @ k[b, h, j] for j in ok]) / np.sqrt(hd)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    out[b, h, g, t] = p @ v[b, h, ok]
    return out


ATTN_CASES = {
    "gqa_G2": dict(KVH=2, G=2, T=5, S=5, key_mask=None, window=None, block=64),
    "mha_G1": dict(KVH=3, G=1, T=5, S=5, key_mask=None, window=None, block=64),
    "gqa_blocks": dict(KVH=1, G=2, T=7, S=7, key_mask=None, window=None, block=3),
    "kv_cache_offset": dict(KVH=2, G=2, T=3, S=7, key_mask=None, window=None, block=2),
    # batch 1: key 2 is padding in the middle and the last two keys are right padding
    "padding_mask": dict(KVH=2, G=2, T=6, S=6, key_mask=np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]]),
                         window=None, block=4),
    "sliding_window": dict(KVH=1, G=2, T=7, S=7, key_mask=None, window=3, block=3),
    "window_and_cache": dict(KVH=2, G=1, T=3, S=6, key_mask=None, window=2, block=64),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_reference_and_grads(rng, case):
    c = ATTN_CASES[case]
    B, hd = 2, 4
    KVH, G, T, S = c["KVH"], c["G"], c["T"], c["S"]
    q = rng.standard_normal((B, KVH, G, T, hd))
    k = rng.standard_normal((B, KVH, S, hd))
    v = rng.standard_normal((B, KVH, S, hd))
    mask = ops.attention_mask_bias(T, S, np.float64, key_mask=c["key_mask"], window=c["window"])
    R = rng.standard_normal(q.shape)
    out, cache = ops.attention_forward(q, k, v, mask, block=c["block"])
    ref = _attention_reference(q, k, v, c["key_mask"], c["window"])
    err = np.abs(out - ref).max()
    assert err < 1e-12, f"{case}: attention output differs from the naive reference by {err:.2e}"
    dq, dk, dv = ops.attention_backward(R, cache)

    def f():
        return float((ops.attention_forward(q, k, v, mask, block=c["block"])[0] * R).sum())

    check(f"{case} dq", dq, numerical_grad(f, q))
    check(f"{case} dk", dk, numerical_grad(f, k))
    check(f"{case} dv", dv, numerical_grad(f, v))
    if c["key_mask"] is not None:
        hidden = c["key_mask"] == 0
        assert np.all(dk[hidden.nonzero()[0], :, hidden.nonzero()[1]] == 0), "padding keys must get zero dk"
        assert np.all(dv[hidden.nonzero()[0], :, hidden.nonzero()[1]] == 0), "padding keys must get zero dv"


def test_attention_mask_bias_float32_is_finite_and_correct():
    km = np.array([[0, 1, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bias = ops.attention_mask_bias(4, 4, np.float32, key_mask=km, window=2)
    assert bias.dtype == np.float32
    assert np.isfinite(bias).all(), "masked entries must be finfo.min, not -inf (which gives NaN rows)"
    allowed = bias[0, 0] == 0
    expect = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(allowed, expect)


def test_attention_mask_bias_with_padding_raises_no_overflow_warning():
    """Every training step with padding builds this mask: it must not spam RuntimeWarnings."""
    km = np.array([[1, 1, 1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.attention_mask_bias(4, 4, np.float32, key_mask=km)


# ----------------------------------------------------------------------------- swiglu
def test_swiglu_grads(rng):
    gate = rng.standard_normal((2, 3, 5)) * 3
    gate[0, 0, :3] = [25.0, -25.0, 40.0]  # large |x| where sigmoid saturates
    up = rng.standard_normal((2, 3, 5))
    R = rng.standard_normal((2, 3, 5))
    f = lambda: float((ops.swiglu_forward(gate, up)[0] * R).sum())  # noqa: E731
    y, cache = ops.swiglu_forward(gate, up)
    np.testing.assert_allclose(y, gate / (1 + np.exp(-gate)) * up, rtol=1e-12, atol=1e-300)
    dgate, dup = ops.swiglu_backward(R, cache)
    check("swiglu dgate", dgate, numerical_grad(f, gate))
    check("swiglu dup", dup, numerical_grad(f, up))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swiglu_extreme_inputs_are_finite_and_exact(dtype):
    gate = np.array([-1e4, -800.0, -100.0, 0.0, 100.0, 800.0, 1e4], dtype=dtype)
    up = np.ones_like(gate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning may escape
        y, cache = ops.swiglu_forward(gate, up)
        dgate, dup = ops.swiglu_backward(np.ones_like(gate), cache)
    assert np.isfinite(y).all() and np.isfinite(dgate).all() and np.isfinite(dup).all(), (y, dgate, dup)
    np.testing.assert_allclose(y[[0, 1, 3]], 0.0, atol=1e-30)
    np.testing.assert_allclose(y[4:], gate[4:], rtol=1e-6)
    np.testing.assert_allclose(dgate[[0, 1]], 0.0, atol=1e-30)
    np.testing.assert_allclose(dgate[4:], 1.0, rtol=1e-6)
    np.testing.assert_allclose(dgate[3], 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- cross entropy
def _labels():
    labels = np.array([
        [4, 1, -100, 3, 0, 6],         # one ignored target in the middle
        [-100] * 6,                    # a row with nothing to predict
        [2, 2, 5, -100, -100, 1],      # the first label is never a target (shifted)
    ])
    return labels


def _ce_reference(logits, labels):
    tot, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = labels[b, t + 1]
            if y == -100:
                continue
            z = logits[b, t]
            tot += np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
            n += 1
    return tot / n, n


def test_cross_entropy_value_counts_and_grad(rng):
    logits = rng.standard_normal((3, 6, 7)) * 2
    labels = _labels()
    loss, ce = ops.cross_entropy_forward(logits, labels)
    ref, n_ref = _ce_reference(logits, labels)
    assert abs(loss - ref) < 1e-12, f"loss {loss} != reference {ref}"
    assert ce[5] == n_ref == 7, f"counted tokens {ce[5]}, expected {n_ref}"
    targets = np.full((3, 6), -100)
    targets[:, :-1] = labels[:, 1:]
    ok = targets != -100
    assert ce[6] == int((logits.argmax(-1)[ok] == targets[ok]).sum())
    # the backward consumes its cache (the softmax buffer is reused), so each finite difference
    # needs a fresh forward: numerical_grad calls the forward every time
    dlogits = ops.cross_entropy_backward(ce, dtype=np.float64)
    assert dlogits.dtype == np.float64
    check("cross_entropy dlogits", dlogits,
          numerical_grad(lambda: ops.cross_entropy_forward(logits, labels)[0], logits))
    assert np.all(dlogits[1] == 0), "the all-ignored row must get zero gradient"
    assert np.all(dlogits[:, -1] == 0), "the last position never predicts anything"


def test_cross_entropy_all_ignored_and_float32(rng):
    logits = rng.standard_normal((2, 4, 5)).astype(np.float32)
    labels = np.full((2, 4), -100)
    loss, ce = ops.cross_entropy_forward(logits, labels)
    assert loss == 0.0 and ce[5] == 0 and ops.token_accuracy(ce) == 0.0
    d = ops.cross_entropy_backward(ce, dtype=np.float32)
    assert d.shape == logits.shape and d.dtype == np.float32 and not d.any()
    # float32 path agrees with the float64 reference
    labels = np.array([[1, 2, 3, 4], [0, 0, -100, 1]])
    loss32, ce32 = ops.cross_entropy_forward(logits, labels)
    ref, _ = _ce_reference(logits.astype(np.float64), labels)
    assert abs(loss32 - ref) < 1e-6 * max(1.0, abs(ref)), (loss32, ref)
    d32 = ops.cross_entropy_backward(ce32, dtype=np.float32)
    _, ce64 = ops.cross_entropy_forward(logits.astype(np.float64), labels)
    d64 = ops.cross_entropy_backward(ce64, dtype=np.float64)
    assert d32.dtype == np.float32
    assert rel_err(d32, d64) < 1e-6
    assert not np.shares_memory(logits, d32), "the backward must not write into the logits"


def test_cross_entropy_does_not_modify_logits(rng):
    logits = rng.standard_normal((2, 5, 6))
    before = logits.copy()
    _, ce = ops.cross_entropy_forward(logits, np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]))
    ops.cross_entropy_backward(ce, dtype=np.float64)
    np.testing.assert_array_equal(logits, before)


def test_cross_entropy_inplace_denom_and_out_agree_with_the_plain_path(rng):
    """inplace=True (softmax in the logits' memory), a shared denominator and an out= buffer are
    memory savers only: the loss and the gradient must be the same numbers."""
    logits = rng.standard_normal((2, 5, 6)).astype(np.float32)
    full = rng.integers(0, 6, (2, 5))
    loss, ce = ops.cross_entropy_forward(logits, full)
    ref = ops.cross_entropy_backward(ce, dtype=np.float32)
    work = logits.copy()
    loss_ip, ce_ip = ops.cross_entropy_forward(work, full, inplace=True)
    assert loss_ip == loss
    d_ip = ops.cross_entropy_backward(ce_ip, dtype=np.float32, out=work)
    assert np.shares_memory(d_ip, work), "with inplace=True and out=logits no new buffer is needed"
    np.testing.assert_array_equal(d_ip, ref)
    # a denominator of 3x the counted tokens scales the gradient by 1/3
    _, ce3 = ops.cross_entropy_forward(logits, full)
    np.testing.assert_allclose(ops.cross_entropy_backward(ce3, dtype=np.float32, denom=3 * ce3[5]), ref / 3,
                               rtol=1e-6, atol=1e-9)
    # partly ignored labels with inplace=True fall back to a copy, and out= gets zeros where
    # nothing is counted even when it held garbage before
    part = full.copy()
    part[1, 2:] = -100
    _, cep = ops.cross_entropy_forward(logits, part)
    refp = ops.cross_entropy_backward(cep, dtype=np.float32)
    work = logits.copy()
    _, cep2 = ops.cross_entropy_forward(work, part, inplace=True)
    np.testing.assert_array_equal(work, logits)
    garbage = np.full(logits.shape, 7.0, np.float32)
    np.testing.assert_array_equal(ops.cross_entropy_backward(cep2, dtype=np.float32, out=garbage), refp)


# ----------------------------------------------------------------------------- lora
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_lora_grads(rng, dropout):
    x = rng.standard_normal((2, 3, 5))
    A = rng.standard_normal((2, 5))  # (r, in)
    B = rng.standard_normal((4, 2))  # (out, r), nonzero so dA is nonzero too
    R = rng.standard_normal((2, 3, 4))
    scale = 1.5

    def run():
        # the same seed each call gives the same dropout mask in every finite difference
        return lora_forward(x, A, B, scale, dropout, np.random.default_rng(99))

    f = lambda: float((run()[0] * R).sum())  # noqa: E731
    y, cache = run()
    mask = cache[5]
    if dropout:
        assert mask is not None and (mask == 0).any() and (mask > 0).any(), "dropout mask must drop some inputs"
        np.testing.assert_allclose(mask[mask > 0], 1.0 / (1.0 - dropout))
        xin = x.reshape(-1, 5) * mask
    else:
        assert mask is None
        xin = x.reshape(-1, 5)
    np.testing.assert_allclose(y.reshape(-1, 4), scale * xin @ A.T @ B.T, rtol=1e-12)
    dx, dA, dB = lora_backward(R, cache)
    check("lora dx", dx, numerical_grad(f, x))
    check("lora dA", dA, numerical_grad(f, A))
    check("lora dB", dB, numerical_grad(f, B))


def test_grouped_adapters_equal_one_adapter_at_a_time_and_finite_differences(rng):
    """q/k/v-like group: three adapters (ranks 2, 3, 2) on one input, written into their column
    ranges of the group output; the middle block of columns has no adapter."""
    x = rng.standard_normal((2, 3, 5))
    outs, ranks = [4, 3, 2, 3], [2, 3, None, 2]
    offs = np.cumsum([0] + outs[:-1])
    parts = [(int(o), rng.standard_normal((r, 5)), rng.standard_normal((n, r)))
             for o, n, r in zip(offs, outs, ranks) if r is not None]
    base = rng.standard_normal((2, 3, sum(outs)))
    R = rng.standard_normal(base.shape)
    scale = 1.5

    def run():
        y = base.copy()
        return y, group_forward(x, y, parts, scale)

    y, cache = run()
    ref = base.copy()
    for off, A, B in parts:
        ref[..., off:off + B.shape[0]] += lora_forward(x, A, B, scale)[0]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dx0 = rng.standard_normal(x.shape)  # the frozen weights' share, added to in place
    dx = dx0.copy()
    grads = group_backward(R, dx, parts, cache, scale)
    f = lambda: float((run()[0] * R).sum())  # noqa: E731
    check("group dx", dx - dx0, numerical_grad(f, x))
    for (off, A, B), (dA, dB) in zip(parts, grads):
        check("group dA", dA, numerical_grad(f, A))
        check("group dB", dB, numerical_grad(f, B))
        _, dA1, dB1 = lora_backward(R[..., off:off + B.shape[0]], lora_forward(x, A, B, scale)[1])
        np.testing.assert_allclose(dA, dA1, rtol=1e-10)
        np.testing.assert_allclose(dB, dB1, rtol=1e-10)


def test_lora_dropout_needs_rng_and_is_off_in_eval(rng):
    x = rng.standard_normal((3, 5))
    A, B = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    y_eval, _ = lora_forward(x, A, B, 2.0, dropout=0.0, rng=np.random.default_rng(0))
    y_a, _ = lora_forward(x, A, B, 2.0, dropout=0.5, rng=np.random.default_rng(0))
    y_b, _ = lora_forward(x, A, B, 2.0, dropout=0.5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y_a, y_b)
    assert not np.allclose(y_a, y_eval), "dropout 0.5 must change the output"


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_head_and_loss_by_rows_equal_the_full_logits_path(chunk):
    """ops.head_xent_forward (logits only for counted rows, a chunk at a time, the head's
    backward done in place) gives the loss, counts, dh and dW of the plain path: full logits,
    cross_entropy_forward/backward, and the linear layer's backward."""
    rng = np.random.default_rng(4)
    B, T, C, V = 3, 7, 5, 11
    h = rng.standard_normal((B, T, C))
    W = rng.standard_normal((V, C))
    labels = rng.integers(0, V, (B, T))
    labels[0, :3] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing to predict
    logits, lc = ops.linear_forward(h, W)
    loss, ce = ops.cross_entropy_forward(logits.copy(), labels)
    dlogits = ops.cross_entropy_backward(ce, dtype=np.float64)
    dh_ref, dW_ref, _ = ops.linear_backward(dlogits, lc)
    targets = ops.shifted_targets(labels)
    denom = int((targets != IGNORE_INDEX).sum())
    rl = np.full(B * T, np.nan)
    total, counted, correct, dh, dW = ops.head_xent_forward(h.reshape(-1, C), W, targets.reshape(-1), denom,
                                                          need_dh=True, need_dW=True, chunk_rows=chunk,
                                                          row_losses=rl)
    assert counted == ce[5] == denom and correct == ce[6]
    assert abs(total / counted - loss) < 1e-12
    np.testing.assert_allclose(dh.reshape(B, T, C), dh_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dW, dW_ref, rtol=1e-10, atol=1e-12)
    assert np.isnan(rl[2 * T:]).all() and abs(np.nansum(rl) - total) < 1e-10


def test_head_and_loss_chunks_on_spare_threads_equal_one_thread():
    """With spare threads (a one-row batch) the chunks run in parallel: same loss, dh and dW."""
    from finetune_desktop.engine.parallel import spare_threads
    rng = np.random.default_rng(7)
    N, C, V = 40, 6, 13
    h, W = rng.standard_normal((N, C)), rng.standard_normal((V, C))
    targets = rng.integers(0, V, N)
    targets[:5] = IGNORE_INDEX
    denom = int((targets != IGNORE_INDEX).sum())
    one = ops.head_xent_forward(h, W, targets, denom, need_dh=True, need_dW=True, chunk_rows=4)
    with spare_threads(2):
        two = ops.head_xent_forward(h, W, targets, denom, need_dh=True, need_dW=True, chunk_rows=4)
    assert one[1:3] == two[1:3] and abs(one[0] - two[0]) < 1e-10
    np.testing.assert_allclose(two[3], one[3], rtol=1e-12)
    np.testing.assert_allclose(two[4], one[4], rtol=1e-10)
