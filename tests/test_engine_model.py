"""Whole-model tests of engine/model.py: gradients against central differences (float64),
KV-cache decoding against full-sequence logits, generation, and LoRA.

Models are tiny (vocab ~30, hidden 16, 2 layers) with every parameter randomised (norm weights
and biases too, so a gradient that ignores them cannot pass).
"""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from finetune_desktop.engine import LoraConfig, Model, ModelConfig, ops
from finetune_desktop.engine.model import expected_shapes
from finetune_desktop.engine.sampling import sample_next

BASE = dict(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)

CONFIGS = {
    "gqa_bias_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "untied_no_bias_G1": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2_qkv_bias": dict(model_type="qwen2", qkv_bias=True, num_key_value_heads=1, rope_theta=1e6),
    "llama3_rope": dict(rope_theta=500.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral_sliding_window": dict(model_type="mistral", sliding_window=3),
}


def random_params(cfg: ModelConfig, seed: int, dtype=np.float64, std=0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.2 * rng.standard_normal(shape)
        else:
            a = std * rng.standard_normal(shape)
        out[name] = a.astype(dtype)
    return out


def make_model(name="gqa_bias_tied", seed=0, dtype=np.float64, std=0.3, **over) -> Model:
    cfg = ModelConfig(**{**BASE, **CONFIGS[name], **over})
    params = random_params(cfg, seed, np.float64, std)
    return Model(cfg, {k: v.astype(dtype) for k, v in params.items()})


def batch(V, B=2, T=7, seed=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    labels = ids.copy()
    labels[0, 2] = -100
    labels[1, :3] = -100  # e.g. a prompt that is not trained on
    return ids, labels


def sampled_grad_check(m: Model, f, grads: dict, tensors: dict, n_random=3, eps=1e-5, tol=1e-5, seed=0):
    """Compare grads[name] with central differences of f() at a few entries of every tensor:
    the entry with the largest analytic gradient plus n_random random ones."""
    rng = np.random.default_rng(seed)
    failures = []
    for name, W in tensors.items():
        g = grads[name]
        assert g.shape == W.shape, f"{name}: grad shape {g.shape} != weight shape {W.shape}"
        flat = W.reshape(-1)  # a view: perturbing it perturbs the live tensor
        idx = {int(np.argmax(np.abs(g)))} | set(rng.choice(W.size, size=min(n_random, W.size), replace=False).tolist())
        num, ana = [], []
        for i in sorted(idx):
            old = flat[i]
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
            flat[i] = old
            num.append((fp - fm) / (2 * eps))
            ana.append(g.reshape(-1)[i])
        num, ana = np.array(num), np.array(ana)
        scale = max(np.abs(num).max(), 1e-8)
        err = np.abs(num - ana).max() / scale
        if not err < tol:
            failures.append(f"{name}: relative error {err:.2e} (analytic {ana}, numerical {num})")
    assert not failures, "gradient mismatch:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_model_gradients(name):
    m = make_model(name)
    ids, labels = batch(m.config.vocab_size, T=7)
    loss, grads = m.loss_and_grads(ids, labels)
    assert np.isfinite(loss)
    exp = expected_shapes(m.config)
    assert set(grads) == set(exp), f"grad keys differ: missing {set(exp) - set(grads)}, extra {set(grads) - set(exp)}"
    if m.config.tie_word_embeddings:
        assert "lm_head.weight" not in grads
    for k, g in grads.items():
        assert g.dtype == np.float64, f"{k}: grad dtype {g.dtype}"
    f = lambda: m.loss(ids, labels)[0]  # noqa: E731
    assert abs(f() - loss) < 1e-12
    sampled_grad_check(m, f, grads, m.params)


def test_gradients_with_padding_attention_mask():
    m = make_model("gqa_bias_tied")
    ids, labels = batch(m.config.vocab_size, T=7)
    am = np.ones_like(ids)
    am[1, 5:] = 0  # right padding
    labels[1, 5:] = -100
    loss, grads = m.loss_and_grads(ids, labels, attention_mask=am)
    f = lambda: m.loss(ids, labels, attention_mask=am)[0]  # noqa: E731
    sampled_grad_check(m, f, grads, m.params, n_random=2)
    # padding must not change the real positions: same as the unpadded prefix alone
    full = m.logits(ids[1:, :5])
    padded = m.logits(ids, attention_mask=am)[1:, :5]
    np.testing.assert_allclose(padded, full, rtol=1e-10, atol=1e-10)


def test_tied_lm_head_gradient_is_folded_into_embeddings():
    tied = make_model("gqa_bias_tied")
    cfg_u = tied.config.replace(tie_word_embeddings=False)
    params_u = dict(tied.params)
    params_u["lm_head.weight"] = tied.params["model.embed_tokens.weight"].copy()
    untied = Model(cfg_u, params_u)
    ids, labels = batch(tied.config.vocab_size)
    lt, gt = tied.loss_and_grads(ids, labels)
    lu, gu = untied.loss_and_grads(ids, labels)
    assert abs(lt - lu) < 1e-12
    assert "lm_head.weight" not in gt
    folded = gu["model.embed_tokens.weight"] + gu["lm_head.weight"]
    err = np.abs(gt["model.embed_tokens.weight"] - folded).max()
    assert err < 1e-12, f"tied embed grad != embedding grad + lm_head grad (max diff {err:.2e})"
    # and not just one of the two parts
    assert np.abs(gu["lm_head.weight"]).max() > 1e-3 and np.abs(gu["model.embed_tokens.weight"]).max() > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_gradients_only_adapters(dropout):
    m = make_model("gqa_bias_tied")
    m.add_lora(LoraConfig(r=3, alpha=6.0, dropout=dropout), seed=1)
    rng = np.random.default_rng(3)
    for k, v in m.lora.items():  # B = 0 would make every dA zero: randomise it
        if ".lora_B." in k:
            v[...] = 0.3 * rng.standard_normal(v.shape)
    base_before = {k: v.copy() for k, v in m.params.items()}
    ids, labels = batch(m.config.vocab_size)

    def lg():
        return m.loss_and_grads(ids, labels, train=True, rng=np.random.default_rng(11))

    loss, grads = lg()
    assert set(grads) == set(m.lora), (
        f"with LoRA only adapter grads are returned; extra: {sorted(set(grads) - set(m.lora))[:3]}, "
        f"missing: {sorted(set(m.lora) - set(grads))[:3]}")
    assert set(m.trainable_params()) == set(m.lora) and m.trainable_params() is m.lora
    n_layers = m.config.num_hidden_layers
    assert len(m.lora) == 2 * 7 * n_layers

    def f():
        # the forward draws the dropout masks from the rng: a fresh same-seeded rng each call
        logits, _ = m.forward(ids, train=True, rng=np.random.default_rng(11))
        return ops.cross_entropy_forward(logits, labels)[0]

    assert abs(f() - loss) < 1e-12
    if dropout:
        assert abs(m.loss(ids, labels)[0] - loss) > 1e-6, "dropout in train mode must change the loss"
    sampled_grad_check(m, f, grads, m.lora)
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, base_before[k], err_msg=f"{k} changed")


def test_lora_merged_forward_equals_the_adapter_path(monkeypatch):
    """With no dropout, a long enough batch folds scale * B @ A into the weights for the step; the
    loss, logits and adapter gradients must equal the separate adapter path's."""
    m = make_model("gqa_bias_tied", dtype=np.float64, seed=5)
    m.add_lora(LoraConfig(r=3, alpha=6.0, target_modules=("q_proj", "v_proj", "up_proj", "down_proj")), seed=2)
    rng = np.random.default_rng(8)
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v[...] = 0.3 * rng.standard_normal(v.shape)
    ids, labels = batch(m.config.vocab_size, B=4, T=9)
    assert m._lora_effective_weights(ids.size, train=True) is not None, "this batch should take the merged path"
    loss_m, grads_m = m.loss_and_grads(ids, labels, train=True)
    logits_m = m.logits(ids)
    monkeypatch.setattr(Model, "_lora_effective_weights", lambda self, n, train: None)
    loss_a, grads_a = m.loss_and_grads(ids, labels, train=True)
    assert abs(loss_m - loss_a) < 1e-12
    np.testing.assert_allclose(logits_m, m.logits(ids), rtol=1e-12, atol=1e-12)
    assert set(grads_m) == set(grads_a) == set(m.lora)
    for k in grads_a:
        assert _rel(grads_m[k], grads_a[k]) < 1e-10, k


def test_lora_merge_is_skipped_when_it_costs_more_than_it_saves():
    """A few tokens through a large layer: merging every weight would cost more than the adapters."""
    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=True)
    m = Model.from_config(cfg, seed=0)
    m.add_lora(LoraConfig(r=8, alpha=16.0), seed=0)
    assert m._lora_effective_weights(4, train=True) is None
    assert m._lora_effective_weights(4096, train=True) is not None
    m.add_lora(LoraConfig(r=8, alpha=16.0, dropout=0.1), seed=0)
    assert m._lora_effective_weights(4096, train=True) is None, "dropout on the adapter input cannot be merged"
    assert m._lora_effective_weights(4096, train=False) is not None, "evaluation has no dropout"


def test_lora_does_not_allocate_full_size_weight_gradients():
    """A frozen (V, C) embedding is 12.8 MB here; activations for 8 tokens are tiny. If the backward
    computed the embedding/lm_head gradient (or any full-size weight gradient), the traced peak
    would exceed the embedding's size."""
    cfg = ModelConfig(vocab_size=50000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=True)
    m = Model.from_config(cfg, seed=0)
    m.add_lora(LoraConfig(r=4, alpha=8.0), seed=0)
    ids = np.arange(8)[None] * 7
    m.loss_and_grads(ids, ids)  # warm caches (fused weights, rope tables)
    emb_bytes = m.params["model.embed_tokens.weight"].nbytes
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _, grads = m.loss_and_grads(ids, ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(grads) == set(m.lora)
    assert peak < 0.5 * emb_bytes, f"LoRA step peaked at {peak / 1e6:.1f} MB (embedding is {emb_bytes / 1e6:.1f} MB)"


def test_float32_model_returns_float32_grads_and_loss_counts():
    m = make_model("gqa_bias_tied", dtype=np.float32)
    ids, labels = batch(m.config.vocab_size)
    loss, grads = m.loss_and_grads(ids, labels)
    assert all(g.dtype == np.float32 for g in grads.values())
    l2, n, correct = m.loss(ids, labels)
    assert abs(l2 - loss) < 1e-6 and n == int((labels[:, 1:] != -100).sum()) and 0 <= correct <= n
    m64 = make_model("gqa_bias_tied")
    l64, g64 = m64.loss_and_grads(ids, labels)
    assert abs(l64 - loss) < 1e-5
    for k in g64:
        err = np.abs(g64[k] - grads[k]).max() / max(np.abs(g64[k]).max(), 1e-8)
        assert err < 1e-4, f"{k}: float32 grad differs from float64 by {err:.2e}"


def test_out_of_range_token_id_is_an_error():
    m = make_model("gqa_bias_tied")
    with pytest.raises(ValueError, match="out of range"):
        m.logits(np.array([[1, m.config.vocab_size]]))


# ----------------------------------------------------------------------------- batch shards in threads
def _with_threads(m: Model, n: int) -> Model:
    m.threads = n
    return m


@pytest.mark.parametrize("threads", [2, 3])
def test_sharded_batch_equals_single_thread(threads):
    """forward/backward split the batch into shards run in threads; results must not depend on it."""
    one = _with_threads(make_model("gqa_bias_tied", seed=6), 1)
    many = _with_threads(make_model("gqa_bias_tied", seed=6), threads)
    ids, labels = batch(one.config.vocab_size, B=5, T=7)
    am = np.ones_like(ids)
    am[3, 5:] = 0
    labels[3, 5:] = -100
    l1, g1 = one.loss_and_grads(ids, labels, attention_mask=am)
    ln, gn = many.loss_and_grads(ids, labels, attention_mask=am)
    assert abs(l1 - ln) < 1e-12
    assert set(g1) == set(gn)
    for k in g1:
        err = np.abs(g1[k] - gn[k]).max() / max(np.abs(g1[k]).max(), 1e-12)
        assert err < 1e-12, f"{k}: {threads} shards differ from one by {err:.2e}"
    np.testing.assert_allclose(many.logits(ids, attention_mask=am), one.logits(ids, attention_mask=am),
                               rtol=1e-12, atol=1e-12)
    _, g_again = many.loss_and_grads(ids, labels, attention_mask=am)
    for k in gn:
        np.testing.assert_array_equal(g_again[k], gn[k], err_msg=f"{k}: sharded gradients are not deterministic")


@pytest.mark.parametrize("threads", [1, 3])
def test_model_loss_forward_backward_match_the_plain_ops(threads):
    """Model.loss_forward/loss_backward split the loss over the batch-row shards (one shard here
    has no counted token at all); the loss, the counts and dlogits must equal the unsplit ops."""
    m = _with_threads(make_model("gqa_bias_tied", seed=3), threads)
    ids, labels = batch(m.config.vocab_size, B=5, T=7)
    labels[4, :] = -100
    labels[1, 3:] = -100
    logits = m.logits(ids)
    ref_loss, ce = ops.cross_entropy_forward(logits, labels)
    ref_d = ops.cross_entropy_backward(ce, dtype=logits.dtype)
    keep = logits.copy()
    loss, lc = m.loss_forward(logits, labels)
    np.testing.assert_array_equal(logits, keep, err_msg="overwrite_logits=False must leave the logits alone")
    assert abs(loss - ref_loss) < 1e-12 and lc.counted == ce[5] and lc.correct == ce[6]
    np.testing.assert_allclose(m.loss_backward(lc), ref_d, rtol=1e-12, atol=1e-15)
    loss2, lc2 = m.loss_forward(logits, labels, overwrite_logits=True)
    assert abs(loss2 - ref_loss) < 1e-12
    np.testing.assert_allclose(m.loss_backward(lc2), ref_d, rtol=1e-12, atol=1e-15)
    assert m.loss(ids, labels)[:2] == (pytest.approx(ref_loss, rel=1e-12), ce[5])


def test_sharded_lora_step_only_adapter_grads():
    m = _with_threads(make_model("gqa_bias_tied", dtype=np.float32), 2)
    m.add_lora(LoraConfig(r=2, alpha=4.0), seed=0)
    ids, labels = batch(m.config.vocab_size, B=4)
    loss, grads = m.loss_and_grads(ids, labels)
    assert set(grads) == set(m.lora)
    m1 = _with_threads(make_model("gqa_bias_tied", dtype=np.float32), 1)
    m1.add_lora(LoraConfig(r=2, alpha=4.0), seed=0)
    l1, g1 = m1.loss_and_grads(ids, labels)
    assert abs(loss - l1) < 1e-5
    for k in g1:
        assert _rel(grads[k], g1[k]) < 1e-4, k


def test_lora_dropout_with_a_seed_does_not_depend_on_thread_count():
    """The same seed must give the same training step on a 2-core laptop and an 8-core desktop."""
    losses = []
    for threads in (1, 2):
        m = _with_threads(make_model("gqa_bias_tied"), threads)
        m.add_lora(LoraConfig(r=2, alpha=4.0, dropout=0.3), seed=0)
        _randomise_B(m)
        ids, labels = batch(m.config.vocab_size, B=4)
        losses.append(m.loss_and_grads(ids, labels, train=True, rng=np.random.default_rng(0))[0])
    assert abs(losses[0] - losses[1]) < 1e-12, f"loss with 1 thread {losses[0]} != with 2 threads {losses[1]}"


def test_errors_in_a_shard_propagate_and_blas_stays_single_threaded():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    m = _with_threads(make_model("gqa_bias_tied", dtype=np.float32), 2)
    ids = np.zeros((4, 5), dtype=np.int64)
    ids[3, 2] = m.config.vocab_size  # out of range, in the second shard
    with pytest.raises(ValueError, match="out of range"):
        m.logits(ids)
    ok, _ = batch(m.config.vocab_size, B=4)
    m.loss_and_grads(ok, ok)
    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(n == 1 for n in blas), f"BLAS should be switched to one thread once: {blas}"


# ----------------------------------------------------------------------------- KV cache
KV_CASES = ["gqa_bias_tied", "qwen2_qkv_bias", "llama3_rope", "mistral_sliding_window", "untied_no_bias_G1"]


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-8))


@pytest.mark.parametrize("name", KV_CASES)
def test_decode_path_reproduces_full_logits(name):
    """engine/decode.py (weights packed with the norms folded in, fused matmuls, a KV cache):
    a prefill, a prefill of a 3-token chunk after it, then one token at a time, must give the
    full-sequence logits of Model.forward at every position."""
    from finetune_desktop.engine import decode

    m = make_model(name, dtype=np.float32, seed=3)
    T = 14
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, size=T)
    full = m.logits(ids[None])[0]  # (T, V)
    dw = m.decode_weights()
    cache = decode.KVCache.empty(m.config, 1, T)
    errs = [_rel(decode.prefill(dw, ids[:5], cache), full[4])]
    errs.append(_rel(decode.prefill(dw, ids[5:8], cache), full[7]))
    assert cache.length == 8
    cos, sin = ops.rope_tables(m.config.inv_freq(), np.arange(T), m.dtype)
    bufs = decode._Buffers(m.config, m.dtype)
    for t in range(8, T):
        out = decode.step(dw, int(ids[t]), cache, cos[t], sin[t], bufs)
        assert out.shape == (m.config.vocab_size,) and out.dtype == np.float32
        errs.append(_rel(out, full[t]))
    assert cache.length == T
    assert max(errs) < 2e-5, f"{name}: decode logits differ from full logits, per position {np.round(errs, 8)}"


def test_decode_weights_follow_the_weights_version():
    """The packed decode weights are rebuilt exactly when weights_changed() says the weights
    changed, and LoRA is merged into them."""
    m = make_model("gqa_bias_tied", dtype=np.float32, seed=3)
    dw = m.decode_weights()
    assert m.decode_weights() is dw
    m.params["model.norm.weight"] *= 2.0
    m.weights_changed()
    dw2 = m.decode_weights()
    assert dw2 is not dw
    np.testing.assert_allclose(dw2.W_out, dw.W_out * 2.0, rtol=1e-6)
    m.add_lora(LoraConfig(r=2, alpha=4.0), seed=1)
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v[...] = 0.1
    m.weights_changed()
    ids = np.arange(6)
    merged = Model(m.config, m.merged_params())
    assert list(m.generate(ids, max_new_tokens=5)) == list(merged.generate(ids, max_new_tokens=5))


# ----------------------------------------------------------------------------- generate
def gen_model(name="gqa_bias_tied", seed=4):
    return make_model(name, dtype=np.float32, seed=seed, std=0.5)


def slow_generate(m, prompt, n, seed=None, stop_ids=(), **kw):
    """Reference: the full forward over the whole sequence for every new token."""
    rng = np.random.default_rng(seed)
    seq, out = list(prompt), []
    for _ in range(n):
        lg = m.logits(np.array([seq]))[0, -1]
        nxt = sample_next(lg, seq, rng, **kw)
        if nxt in stop_ids:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.mark.parametrize("name", ["gqa_bias_tied", "mistral_sliding_window"])
def test_greedy_generate_equals_iterative_argmax(name):
    m = gen_model(name)
    prompt = [3, 1, 4, 1, 5]
    got = list(m.generate(prompt, max_new_tokens=12, temperature=0.0))
    ref = slow_generate(m, prompt, 12)
    assert got == ref, f"generate {got} != argmax loop {ref}"
    assert len(got) == 12


def test_stop_ids_stop_without_yielding_the_stop_id():
    m = gen_model()
    prompt = [2, 7, 1]
    free = list(m.generate(prompt, max_new_tokens=12))
    stop = free[4]
    k = free.index(stop)
    got = list(m.generate(prompt, max_new_tokens=12, stop_ids=(stop, 10_000)))
    assert got == free[:k], f"with stop id {stop}: {got}, expected {free[:k]}"
    assert stop not in got


def test_seed_makes_sampling_reproducible():
    m = gen_model()
    kw = dict(max_new_tokens=20, temperature=1.5)
    a = list(m.generate([1, 2, 3], seed=123, **kw))
    b = list(m.generate([1, 2, 3], seed=123, **kw))
    c = list(m.generate([1, 2, 3], seed=124, **kw))
    assert a == b
    assert a != c, "different seeds gave the same 20 sampled tokens"


def test_top_k_1_and_tiny_top_p_are_greedy():
    m = gen_model()
    greedy = list(m.generate([5, 6], max_new_tokens=10))
    assert list(m.generate([5, 6], max_new_tokens=10, temperature=2.0, top_k=1, seed=0)) == greedy
    assert list(m.generate([5, 6], max_new_tokens=10, temperature=2.0, top_p=1e-9, seed=0)) == greedy


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0, repetition_penalty=1.8),
    dict(temperature=0.9, top_k=5, seed=7),
    dict(temperature=1.3, top_p=0.7, repetition_penalty=1.3, seed=8),
])
def test_generate_matches_slow_sampling_reference(kw):
    m = gen_model()
    kw = dict(kw)
    seed = kw.pop("seed", None)
    got = list(m.generate([4, 4, 9], max_new_tokens=15, seed=seed, **kw))
    ref = slow_generate(m, [4, 4, 9], 15, seed=seed, **kw)
    assert got == ref, f"{kw}: generate {got} != reference {ref}"


def test_repetition_penalty_changes_greedy_output():
    m = gen_model()
    plain = list(m.generate([1, 2], max_new_tokens=20))
    pen = list(m.generate([1, 2], max_new_tokens=20, repetition_penalty=5.0))
    assert len(set(pen)) >= len(set(plain))
    assert plain != pen or len(set(plain)) == 20


def test_generate_with_lora_uses_merged_weights_and_restores_the_model():
    m = gen_model()
    m.add_lora(LoraConfig(r=2, alpha=4.0), seed=0)
    rng = np.random.default_rng(0)
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v[...] = 0.5 * rng.standard_normal(v.shape)
    params, lora = m.params, m.lora
    got = list(m.generate([3, 3], max_new_tokens=8))
    assert m.params is params and m.lora is lora
    ref = slow_generate(m, [3, 3], 8)  # full forward with live adapters
    assert got == ref
    g = m.generate([3, 3], max_new_tokens=8)
    next(g)
    g.close()  # a chat pane that stops early
    assert m.params is params and m.lora is lora, "closing the generator must restore params and adapters"
    merged = Model(m.config, m.merged_params())
    assert list(merged.generate([3, 3], max_new_tokens=8)) == got


def test_generate_rejects_empty_prompt():
    m = gen_model()
    with pytest.raises(ValueError):
        list(m.generate([], max_new_tokens=3))


# ----------------------------------------------------------------------------- LoRA
def _lora_model(seed=0, **lora_kw):
    m = make_model("gqa_bias_tied", dtype=np.float32, seed=seed)
    m.add_lora(LoraConfig(**{"r": 4, "alpha": 8.0, **lora_kw}), seed=seed)
    return m


def _randomise_B(m, seed=0, std=0.2):
    rng = np.random.default_rng(seed)
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v[...] = std * rng.standard_normal(v.shape)


def test_lora_starts_at_the_base_model():
    base = make_model("gqa_bias_tied", dtype=np.float32)
    m = _lora_model()
    ids, _ = batch(m.config.vocab_size)
    assert all(not v.any() for k, v in m.lora.items() if ".lora_B." in k), "B must start at zero"
    assert all(v.any() for k, v in m.lora.items() if ".lora_A." in k), "A must start random"
    np.testing.assert_array_equal(m.logits(ids), base.logits(ids))


def test_lora_targets_and_shapes():
    m = _lora_model(target_modules=("q_proj", "down_proj"))
    names = sorted(m.lora)
    assert names == sorted(f"model.layers.{l}.{mod}.lora_{ab}.weight" for l in range(2)
                           for mod in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB")
    q = m.params["model.layers.0.self_attn.q_proj.weight"]
    assert m.lora["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, q.shape[1])
    assert m.lora["model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (q.shape[0], 4)
    assert m.lora_config.scale == 2.0


@pytest.mark.parametrize("targets", [None, ("k_proj", "v_proj", "up_proj")])
def test_merge_lora_equals_forward_with_adapters(targets):
    kw = {} if targets is None else {"target_modules": targets}
    m = _lora_model(**kw)
    _randomise_B(m)
    ids, _ = batch(m.config.vocab_size)
    with_adapters = m.logits(ids)
    base_logits = Model(m.config, dict(m.params)).logits(ids)
    assert _rel(with_adapters, base_logits) > 1e-3, "the nonzero adapters must change the logits"
    m.merge_lora()
    assert m.lora is None and m.lora_config is None
    merged = m.logits(ids)
    err = _rel(merged, with_adapters)
    assert err < 1e-5, f"merged model logits differ from adapter forward by {err:.2e}"


def test_merge_lora_releases_the_unmerged_weights():
    """After merge_lora the old base weights (and any fused copies made of them) must be freeable:
    for a 135M model they are hundreds of MB."""
    import gc
    import weakref
    m = _lora_model()
    _randomise_B(m)
    ids, labels = batch(m.config.vocab_size)
    m.loss_and_grads(ids, labels)  # a training step (builds whatever caches the forward uses)
    name = "model.layers.0.self_attn.q_proj.weight"
    old = weakref.ref(m.params[name])
    m.merge_lora()
    gc.collect()
    assert old() is None, f"the unmerged {name} is still referenced after merge_lora (a stale cache?)"
    m.loss_and_grads(ids, labels)  # full fine-tuning now works on the merged weights
    assert set(m.loss_and_grads(ids, labels)[1]) == set(expected_shapes(m.config))


def test_merged_params_leaves_params_untouched():
    m = _lora_model()
    _randomise_B(m)
    before = {k: v.copy() for k, v in m.params.items()}
    ids = [k for k in m.params]
    merged = m.merged_params()
    assert list(m.params) == ids and m.lora is not None
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"merged_params changed {k}")
    q = "model.layers.0.self_attn.q_proj.weight"
    A, B = m.lora[q.replace(".weight", ".lora_A.weight")], m.lora[q.replace(".weight", ".lora_B.weight")]
    np.testing.assert_allclose(merged[q], m.params[q] + 2.0 * B @ A, rtol=1e-6, atol=1e-7)
    assert merged["model.norm.weight"] is m.params["model.norm.weight"]  # untouched tensors are shared


def test_save_and_load_adapter_round_trip(tmp_path):
    m = _lora_model(dropout=0.05)
    _randomise_B(m)
    m.save_adapter(tmp_path / "adapter", base_model_name_or_path="base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    from finetune_desktop.engine.checkpoint import read_safetensors
    names = set(read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert names == {"base_model.model." + k for k in m.lora}, sorted(names)[:2]

    m2 = make_model("gqa_bias_tied", dtype=np.float32)
    m2.load_adapter(tmp_path / "adapter")
    a, b = m2.lora_config, m.lora_config
    assert (a.r, a.alpha, a.dropout, set(a.target_modules)) == (b.r, b.alpha, b.dropout, set(b.target_modules))
    for k, v in m.lora.items():
        np.testing.assert_array_equal(m2.lora[k], v, err_msg=k)
    ids, _ = batch(m.config.vocab_size)
    np.testing.assert_array_equal(m2.logits(ids), m.logits(ids))


def test_load_adapter_with_wrong_rank_names_the_tensor(tmp_path):
    m = _lora_model()
    m.save_adapter(tmp_path / "a")
    other = make_model("gqa_bias_tied", dtype=np.float32, hidden_size=32, num_attention_heads=4)
    with pytest.raises(Exception, match="lora_A"):
        other.load_adapter(tmp_path / "a")


def test_an_adapter_step_keeps_the_fused_base_weights_but_refreshes_decoding():
    m = make_model("gqa_bias_tied", dtype=np.float32, seed=3)
    m.add_lora(LoraConfig(r=2, alpha=4.0), seed=1)
    stems = m._layer_groups(0)[0]
    W1, _ = m._fused(stems)
    dw1 = m.decode_weights()
    for k, v in m.lora.items():
        if ".lora_B." in k:
            v += 0.05
    m.weights_changed(adapters_only=True)
    assert m._fused(stems)[0] is W1            # frozen base weights: the fused copy stays
    dw2 = m.decode_weights()
    assert dw2 is not dw1                      # the adapters changed the merged weights
    assert not np.allclose(dw2.layers[0][0], dw1.layers[0][0])
    q = stems[0] + ".weight"
    m.params[q][...] *= 1.5                    # an in-place change lands in the stacked weight
    m.weights_changed()
    assert m._fused(stems)[0] is W1 and np.shares_memory(m.params[q], W1)
    np.testing.assert_array_equal(W1[:m.params[q].shape[0]], m.params[q])
    m.params[q] = m.params[q] * 2.0            # a new array breaks the link: stacked again
    m.weights_changed()
    W2, _ = m._fused(stems)
    assert W2 is not W1 and np.shares_memory(m.params[q], W2)
    np.testing.assert_array_equal(W2[:m.params[q].shape[0]], m.params[q])


def test_merged_lora_copies_only_for_small_models():
    """The merged (W + BA) copies double the adapted weights in memory: made for small models
    with long batches, never for 135M-class ones."""
    from finetune_desktop.engine.lora import MERGE_MAX_WEIGHTS, merging_pays_off
    small = [(576, 192, 16), (192, 192, 16), (1024, 192, 16), (192, 512, 16)] * 6    # the embedded model's shapes
    big = [(960, 576, 16), (576, 576, 16), (3072, 576, 16), (576, 1536, 16)] * 30    # a SmolLM2-135M shape
    assert sum(o * i for o, i, _ in small) <= MERGE_MAX_WEIGHTS < sum(o * i for o, i, _ in big)
    assert merging_pays_off(8 * 100, small) and not merging_pays_off(1, small)
    assert not merging_pays_off(4 * 256, big) and not merging_pays_off(10**6, big)


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(lora):
    """Checkpointed layers run their forward again in the backward, with the LoRA-dropout draws
    replayed from the saved random state: loss and every gradient equal the stored-activation path."""
    def run(ckpt):
        m = make_model("gqa_bias_tied", dtype=np.float64, seed=5)
        if lora:
            m.add_lora(LoraConfig(r=2, alpha=4.0, dropout=0.3), seed=1)
            _randomise_B(m)
        m.activation_checkpointing = ckpt
        ids, labels = batch(m.config.vocab_size)
        _, cache = m.forward_hidden(ids, train=True, rng=np.random.default_rng(9))
        rms = m.residual_rms(cache)
        hl = m.head_loss(cache, labels)
        return hl.loss, m.backward_hidden(hl, cache), rms

    (l0, g0, r0), (l1, g1, r1) = run(False), run(True)
    assert l0 == l1 and set(g0) == set(g1)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-12, atol=1e-14, err_msg=k)
    np.testing.assert_allclose(r1, r0, rtol=1e-9)


def test_activation_checkpointing_keeps_a_fraction_of_the_activations():
    m = make_model("gqa_bias_tied", dtype=np.float32, seed=5, num_hidden_layers=6)
    ids, _ = batch(m.config.vocab_size, B=4, T=64)
    kept = {}
    for ckpt in (False, True):
        m.activation_checkpointing = ckpt
        tracemalloc.start()
        _, cache = m.forward_hidden(ids, train=True)
        kept[ckpt] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del cache
    assert kept[True] * 3 < kept[False], kept


@pytest.mark.parametrize("lora", [False, True])
def test_a_one_row_batch_split_over_threads_gives_the_same_numbers(lora):
    """A batch of one row on two threads splits its matrix products by rows and its attention by KV
    heads (parallel.spare_threads, engine/split.py): loss and every gradient equal one thread's."""
    def run(threads):
        m = make_model("gqa_bias_tied", dtype=np.float64, seed=5)
        if lora:
            m.add_lora(LoraConfig(r=2, alpha=4.0), seed=1)
            _randomise_B(m)
        m.threads = threads
        ids = np.random.default_rng(3).integers(0, m.config.vocab_size, (1, 60))
        labels = ids.copy()
        labels[0, :10] = -100
        return m.loss_and_grads(ids, labels)

    (l1, g1), (l2, g2) = run(1), run(2)
    assert abs(l1 - l2) < 1e-12 and set(g1) == set(g2)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-13, err_msg=k)
