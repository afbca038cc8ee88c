"""Tests for moe_jax.data: training batch determinism, resumption, sharding, eval batches."""
import numpy as np
import pytest

from moe_jax.corpus import DataError, load_corpus
from moe_jax.data import BatchIterator, eval_batches
from tests.helpers import random_tokens


# ---------------------------------------------------------------- training batches


TOKENS = random_tokens(5000, seed=7)


def make_iter(**kw):
    args = dict(batch_size=8, seq_len=16, seed=0)
    args.update(kw)
    return BatchIterator(TOKENS, **args)


def test_batch_shapes_and_shifted_targets():
    b = next(make_iter())
    assert b["inputs"].shape == (8, 16) and b["targets"].shape == (8, 16)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    # Each row is a real window of the stream.
    stream = TOKENS.astype(np.int32)
    for row_in, row_t in zip(b["inputs"], b["targets"]):
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, 17)
                                       == np.append(row_in, row_t[-1]), axis=1))
        assert len(starts) >= 1


def test_batches_deterministic_per_seed():
    a, b, c = make_iter(seed=1), make_iter(seed=1), make_iter(seed=2)
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
        assert not np.array_equal(x["inputs"], z["inputs"])
    # Consecutive steps differ.
    assert not np.array_equal(a.batch_at(0)["inputs"], a.batch_at(1)["inputs"])


def test_resumption_matches_uninterrupted_run():
    fresh = make_iter(seed=3)
    run = [next(fresh) for _ in range(6)]
    assert fresh.step == 6 and fresh.state() == {"step": 6, "seed": 3}
    resumed = make_iter(seed=3, start_step=4)
    assert resumed.step == 4
    for want in run[4:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])
    np.testing.assert_array_equal(make_iter(seed=3).batch_at(5)["inputs"], run[5]["inputs"])
    # batch_at does not advance the iterator.
    assert fresh.batch_at(0)["inputs"].shape == (8, 16) and fresh.step == 6


def test_iterator_protocol():
    it = make_iter()
    batches = [b for _, b in zip(range(3), it)]
    assert len(batches) == 3 and it.step == 3


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_sharding_concatenates_to_global_batch(process_count):
    full = make_iter(seed=5).batch_at(3)
    parts = [make_iter(seed=5, process_index=i, process_count=process_count).batch_at(3)
             for i in range(process_count)]
    for key in ("inputs", "targets"):
        assert parts[0][key].shape == (8 // process_count, 16)
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_batch_iterator_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        make_iter(batch_size=6, process_count=4)
    with pytest.raises(DataError, match="17"):
        BatchIterator(TOKENS[:10], batch_size=2, seq_len=16, seed=0)


def test_batch_iterator_reads_memmap(tmp_path):
    TOKENS.tofile(tmp_path / "t.bin")
    c = load_corpus(str(tmp_path / "t.bin"))
    a = BatchIterator(c.train, batch_size=4, seq_len=16, seed=9).batch_at(2)
    b = BatchIterator(np.asarray(TOKENS[: len(c.train)]), batch_size=4, seq_len=16, seed=9).batch_at(2)
    assert type(a["inputs"]) is np.ndarray
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ---------------------------------------------------------------- eval batches


def test_eval_batches_are_consecutive_non_overlapping_windows():
    tokens = random_tokens(1000, seed=11)
    batches = eval_batches(tokens, batch_size=4, seq_len=10, max_batches=None)
    assert len(batches) == (999 // 10) // 4  # partial last batch dropped
    inputs = np.concatenate([b["inputs"] for b in batches]).ravel()
    targets = np.concatenate([b["targets"] for b in batches]).ravel()
    n = len(inputs)
    np.testing.assert_array_equal(inputs, tokens[:n])
    np.testing.assert_array_equal(targets, tokens[1:n + 1])
    again = eval_batches(tokens, batch_size=4, seq_len=10, max_batches=None)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert len(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3)) == 3


def test_eval_batches_sharded_and_too_short():
    tokens = random_tokens(500, seed=12)
    full = eval_batches(tokens, batch_size=4, seq_len=8, max_batches=5)
    halves = [eval_batches(tokens, batch_size=4, seq_len=8, max_batches=5, process_index=i, process_count=2)
              for i in range(2)]
    for j, batch in enumerate(full):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][j]["inputs"], halves[1][j]["inputs"]]), batch["inputs"])
    with pytest.raises(DataError, match="33"):
        eval_batches(tokens[:20], batch_size=4, seq_len=8, max_batches=1)


@pytest.mark.parametrize("length,batch_size,seq_len", [(1001, 4, 16), (50, 3, 7), (2, 2, 4), (65, 2, 8)])
def test_split_batches_visit_every_target_once(length, batch_size, seq_len):
    from moe_jax.data import split_batches

    tokens = np.random.default_rng(length).integers(0, 65535, length).astype(np.uint16)
    batches = split_batches(tokens, batch_size=batch_size, seq_len=seq_len)
    masks = np.concatenate([b["mask"].reshape(-1) for b in batches])
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    assert masks.sum() == length - 1  # every target counted once
    real = masks > 0
    np.testing.assert_array_equal(targets[real], tokens[1:])  # in order, none twice, none missing
    np.testing.assert_array_equal(inputs[real], tokens[:-1])
    assert np.all(real[:length - 1]) and not np.any(real[length - 1:])  # padding only at the very end
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (batch_size, seq_len)
    # the same windows on every call; a process takes its rows of each batch
    again = split_batches(tokens, batch_size=batch_size, seq_len=seq_len)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["targets"], b["targets"])
    if batch_size % 2 == 0:
        halves = [split_batches(tokens, batch_size=batch_size, seq_len=seq_len, process_index=i, process_count=2)
                  for i in range(2)]
        for whole, first, second in zip(batches, *halves):
            np.testing.assert_array_equal(np.concatenate([first["mask"], second["mask"]]), whole["mask"])


def test_split_batches_refuse_a_split_without_a_target():
    from moe_jax.data import split_batches

    with pytest.raises(DataError, match="at least 2 are needed"):
        split_batches(np.zeros(1, np.uint16), batch_size=2, seq_len=4)
