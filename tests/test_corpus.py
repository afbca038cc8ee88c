"""Tests for moe_jax.corpus: tokenizer, corpus sources and their split, errors."""
import json
import platform

import numpy as np
import pytest

from moe_jax import run_config, trainer
from moe_jax.corpus import ByteTokenizer, Corpus, DataError, load_corpus
from tests.helpers import random_tokens

SMALL = 64 * 1024  # max_bytes for stdlib loads: keeps every test fast


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["", "hello, world\n", "naïve café — 日本語 🚀", "\x00\x7f"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_tokenizer_decode_ignores_out_of_range_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    assert ByteTokenizer.vocab_size == 256
    assert tok.decode(np.array([104, 300, 105, 65535], np.int32)) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"


# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_loads_deterministically():
    a = load_corpus(None, max_bytes=SMALL)
    b = load_corpus("stdlib", max_bytes=SMALL)
    assert isinstance(a, Corpus)
    assert a.train.dtype == np.uint16 and a.val.dtype == np.uint16 and a.test.dtype == np.uint16
    assert len(a.train) > 0 and len(a.val) > 0 and len(a.test) > 0
    assert len(a.train) + len(a.val) + len(a.test) == SMALL
    assert a.vocab_size == 256
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.description == b.description and a.identity == b.identity
    assert f"Python {platform.python_version()}" in a.description
    assert "standard library" in a.description
    # It is Python source.
    assert b"def " in a.train.astype(np.uint8).tobytes()


def test_stdlib_corpus_default_size_splits_by_file():
    c = load_corpus(None, max_bytes=2 * 2**20)
    assert len(c.train) + len(c.val) + len(c.test) == 2 * 2**20
    assert 0 < len(c.val) < len(c.train) and 0 < len(c.test) < len(c.train)
    assert " files (" in c.description
    files = c.identity["splits"]
    assert files["train"]["files"] + files["val"]["files"] + files["test"]["files"] == sum(map(len, c.split_keys))
    assert not set(c.split_keys[0]) & set(c.split_keys[1]) and not set(c.split_keys[1]) & set(c.split_keys[2])
    assert not set(c.split_keys[0]) & set(c.split_keys[2])


def test_stdlib_corpus_tiny_cap_still_has_both_splits():
    c = load_corpus(None, max_bytes=100)
    assert len(c.train) == 95 and len(c.val) == 2 and len(c.test) == 3


# ---------------------------------------------------------------- text sources


def test_single_text_file_splits_by_tail(tmp_path):
    text = "".join(chr(c) for c in np.random.default_rng(1).integers(32, 0x3000, size=3000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = text.encode("utf-8")
    c = load_corpus(str(path), val_percent=10)
    assert c.source == str(path)
    assert c.vocab_size == 256
    held_out = -(-len(data) // 10)
    assert len(c.val) == held_out // 2 and len(c.test) == held_out - held_out // 2
    assert np.concatenate([c.train, c.val, c.test]).astype(np.uint8).tobytes() == data
    capped = load_corpus(str(path), max_bytes=1000)
    assert len(capped.train) + len(capped.val) + len(capped.test) == 1000


def test_glob_of_text_files_splits_by_file(tmp_path):
    rng = np.random.default_rng(2)
    contents = {}
    for i in range(40):
        body = bytes(rng.integers(97, 123, size=int(rng.integers(50, 200))).astype(np.uint8))
        contents[f"doc{i:02d}.md"] = body
        (tmp_path / f"doc{i:02d}.md").write_bytes(body)
    (tmp_path / "empty.md").write_bytes(b"")  # empty files in a glob are skipped
    (tmp_path / "other.txt").write_bytes(b"not matched")
    c = load_corpus(str(tmp_path / "*.md"), max_bytes=None, val_percent=20)
    assert len(c.train) > 0 and len(c.val) > 0 and len(c.test) > 0
    splits = [a.astype(np.uint8).tobytes() for a in (c.train, c.val, c.test)]
    # Every file lands whole (plus its newline separator) in exactly one split.
    assert sum(map(len, splits)) == sum(len(b) + 1 for b in contents.values())
    for body in contents.values():
        assert sum(body + b"\n" in split for split in splits) == 1
    assert b"not matched" not in b"".join(splits)
    again = load_corpus(str(tmp_path / "*.md"), max_bytes=None, val_percent=20)
    np.testing.assert_array_equal(c.val, again.val)
    np.testing.assert_array_equal(c.test, again.test)


def test_glob_recursive_and_single_match(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_bytes(b"0123456789" * 10)
    c = load_corpus(str(tmp_path / "**" / "*.txt"), val_percent=5)
    assert len(c.train) == 95 and len(c.val) == 2 and len(c.test) == 3


# ---------------------------------------------------------------- .bin sources


def test_bin_memmap_tail_split(tmp_path):
    tokens = random_tokens(10_000, vocab=50257, seed=3)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    c = load_corpus(str(path), val_percent=5)
    assert isinstance(c.train, np.memmap) and isinstance(c.val, np.memmap) and isinstance(c.test, np.memmap)
    assert len(c.val) == 250 and len(c.test) == 250
    np.testing.assert_array_equal(np.concatenate([c.train, c.val, c.test]), tokens)
    assert c.vocab_size == int(tokens.max()) + 1
    assert load_corpus(str(path), vocab_size=50304).vocab_size == 50304


def test_bin_train_val_pairing(tmp_path):
    train, val = random_tokens(5000, vocab=1000, seed=4), random_tokens(700, vocab=2000, seed=5)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    c = load_corpus(str(tmp_path / "train.bin"))
    assert isinstance(c.train, np.memmap) and isinstance(c.val, np.memmap)
    np.testing.assert_array_equal(c.train, train)
    np.testing.assert_array_equal(np.concatenate([c.val, c.test]), val)  # no test.bin: val.bin halved
    assert len(c.val) == 350
    assert c.vocab_size == max(int(train.max()), int(val.max())) + 1
    assert str(tmp_path / "val.bin") in c.description
    test = random_tokens(300, vocab=3000, seed=6)
    test.tofile(tmp_path / "test.bin")
    with_test = load_corpus(str(tmp_path / "train.bin"))
    np.testing.assert_array_equal(with_test.val, val)
    np.testing.assert_array_equal(with_test.test, test)
    assert with_test.vocab_size == max(int(train.max()), int(val.max()), int(test.max())) + 1


def test_test_split_is_carved_from_the_old_validation_files():
    """Training files are those of the two-way split by crc32(path) % 100 < val_percent; the
    held-out files are divided between validation and test, disjointly and stably."""
    import zlib

    c = load_corpus(None)
    train, val, test = (set(keys) for keys in c.split_keys)
    held_out = {key for key in train | val | test if zlib.crc32(key.encode()) % 100 < 5.0}
    assert val | test == held_out and not val & test and not train & held_out
    assert len(val) >= 10 and len(test) >= 10  # the default corpus: enough files on each side
    again = load_corpus(None)
    assert again.identity == c.identity
    assert c.identity["splits"]["test"]["sha256"] != c.identity["splits"]["val"]["sha256"]


def test_corpus_too_small_for_three_splits_raises(tmp_path):
    path = tmp_path / "two.txt"
    path.write_bytes(b"ab")
    with pytest.raises(DataError, match="at least 3 are needed for a train / validation / test split"):
        load_corpus(str(path))


def test_bin_vocab_size_too_small_raises(tmp_path):
    path = tmp_path / "tok.bin"
    np.array([1, 2, 700, 3], np.uint16).tofile(path)
    with pytest.raises(DataError, match="700"):
        load_corpus(str(path), vocab_size=512)


# ---------------------------------------------------------------- what a token is


def test_bits_metric_names_what_a_token_is(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"0123456789" * 10)
    random_tokens(1000, vocab=50257, seed=6).tofile(tmp_path / "tokens.bin")
    for text in (load_corpus(None, max_bytes=SMALL), load_corpus(str(tmp_path / "a.txt"))):
        assert text.tokens_are_bytes and text.bits_metric == "val_bpb"
    tokens = load_corpus(str(tmp_path / "tokens.bin"))
    assert not tokens.tokens_are_bytes and tokens.bits_metric == "val_bits_per_token"


def test_training_on_a_token_file_reports_bits_per_token_not_per_byte(tmp_path):
    random_tokens(20_000, vocab=300, seed=8).tofile(tmp_path / "tokens.bin")
    config = run_config.default_config("micro")
    config.data.path = str(tmp_path / "tokens.bin")
    config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    summary = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    for metrics in (summary, record):
        assert "val_bpb" not in metrics
        np.testing.assert_allclose(metrics["val_bits_per_token"], metrics["val_loss"] / np.log(2), rtol=1e-6)
    assert "validation bits per token" in trainer.format_summary(summary)


# ---------------------------------------------------------------- errors


def test_missing_path_raises(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist") as e:
        load_corpus(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_glob_matching_nothing_raises(tmp_path):
    pattern = str(tmp_path / "*.md")
    with pytest.raises(DataError, match="matches no files") as e:
        load_corpus(pattern)
    assert pattern in str(e.value)


def test_empty_text_file_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as e:
        load_corpus(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "odd"])
def test_bad_bin_raises(tmp_path, content):
    path = tmp_path / "tokens.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_corpus(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_odd_val_bin_raises(tmp_path):
    random_tokens(100).tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="odd byte size") as e:
        load_corpus(str(tmp_path / "train.bin"))
    assert str(tmp_path / "val.bin") in str(e.value)


def test_directory_and_bad_val_percent_raise(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_corpus(str(tmp_path))
    with pytest.raises(DataError, match="val_percent"):
        load_corpus(None, val_percent=0)


def test_a_data_error_reaches_the_caller_as_the_config_error_it_is(tmp_path):
    """The binaries report ValueErrors as one line naming the field: a missing corpus raised while a
    run is built is one of them, naming data.path."""
    from moe_jax import run_config, trainer

    config = run_config.default_config("micro")
    config.data.path = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"data.path=.*missing.txt.* does not exist"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
