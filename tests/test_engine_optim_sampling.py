"""AdamW, learning-rate schedules, gradient clipping (engine/optim.py) and next-token selection
(engine/sampling.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from finetune_desktop.engine.optim import AdamWConfig, adamw_init, adamw_step, clip_grads, global_grad_norm, lr_at
from finetune_desktop.engine.sampling import (apply_repetition_penalty, filter_top_k, filter_top_p,
                                              next_token_distribution, sample_next,
                                              softmax)


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(dtype), "b": rng.standard_normal(4).astype(dtype),
            "norm": (1 + 0.1 * rng.standard_normal(3)).astype(dtype), "emb": rng.standard_normal((5, 2, 2)).astype(dtype)}


def grads_for(step, params, seed=100):
    rng = np.random.default_rng(seed + step)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


def reference_adamw(params, grad_seq, lrs, cfg):
    """Textbook AdamW (Loshchilov & Hutter, as torch implements it), one parameter at a time."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grad_seq, lrs), start=1):
        for k in p:
            if p[k].ndim >= 2:
                p[k] = p[k] * (1 - lr * cfg.weight_decay)
            m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * g[k]
            v2[k] = cfg.beta2 * v2[k] + (1 - cfg.beta2) * g[k] ** 2
            mhat = m[k] / (1 - cfg.beta1 ** t)
            vhat = v2[k] / (1 - cfg.beta2 ** t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + cfg.eps)
    return p


def test_adamw_matches_handwritten_reference():
    cfg = AdamWConfig(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    params = make_params()
    start = {k: v.copy() for k, v in params.items()}
    state = adamw_init(params)
    gseq = [grads_for(i, params) for i in range(5)]
    lrs = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2]
    for g, lr in zip(gseq, lrs):
        rel = adamw_step(params, g, state, lr, cfg)
    assert state["step"] == 5
    ref = reference_adamw(start, gseq, lrs, cfg)
    for k in params:
        err = np.abs(params[k] - ref[k]).max()
        assert err < 1e-12, f"{k}: AdamW differs from the reference by {err:.2e}"
    assert set(rel) == set(params) and all(r > 0 for r in rel.values())


def test_adamw_relative_update_size():
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    rel = adamw_step(params, grads_for(0, params), adamw_init(params), 1e-3, AdamWConfig(weight_decay=0.0))
    for k in params:
        expect = np.linalg.norm(params[k] - before[k]) / np.linalg.norm(before[k])
        assert abs(rel[k] - expect) < 1e-9 * max(expect, 1e-12), (k, rel[k], expect)
    # the first Adam step moves every entry by about lr (sign of the gradient)
    assert np.allclose(np.abs(params["w"] - before["w"]), 1e-3, rtol=1e-3)


def test_weight_decay_only_on_matrices():
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    adamw_step(params, zero, adamw_init(params), 0.1, AdamWConfig(weight_decay=0.5))
    np.testing.assert_allclose(params["w"], before["w"] * (1 - 0.1 * 0.5), rtol=1e-12)
    np.testing.assert_allclose(params["emb"], before["emb"] * (1 - 0.1 * 0.5), rtol=1e-12)
    np.testing.assert_array_equal(params["b"], before["b"])  # 1-D: no decay
    np.testing.assert_array_equal(params["norm"], before["norm"])


def test_adamw_only_touches_tensors_with_grads_and_works_in_float32():
    params = make_params(dtype=np.float32)
    before = {k: v.copy() for k, v in params.items()}
    live = params["w"]
    g = {"w": np.ones((4, 3), np.float32)}
    adamw_step(params, g, adamw_init(params), 0.01, AdamWConfig(weight_decay=0.1))
    assert params["w"] is live, "the update must be in place (trainable_params() is live)"
    assert params["w"].dtype == np.float32
    for k in ("b", "norm", "emb"):
        np.testing.assert_array_equal(params[k], before[k])


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    cfg = AdamWConfig(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    params = make_params()
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    decay = [tp[k] for k in tp if tp[k].ndim >= 2]
    no_decay = [tp[k] for k in tp if tp[k].ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    state = adamw_init(params)
    for step in range(6):
        lr = 1e-2 * (1 + step) / 6
        g = grads_for(step, params)
        adamw_step(params, g, state, lr, cfg)
        for grp in opt.param_groups:
            grp["lr"] = lr
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        opt.step()
    for k in params:
        err = np.abs(params[k] - tp[k].detach().numpy()).max()
        assert err < 1e-10, f"{k}: differs from torch.optim.AdamW by {err:.2e}"


# ----------------------------------------------------------------------------- clipping
def test_clip_grads():
    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    norm = math.sqrt(sum((v ** 2).sum() for v in g.values()))
    assert abs(global_grad_norm(g) - norm) < 1e-12
    orig = {k: v.copy() for k, v in g.items()}
    assert abs(clip_grads(g, norm * 2) - norm) < 1e-12  # below the limit: untouched
    for k in g:
        np.testing.assert_array_equal(g[k], orig[k])
    live = g["a"]
    before = clip_grads(g, 1.0)
    assert abs(before - norm) < 1e-12, "returns the norm before clipping"
    assert g["a"] is live, "clipping is in place"
    assert abs(global_grad_norm(g) - 1.0) < 1e-5
    np.testing.assert_allclose(g["b"] / orig["b"], g["a"][0, 0] / orig["a"][0, 0], rtol=1e-12)  # same factor
    for max_norm in (None, 0.0):
        h = {k: v.copy() for k, v in orig.items()}
        clip_grads(h, max_norm)
        np.testing.assert_array_equal(h["a"], orig["a"])


def test_clip_grads_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    g = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    ts = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in g.values()]
    for t, v in zip(ts, g.values()):
        t.grad = torch.tensor(v.copy())
    tn = float(torch.nn.utils.clip_grad_norm_(ts, 0.5))
    n = clip_grads(g, 0.5)
    assert abs(n - tn) < 1e-12
    for t, v in zip(ts, g.values()):
        np.testing.assert_allclose(v, t.grad.numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_lr_schedules(schedule, warmup):
    total, base = 100, 3e-4
    lrs = [lr_at(s, total, base, schedule, warmup) for s in range(total)]
    assert all(0 < lr <= base * (1 + 1e-12) for lr in lrs[:-1]), "lr stays in (0, base]"
    if warmup:
        assert lrs[0] == pytest.approx(base / warmup)
        assert lrs[warmup - 1] == pytest.approx(base)
        assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup])), "warmup increases strictly"
    assert lrs[warmup] == pytest.approx(base), "decay starts at base_lr right after warmup"
    after = lrs[warmup:]
    if schedule == "constant":
        assert all(lr == base for lr in after)
    else:
        assert all(a > b for a, b in zip(after, after[1:])), f"{schedule} decay must decrease strictly"
        assert lrs[-1] < 0.05 * base, f"{schedule}: last step lr {lrs[-1]:.2e} should be near 0"
        assert lr_at(total, total, base, schedule, warmup) == pytest.approx(0.0, abs=1e-15)
    if schedule == "cosine":
        mid = warmup + (total - warmup) // 2
        assert lrs[mid] == pytest.approx(base / 2, rel=1e-9)
    if schedule == "linear":
        q = warmup + 30
        assert lrs[q] == pytest.approx(base * (1 - 30 / (total - warmup)), rel=1e-9), "linear in the step"


def test_lr_min_ratio_and_unknown_schedule():
    assert lr_at(100, 100, 1.0, "cosine", 0, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(1000, 100, 1.0, "linear", 0, min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, 10, 1.0, "exponential")


# ----------------------------------------------------------------------------- sampling
def test_repetition_penalty_hf_semantics():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.25])  # positive / p, negative * p
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.5]), "input must not be modified"
    assert apply_repetition_penalty(logits, [0], 1.0) is logits
    assert apply_repetition_penalty(logits, [], 2.0) is logits


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(20).astype(np.float32)
    hist = [3, 3, 7, 0, 19]
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([hist]), torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, hist, 1.7), theirs, rtol=1e-6)


def test_filter_top_k():
    lg = np.array([0.1, 3.0, -1.0, 2.0, 2.5])
    out = filter_top_k(lg, 2)
    assert np.isneginf(out[[0, 2, 3]]).all() and out[1] == 3.0 and out[4] == 2.5
    assert filter_top_k(lg, None) is lg and filter_top_k(lg, 0) is lg and filter_top_k(lg, 5) is lg


def test_filter_top_p_keeps_the_minimal_nucleus():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    lg = np.log(probs)
    for p, keep in [(0.35, {1}), (0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}),
                    (0.9, {1, 3, 4, 2}), (0.96, {0, 1, 2, 3, 4})]:
        out = filter_top_p(lg, p)
        kept = set(np.flatnonzero(np.isfinite(out)).tolist())
        assert kept == keep, f"top_p={p}: kept {sorted(kept)}, the minimal nucleus is {sorted(keep)}"
        np.testing.assert_array_equal(out[list(kept)], lg[list(kept)])
    assert set(np.flatnonzero(np.isfinite(filter_top_p(lg, 1e-9)))) == {1}, "always keeps at least one"
    assert filter_top_p(lg, 1.0) is lg and filter_top_p(lg, None) is lg


def test_filter_top_p_after_top_k_handles_minus_inf():
    lg = filter_top_k(np.array([1.0, 2.0, 3.0, 0.0]), 2)
    out = filter_top_p(lg, 0.5)
    assert np.isfinite(out).sum() == 1 and out[2] == 3.0


def test_sample_next_greedy_and_distribution():
    lg = np.array([0.0, 1.0, 2.0, 0.5])
    rng = np.random.default_rng(0)
    assert sample_next(lg, [], rng, temperature=0.0) == 2
    assert sample_next(lg, [2], rng, temperature=0.0, repetition_penalty=10.0) == 1
    counts = np.bincount([sample_next(lg, [], rng, temperature=1.0) for _ in range(4000)], minlength=4)
    p = softmax(lg)
    assert np.abs(counts / 4000 - p).max() < 0.03, (counts / 4000, p)
    hot = np.bincount([sample_next(lg, [], rng, temperature=100.0) for _ in range(2000)], minlength=4) / 2000
    assert np.abs(hot - 0.25).max() < 0.05, "a high temperature flattens the distribution"
    topk = {sample_next(lg, [], rng, temperature=1.0, top_k=2) for _ in range(300)}
    assert topk == {1, 2}
    a = [sample_next(lg, [], np.random.default_rng(5), temperature=1.0) for _ in range(3)]
    assert len(set(a)) == 1, "the same rng state gives the same choice"


def _reference_distribution(logits, history, temperature, top_k, top_p, penalty):
    z = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, penalty) / temperature
    return softmax(filter_top_p(filter_top_k(z, top_k), top_p))


@pytest.mark.parametrize("case", range(8))
def test_fast_sampling_keeps_the_reference_set_probabilities_and_draws(case):
    """next_token_distribution lists only the kept tokens and sorts only the likely ones; it must
    give the reference pipeline's kept set and probabilities, and sample_next must draw the very
    token rng.choice(V, p=reference) draws from the same generator state. The logits have ties
    (rounded values), a -inf entry, and peaked and flat shapes, so the exactness checks and the
    full-sort fallback are both exercised."""
    rng = np.random.default_rng(case)
    V = 3000
    scale = [0.5, 3.0, 8.0, 1.0][case % 4]
    lg = np.round(rng.standard_normal(V) * scale, 1).astype(np.float32)  # many exact ties
    lg[rng.integers(0, V)] = -np.inf
    history = rng.integers(0, V, 60).tolist()
    settings = [(0.7, None, 0.9, 1.1), (1.0, 50, 0.95, 1.0), (1.3, None, None, 1.2), (0.5, 7, None, 1.0),
                (2.0, None, 0.999, 1.0), (0.9, None, 1e-9, 1.3), (1.0, 2999, 0.5, 1.0), (0.3, None, 0.6, 1.0)]
    for temperature, top_k, top_p, penalty in settings:
        ref = _reference_distribution(lg, history, temperature, top_k, top_p, penalty)
        ids, probs = next_token_distribution(lg, history, temperature, top_k, top_p, penalty)
        np.testing.assert_array_equal(ids, np.flatnonzero(ref > 0), err_msg=f"kept set, {temperature, top_k, top_p}")
        np.testing.assert_allclose(probs, ref[ids], rtol=1e-12, atol=0)
        for seed in range(20):
            want = int(np.random.default_rng(seed).choice(V, p=ref))
            got = sample_next(lg, history, np.random.default_rng(seed), temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=penalty)
            assert got == want, f"seed {seed}, {temperature, top_k, top_p, penalty}: drew {got}, rng.choice drew {want}"

