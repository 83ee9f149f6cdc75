"""Train/validation split and length-bucketed batches: determinism, coverage, padding, masks."""
import numpy as np
import pytest

from finetune_desktop.data import EncodedExample, make_batches, split_train_valid
from finetune_desktop.data.batching import batch_order, padded_tokens


def ex(n, line, trained=None, seed=0):
    rng = np.random.default_rng(seed + line)
    ids = rng.integers(1, 300, size=n).astype(np.int32)
    labels = np.full(n, -100, dtype=np.int32)
    t = n // 2 if trained is None else trained
    if t:
        labels[n - t:] = ids[n - t:]
    return EncodedExample(ids, labels, line, 0)


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(100))
    a_tr, a_va = split_train_valid(items, 0.2, seed=3)
    b_tr, b_va = split_train_valid(items, 0.2, seed=3)
    assert (a_tr, a_va) == (b_tr, b_va)
    assert len(a_va) == 20 and len(a_tr) == 80
    assert sorted(a_tr + a_va) == items and not set(a_tr) & set(a_va)
    assert a_tr == sorted(a_tr) and a_va == sorted(a_va)  # file order kept
    c_tr, c_va = split_train_valid(items, 0.2, seed=4)
    assert c_va != a_va


def test_split_edge_cases():
    assert split_train_valid([1, 2, 3], 0.0, 0) == ([1, 2, 3], [])
    tr, va = split_train_valid([1, 2, 3], 0.01, 0)  # rounds to 0, but a requested split holds out one
    assert len(va) == 1 and len(tr) == 2
    tr, va = split_train_valid([1, 2], 0.9, 0)      # always leaves one for training
    assert len(tr) == 1 and len(va) == 1
    assert split_train_valid([1], 0.5, 0) == ([1], [])
    assert split_train_valid([], 0.5, 0) == ([], [])
    with pytest.raises(ValueError):
        split_train_valid([1, 2], 1.0, 0)
    with pytest.raises(ValueError):
        split_train_valid([1, 2], -0.1, 0)


def test_batches_cover_every_example_once_with_correct_padding():
    exs = [ex(n, i + 1) for i, n in enumerate([5, 17, 3, 9, 30, 12, 8, 8, 21, 2, 14, 6, 11])]
    batches = make_batches(exs, 4, seed=1, epoch=0, pad_id=7)
    lines = sorted(l for b in batches for l in b.lines)
    assert lines == list(range(1, 14))
    by_line = {e.line: e for e in exs}
    for b in batches:
        B, T = b.input_ids.shape
        assert b.input_ids.dtype == np.int64 and b.labels.dtype == np.int64 and b.attention_mask.dtype == np.int8
        assert b.labels.shape == b.attention_mask.shape == (B, T) and B <= 4
        assert T == max(len(by_line[l]) for l in b.lines)
        for row, line in enumerate(b.lines):
            e = by_line[line]
            n = len(e)
            assert b.input_ids[row, :n].tolist() == e.input_ids.tolist()          # right padding
            assert b.labels[row, :n].tolist() == e.labels.tolist()
            assert (b.input_ids[row, n:] == 7).all() and (b.labels[row, n:] == -100).all()
            assert b.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
        assert b.num_trained_tokens == int((b.labels[:, 1:] != -100).sum())
        assert b.num_tokens == int(b.attention_mask.sum())


def test_batches_are_deterministic_per_seed_and_epoch():
    exs = [ex(int(n), i) for i, n in enumerate(np.random.default_rng(0).integers(3, 60, size=200))]
    a = make_batches(exs, 8, seed=5, epoch=2)
    b = make_batches(exs, 8, seed=5, epoch=2)
    assert [x.lines for x in a] == [x.lines for x in b]
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert [x.lines for x in make_batches(exs, 8, seed=5, epoch=3)] != [x.lines for x in a]
    assert [x.lines for x in make_batches(exs, 8, seed=6, epoch=2)] != [x.lines for x in a]


def test_length_bucketing_reduces_padding():
    lengths = np.random.default_rng(1).integers(5, 500, size=2000)
    exs = [ex(int(n), i) for i, n in enumerate(lengths)]
    batches = make_batches(exs, 8, seed=0, epoch=0)
    padded = sum(b.input_ids.size for b in batches)
    real = int(lengths.sum())
    assert padded == padded_tokens(lengths, 8)
    # random batching would pad to ~ the max of 8 uniform lengths (~440 of a ~250 mean): ~75% waste
    assert padded / real < 1.10, padded / real
    # batch order is shuffled: not simply longest first
    maxes = [b.input_ids.shape[1] for b in batches]
    assert maxes != sorted(maxes, reverse=True)


def test_examples_without_trained_tokens_are_skipped():
    exs = [ex(10, 1), ex(10, 2, trained=0), ex(10, 3, trained=1)]  # one trained token at the very end still counts
    batches = make_batches(exs, 8, 0, 0)
    assert sorted(l for b in batches for l in b.lines) == [1, 3]
    assert make_batches([], 4, 0, 0) == []
    with pytest.raises(ValueError):
        batch_order([1, 2], 0, 0, 0)
