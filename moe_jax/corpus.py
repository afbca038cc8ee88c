"""Corpora for byte-level language modelling: sources and their train / validation / test split.

Token streams are 1-D `uint16` arrays. One entry point, `load_corpus`,
turns a `data.path` setting into a `Corpus` with a train, a validation and
a test split (validation: evaluations during training and development;
test: the final evaluation that claims are judged on):

* `None` / `""` / `"stdlib"`: the Python standard library's own `.py`
  sources, byte-tokenized (see `stdlib_corpus` for what is excluded).
  The corpus description names the Python version, because the corpus is a
  function of it.
* a text file, or a glob of text files (`"docs/**/*.md"`): raw UTF-8 bytes,
  byte-tokenized (vocab 256).
* a nanoGPT-style `.bin` token file: raw little-endian `uint16`, opened with
  `np.memmap` (read-only, never copied). `X/train.bin` is paired with
  `X/val.bin` when that exists.

Text corpora are split *by file*, deterministically: a file is held out iff
`crc32(path) % 100 < val_percent`, and a held-out file is in test iff
`crc32("test:" + path)` is odd, else in validation. So the training files are
those of the two-way split this replaced, and test was carved out of its
validation files: runs trained before stay valid for the test split. A
single file (or a single `.bin` without `val.bin`), or fewer than three
files, is split by position instead: the last `val_percent` of the tokens is
held out, its first half validation and its second half test. For
`X/train.bin`, `X/val.bin` is validation and `X/test.bin` test; without a
`test.bin`, the second half of `val.bin` is test. All three splits are
always non-empty (a corpus too small for that is an error), and
`Corpus.identity` names each split by its files (or positions) with a
SHA-256. Multi-file corpora join files with a `b"\\n"` after each file.

Batches over a corpus's splits come from :mod:`moe_jax.data`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import pathlib
import platform
import sysconfig
import zlib
from collections.abc import Iterable
from typing import ClassVar

import numpy as np

DEFAULT_MAX_BYTES = 8 * 2**20
DEFAULT_VAL_PERCENT = 5.0
# A .bin file with at most this many tokens (train + val) is scanned for its
# largest token id when no vocab_size is given; larger ones must name it.
MAX_SCANNED_TOKENS = 64 * 2**20
_SCAN_CHUNK = 16 * 2**20

# Directory names (anywhere in the relative path) left out of the stdlib corpus:
# installed third-party code, test suites, caches, and generated data tables
# (codec charmaps, pydoc topic dumps).
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                                   "encodings", "pydoc_data"})

_PATH_HINT = (
    "pass an existing text file, a glob like 'docs/*.md', a nanoGPT-style uint16 "
    ".bin file, or leave it empty for the Python standard library corpus"
)


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and the fix."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255. Models may pad their vocab larger."""

    vocab_size: ClassVar[int] = 256

    def encode(self, text: str) -> np.ndarray:
        """`str` -> `uint16 [len(text.encode('utf-8'))]`."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Token ids (any shape) -> text. Ids outside 0..255 are dropped;
        invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A token stream split for training, validation and test.

    Attributes:
      train: `uint16 [N_train]` (an `np.memmap` for `.bin` sources).
      val: `uint16 [N_val]` (likewise).
      test: `uint16 [N_test]` (likewise).
      source: where the tokens came from: the stdlib directory, the file path or
        glob as given, or the `.bin` path.
      description: one human-readable line for logs (sizes, file counts, and for
        the stdlib corpus the Python version).
      vocab_size: number of token ids the model must embed (256 for text).
      tokens_are_bytes: whether each token is one byte of the text (text sources),
        so that a loss per token is a loss per byte. False for `.bin` files,
        whose tokens are a tokenizer's ids of unknown length in bytes.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str
    description: str
    vocab_size: int = ByteTokenizer.vocab_size
    tokens_are_bytes: bool = True
    split_keys: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = ((), (), ())  # files per split

    @property
    def identity(self) -> dict:
        """What a reader needs to know it has the same data: the source, and per split its tokens,
        files and the SHA-256 of its file list (or of its position in the source)."""
        splits = {}
        for name, tokens, keys in zip(("train", "val", "test"), (self.train, self.val, self.test), self.split_keys):
            sizes = f"{len(self.train)}|{len(self.val)}|{len(self.test)}"
            text = "\n".join(keys) if keys else f"{self.source}|{name}|{sizes}"
            splits[name] = {"tokens": int(len(tokens)), "files": len(keys) or None,
                            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        return {"source": self.source, "description": self.description, "vocab_size": self.vocab_size,
                "splits": splits}

    @property
    def bits_metric(self) -> str:
        """The name of the validation loss in bits: `"val_bpb"` (bits per byte)
        where a token is a byte, else `"val_bits_per_token"`."""
        return "val_bpb" if self.tokens_are_bytes else "val_bits_per_token"


def load_corpus(path: str | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                val_percent: float = DEFAULT_VAL_PERCENT, vocab_size: int | None = None) -> Corpus:
    """Load the corpus named by `path` (see the module docstring for formats).

    Args:
      path: `None`, `""` or `"stdlib"` for the standard-library corpus; a
        text file; a glob of text files (contains `*`, `?` or `[`;
        `**` recurses); or a `.bin` file of little-endian `uint16` tokens.
      max_bytes: cap on the bytes read from text sources (files taken in sorted
        order, the last one truncated); `None` for no cap. `.bin` files are
        memory-mapped and always used whole.
      val_percent: percentage (0 < p < 100) of files, or of the tail of a
        single file, held out (half validation, half test).
      vocab_size: `.bin` only (ignored for text, which is always 256). If
        omitted, it is `max token + 1`, found by scanning the file, which is
        allowed only up to `MAX_SCANNED_TOKENS` tokens. If given, it is
        checked against the data whenever the file is that small.

    Raises:
      DataError: the path is missing, matches nothing, is empty, is not a valid
        `.bin` file, or the arguments cannot produce three non-empty splits.
    """
    if not 0 < val_percent < 100:
        raise DataError(f"data.val_percent={val_percent!r} must be in (0, 100): the held-out share (validation "
                        "and test) of the files or tokens")
    if max_bytes is not None and max_bytes < 2:
        raise DataError(f"data.max_bytes={max_bytes!r} must be >= 2 (or None for no cap)")
    if path is None or path in ("", "stdlib"):
        return stdlib_corpus(max_bytes=max_bytes, val_percent=val_percent)
    if any(c in path for c in "*?["):
        return _glob_corpus(path, max_bytes=max_bytes, val_percent=val_percent)
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist; {_PATH_HINT}")
    if not p.is_file():
        raise DataError(f"data.path={path!r} is not a file; {_PATH_HINT}")
    if p.suffix == ".bin":
        return _bin_corpus(p, val_percent=val_percent, vocab_size=vocab_size)
    data = _read_bytes(p, max_bytes)
    if not data:
        raise DataError(f"data.path={path!r} is an empty file; {_PATH_HINT}")
    return _split_single(data, source=path, label=f"text file {path}", val_percent=val_percent)


def stdlib_corpus(*, max_bytes: int | None = DEFAULT_MAX_BYTES, val_percent: float = DEFAULT_VAL_PERCENT) -> Corpus:
    """The running Python's standard library `.py` sources as a byte corpus.

    Files are taken in sorted order of their POSIX relative paths under
    `sysconfig.get_paths()["stdlib"]` until `max_bytes` is reached, so the
    corpus is identical on every machine with the same Python build. Left out:
    `site-packages`/`dist-packages`; test suites (`test`, `tests`,
    `idle_test` directories); `__pycache__`; generated data tables
    (`encodings`, `pydoc_data`); and build-specific files (`config-*`
    directories, `_sysconfigdata*.py`), and empty files.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, pathlib.Path]] = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        dirs = rel.parts[:-1]
        if _STDLIB_EXCLUDED_DIRS.intersection(dirs) or (dirs and dirs[0].startswith("config-")):
            continue
        if rel.name.startswith("_sysconfigdata") or not p.is_file():
            continue
        files.append((rel.as_posix(), p))
    files.sort()
    version = platform.python_version()
    corpus = _split_files(files, source=str(root), label=f"Python {version} standard library", max_bytes=max_bytes,
                          val_percent=val_percent)
    if corpus is None:
        raise DataError(f"the Python {version} standard library at {str(root)!r} has no readable .py files; "
                        "pass data.path explicitly")
    return corpus


def _glob_corpus(pattern: str, *, max_bytes: int | None, val_percent: float) -> Corpus:
    """Text files matching `pattern` (sorted); split by file if several."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data.path={pattern!r} matches no files; {_PATH_HINT}")
    bins = [p for p in paths if p.endswith(".bin")]
    if bins:
        raise DataError(f"data.path={pattern!r} matches .bin token files ({bins[0]!r}); "
                        "pass a single .bin path (X/train.bin pairs with X/val.bin), not a glob")
    if len(paths) == 1:
        data = _read_bytes(pathlib.Path(paths[0]), max_bytes)
        if not data:
            raise DataError(f"data.path={pattern!r} matches only the empty file {paths[0]!r}; {_PATH_HINT}")
        return _split_single(data, source=pattern, label=f"text glob {pattern!r} (1 file)", val_percent=val_percent)
    corpus = _split_files([(p, pathlib.Path(p)) for p in paths], source=pattern, label=f"text glob {pattern!r}",
                          max_bytes=max_bytes, val_percent=val_percent)
    if corpus is None:
        raise DataError(f"data.path={pattern!r} matches only empty files; {_PATH_HINT}")
    return corpus


def _read_bytes(path: pathlib.Path, max_bytes: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(-1 if max_bytes is None else max_bytes)
    except OSError as e:
        raise DataError(f"data.path={str(path)!r} cannot be read ({e.strerror}); {_PATH_HINT}") from e


def _split_files(files: list[tuple[str, pathlib.Path]], *, source: str, label: str, max_bytes: int | None,
                 val_percent: float) -> Corpus | None:
    """Read `(key, path)` files in order into per-file chunks (content + `\\n`)
    up to `max_bytes` in total, then split them by `crc32(key)`.

    Returns `None` when every file is empty. If only one non-empty file fits,
    it is split by position. If the hash puts every file on one side, the last
    file goes to val (or the first to train).
    """
    chunks: list[tuple[str, bytes]] = []
    remaining = max_bytes
    for key, path in files:
        data = _read_bytes(path, None if remaining is None else remaining)
        if not data:
            continue
        chunk = data + b"\n" if remaining is None or len(data) < remaining else data
        chunks.append((key, chunk))
        if remaining is not None:
            remaining -= len(chunk)
            if remaining <= 0:
                break
    if not chunks:
        return None
    if len(chunks) < 3:  # too few files for three splits by file: by position
        keys = "+".join(key for key, _ in chunks)
        return _split_single(b"".join(c for _, c in chunks), source=source,
                             label=f"{label} ({len(chunks)} file{'s' if len(chunks) > 1 else ''}: {keys})",
                             val_percent=val_percent)
    held_out = [zlib.crc32(key.encode("utf-8")) % 100 < val_percent for key, _ in chunks]
    for i in range(len(chunks) - 1, 0, -1):  # at least two held-out files (validation and test)
        if sum(held_out) >= 2:
            break
        held_out[i] = True
    is_test = [h and zlib.crc32(f"test:{key}".encode("utf-8")) % 2 == 1 for (key, _), h in zip(chunks, held_out)]
    held = [i for i, h in enumerate(held_out) if h]
    if not any(is_test):
        is_test[held[-1]] = True
    if all(is_test[i] for i in held):
        is_test[held[0]] = False
    sides = ["test" if t else "val" if h else "train" for h, t in zip(held_out, is_test)]
    parts = {name: [(key, c) for (key, c), side in zip(chunks, sides) if side == name]
             for name in ("train", "val", "test")}
    data = {name: b"".join(c for _, c in part) for name, part in parts.items()}
    description = (
        f"{label}: {len(chunks)} files ({len(parts['train'])} train / {len(parts['val'])} val / "
        f"{len(parts['test'])} test), {_fmt_bytes(sum(len(d) for d in data.values()))} (train "
        f"{_fmt_bytes(len(data['train']))} / val {_fmt_bytes(len(data['val']))} / test {_fmt_bytes(len(data['test']))})"
    )
    return Corpus(*(_bytes_to_tokens(data[name]) for name in ("train", "val", "test")), source, description,
                  split_keys=tuple(tuple(key for key, _ in parts[name]) for name in ("train", "val", "test")))


def _split_single(data: bytes, *, source: str, label: str, val_percent: float) -> Corpus:
    """One byte string: the last `val_percent` of it is held out, its first half validation and
    its second half test."""
    n_train, n_val, n_test = _tail_split(len(data), val_percent, source)
    description = (
        f"{label}: {_fmt_bytes(len(data))} (train {_fmt_bytes(n_train)} / val {_fmt_bytes(n_val)} / "
        f"test {_fmt_bytes(n_test)}: the last {val_percent:g}% held out, halved)"
    )
    tokens = _bytes_to_tokens(data)
    return Corpus(tokens[:n_train], tokens[n_train:n_train + n_val], tokens[n_train + n_val:], source, description)


def _tail_split(n: int, val_percent: float, source: str) -> tuple[int, int, int]:
    """`(n_train, n_val, n_test)`: the last `ceil(n * val_percent / 100)` (at least 2) tokens held
    out and halved, validation first."""
    if n < 3:
        raise DataError(f"data.path={source!r} holds {n} token(s); at least 3 are needed for a "
                        "train / validation / test split")
    held = min(n - 1, max(2, math.ceil(n * val_percent / 100)))
    return n - held, held // 2, held - held // 2


def _bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def _open_bin(path: pathlib.Path) -> np.memmap:
    """`path` as a read-only `uint16` memmap, with one-line errors."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"data.path={str(path)!r} cannot be read ({e.strerror}); {_PATH_HINT}") from e
    if size == 0:
        raise DataError(f"data.path={str(path)!r} is an empty .bin file; {_PATH_HINT}")
    if size % 2:
        raise DataError(f"data.path={str(path)!r} has an odd byte size ({size}), so it is not raw uint16 tokens; "
                        "write it with np.asarray(tokens, np.uint16).tofile(path)")
    try:
        return np.memmap(path, dtype=np.dtype("<u2"), mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={str(path)!r} cannot be memory-mapped ({e}); {_PATH_HINT}") from e


def _bin_corpus(path: pathlib.Path, *, val_percent: float, vocab_size: int | None) -> Corpus:
    """A nanoGPT `.bin` file (`train.bin` paired with `val.bin`, and `test.bin` if it exists)."""
    tokens = _open_bin(path)
    val_path, test_path = path.with_name("val.bin"), path.with_name("test.bin")
    if path.name == "train.bin" and val_path.is_file():
        train, val = tokens, _open_bin(val_path)
        if test_path.is_file():
            test = _open_bin(test_path)
            split = f"val {val_path} ({_fmt_count(len(val))} tokens), test {test_path} ({_fmt_count(len(test))} tokens)"
        else:
            if len(val) < 2:
                raise DataError(f"{val_path} holds {len(val)} token(s); without a test.bin beside it, at least 2 are "
                                "needed to halve it into validation and test")
            val, test = val[:len(val) // 2], val[len(val) // 2:]
            split = (f"val = first half of {val_path} ({_fmt_count(len(val))} tokens), test = its second half "
                     f"({_fmt_count(len(test))} tokens)")
    else:
        n_train, n_val, _ = _tail_split(len(tokens), val_percent, str(path))
        train, val, test = tokens[:n_train], tokens[n_train:n_train + n_val], tokens[n_train + n_val:]
        split = (f"the last {val_percent:g}% held out and halved: val {_fmt_count(len(val))}, "
                 f"test {_fmt_count(len(test))} tokens")
    vocab_size = _bin_vocab_size(train, val, test, vocab_size, str(path))
    description = (
        f"nanoGPT uint16 tokens: train {path} ({_fmt_count(len(train))} tokens), {split}, vocab_size {vocab_size}"
    )
    return Corpus(train, val, test, str(path), description, vocab_size, tokens_are_bytes=False)


def _bin_vocab_size(train: np.ndarray, val: np.ndarray, test: np.ndarray, vocab_size: int | None, source: str) -> int:
    """The given `vocab_size` (checked when cheap) or `max token + 1` (scanned)."""
    if vocab_size is not None and not 1 <= vocab_size <= 2**16:
        raise DataError(f"data.vocab_size={vocab_size!r} must be in [1, 65536] for uint16 tokens in {source!r}")
    if len(train) + len(val) + len(test) > MAX_SCANNED_TOKENS:
        if vocab_size is None:
            raise DataError(f"data.path={source!r} has {_fmt_count(len(train) + len(val) + len(test))} tokens, "
                            "too many to scan "
                            "for the largest id; set data.vocab_size explicitly (e.g. 50257 for GPT-2 tokens)")
        return vocab_size
    max_id = max(
        int(arr[i:i + _SCAN_CHUNK].max()) for arr in (train, val, test) for i in range(0, len(arr), _SCAN_CHUNK)
    )
    if vocab_size is None:
        return max_id + 1
    if max_id >= vocab_size:
        raise DataError(f"data.path={source!r} contains token id {max_id} >= data.vocab_size={vocab_size}; "
                        f"set data.vocab_size to at least {max_id + 1}")
    return vocab_size


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
