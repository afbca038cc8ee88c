"""Data pipeline for byte-level language modelling: corpora, batches, eval sets.

Token streams are 1-D ``uint16`` arrays. One entry point, :func:`load_corpus`,
turns a ``data.path`` setting into a :class:`Corpus` with a train and a
validation split:

* ``None`` / ``""`` / ``"stdlib"``: the Python standard library's own ``.py``
  sources, byte-tokenized (see :func:`stdlib_corpus` for what is excluded).
  The corpus description names the Python version, because the corpus is a
  function of it.
* a text file, or a glob of text files (``"docs/**/*.md"``): raw UTF-8 bytes,
  byte-tokenized (vocab 256).
* a nanoGPT-style ``.bin`` token file: raw little-endian ``uint16``, opened with
  ``np.memmap`` (read-only, never copied). ``X/train.bin`` is paired with
  ``X/val.bin`` when that exists.

Text corpora are split into train/val *by file*, deterministically: a file is
in validation iff ``crc32(path) % 100 < val_percent``. A single file (or a
single ``.bin`` without ``val.bin``) is split by position instead: the last
``val_percent`` of its bytes/tokens is validation. Both splits are always
non-empty. Multi-file corpora join files with a ``b"\\n"`` after each file.

Batches are ``{"inputs": int32 [B, T], "targets": int32 [B, T]}`` with
``targets[:, t] == inputs[:, t + 1]`` in the underlying stream (each row is a
window of ``T + 1`` tokens).

Determinism rule: the training batch for step ``i`` is a pure function of
``(tokens, seed, i, batch_size, seq_len)``: its window offsets are drawn from
``np.random.default_rng([seed, i])``. Resuming with ``start_step=n`` therefore
reproduces exactly what an uninterrupted run sees from step ``n`` on, and the
global batch is the same for every ``process_count`` (each process takes its
contiguous block of rows). Evaluation batches use no randomness at all.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import pathlib
import platform
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from typing import ClassVar

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VAL_PERCENT",
    "MAX_SCANNED_TOKENS",
    "Batch",
    "BatchIterator",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "eval_batches",
    "load_corpus",
    "stdlib_corpus",
]

DEFAULT_MAX_BYTES = 8 * 2**20
DEFAULT_VAL_PERCENT = 5.0
# A .bin file with at most this many tokens (train + val) is scanned for its
# largest token id when no vocab_size is given; larger ones must name it.
MAX_SCANNED_TOKENS = 64 * 2**20
_SCAN_CHUNK = 16 * 2**20

# Directory names (anywhere in the relative path) left out of the stdlib corpus:
# installed third-party code, test suites, caches, and generated data tables
# (codec charmaps, pydoc topic dumps).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
     "encodings", "pydoc_data"}
)

_PATH_HINT = (
    "pass an existing text file, a glob like 'docs/*.md', a nanoGPT-style uint16 "
    ".bin file, or leave it empty for the Python standard library corpus"
)

Batch = dict[str, np.ndarray]
"""``{"inputs": int32 [B, T], "targets": int32 [B, T]}``."""


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and the fix."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255. Models may pad their vocab larger."""

    vocab_size: ClassVar[int] = 256

    def encode(self, text: str) -> np.ndarray:
        """``str`` -> ``uint16 [len(text.encode('utf-8'))]``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Token ids (any shape) -> text. Ids outside 0..255 are dropped;
        invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A token stream split for training and validation.

    Attributes:
      train: ``uint16 [N_train]`` (an ``np.memmap`` for ``.bin`` sources).
      val: ``uint16 [N_val]`` (likewise).
      source: where the tokens came from: the stdlib directory, the file path or
        glob as given, or the ``.bin`` path.
      description: one human-readable line for logs (sizes, file counts, and for
        the stdlib corpus the Python version).
      vocab_size: number of token ids the model must embed (256 for text).
    """

    train: np.ndarray
    val: np.ndarray
    source: str
    description: str
    vocab_size: int = ByteTokenizer.vocab_size


# ----------------------------------------------------------------------------
# Corpus loading
# ----------------------------------------------------------------------------


def load_corpus(
    path: str | None = None,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    val_percent: float = DEFAULT_VAL_PERCENT,
    vocab_size: int | None = None,
) -> Corpus:
    """Load the corpus named by ``path`` (see the module docstring for formats).

    Args:
      path: ``None``, ``""`` or ``"stdlib"`` for the standard-library corpus; a
        text file; a glob of text files (contains ``*``, ``?`` or ``[``;
        ``**`` recurses); or a ``.bin`` file of little-endian ``uint16`` tokens.
      max_bytes: cap on the bytes read from text sources (files taken in sorted
        order, the last one truncated); ``None`` for no cap. ``.bin`` files are
        memory-mapped and always used whole.
      val_percent: percentage (0 < p < 100) of files, or of the tail of a
        single file, used for validation.
      vocab_size: ``.bin`` only (ignored for text, which is always 256). If
        omitted, it is ``max token + 1``, found by scanning the file, which is
        allowed only up to ``MAX_SCANNED_TOKENS`` tokens. If given, it is
        checked against the data whenever the file is that small.

    Raises:
      DataError: the path is missing, matches nothing, is empty, is not a valid
        ``.bin`` file, or the arguments cannot produce two non-empty splits.
    """
    if not 0 < val_percent < 100:
        raise DataError(f"data.val_percent={val_percent!r} must be in (0, 100) so both splits are non-empty")
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


def stdlib_corpus(
    *, max_bytes: int | None = DEFAULT_MAX_BYTES, val_percent: float = DEFAULT_VAL_PERCENT
) -> Corpus:
    """The running Python's standard library ``.py`` sources as a byte corpus.

    Files are taken in sorted order of their POSIX relative paths under
    ``sysconfig.get_paths()["stdlib"]`` until ``max_bytes`` is reached, so the
    corpus is identical on every machine with the same Python build. Left out:
    ``site-packages``/``dist-packages``; test suites (``test``, ``tests``,
    ``idle_test`` directories); ``__pycache__``; generated data tables
    (``encodings``, ``pydoc_data``); and build-specific files (``config-*``
    directories, ``_sysconfigdata*.py``), and empty files.
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
    corpus = _split_files(
        files,
        source=str(root),
        label=f"Python {version} standard library",
        max_bytes=max_bytes,
        val_percent=val_percent,
    )
    if corpus is None:
        raise DataError(f"the Python {version} standard library at {str(root)!r} has no readable .py files; "
                        "pass data.path explicitly")
    return corpus


def _glob_corpus(pattern: str, *, max_bytes: int | None, val_percent: float) -> Corpus:
    """Text files matching ``pattern`` (sorted); split by file if several."""
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
    corpus = _split_files(
        [(p, pathlib.Path(p)) for p in paths],
        source=pattern,
        label=f"text glob {pattern!r}",
        max_bytes=max_bytes,
        val_percent=val_percent,
    )
    if corpus is None:
        raise DataError(f"data.path={pattern!r} matches only empty files; {_PATH_HINT}")
    return corpus


def _read_bytes(path: pathlib.Path, max_bytes: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(-1 if max_bytes is None else max_bytes)
    except OSError as e:
        raise DataError(f"data.path={str(path)!r} cannot be read ({e.strerror}); {_PATH_HINT}") from e


def _split_files(
    files: list[tuple[str, pathlib.Path]],
    *,
    source: str,
    label: str,
    max_bytes: int | None,
    val_percent: float,
) -> Corpus | None:
    """Read ``(key, path)`` files in order into per-file chunks (content + ``\\n``)
    up to ``max_bytes`` in total, then split them by ``crc32(key)``.

    Returns ``None`` when every file is empty. If only one non-empty file fits,
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
    if len(chunks) == 1:
        key, chunk = chunks[0]
        return _split_single(chunk, source=source, label=f"{label} (1 file: {key})", val_percent=val_percent)
    is_val = [zlib.crc32(key.encode("utf-8")) % 100 < val_percent for key, _ in chunks]
    if not any(is_val):
        is_val[-1] = True
    if all(is_val):
        is_val[0] = False
    train = b"".join(c for (_, c), v in zip(chunks, is_val) if not v)
    val = b"".join(c for (_, c), v in zip(chunks, is_val) if v)
    n_val_files = sum(is_val)
    description = (
        f"{label}: {len(chunks)} files ({len(chunks) - n_val_files} train / {n_val_files} val), "
        f"{_fmt_bytes(len(train) + len(val))} (train {_fmt_bytes(len(train))} / val {_fmt_bytes(len(val))})"
    )
    return Corpus(_bytes_to_tokens(train), _bytes_to_tokens(val), source, description)


def _split_single(data: bytes, *, source: str, label: str, val_percent: float) -> Corpus:
    """One byte string: the last ``val_percent`` of it is validation."""
    n_train, n_val = _tail_split(len(data), val_percent, source)
    description = (
        f"{label}: {_fmt_bytes(len(data))} (train {_fmt_bytes(n_train)} / "
        f"val {_fmt_bytes(n_val)}, the last {val_percent:g}%)"
    )
    tokens = _bytes_to_tokens(data)
    return Corpus(tokens[:n_train], tokens[n_train:], source, description)


def _tail_split(n: int, val_percent: float, source: str) -> tuple[int, int]:
    """``(n_train, n_val)`` with ``n_val = ceil(n * val_percent / 100) >= 1``."""
    if n < 2:
        raise DataError(f"data.path={source!r} holds {n} token(s); at least 2 are needed for a train/val split")
    n_val = min(n - 1, max(1, math.ceil(n * val_percent / 100)))
    return n - n_val, n_val


def _bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def _open_bin(path: pathlib.Path) -> np.memmap:
    """``path`` as a read-only ``uint16`` memmap, with one-line errors."""
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
    """A nanoGPT ``.bin`` file (paired with ``val.bin`` if it is ``train.bin``)."""
    tokens = _open_bin(path)
    val_path = path.with_name("val.bin")
    if path.name == "train.bin" and val_path.is_file():
        train, val = tokens, _open_bin(val_path)
        split = f"val {val_path} ({_fmt_count(len(val))} tokens)"
    else:
        n_train, _ = _tail_split(len(tokens), val_percent, str(path))
        train, val = tokens[:n_train], tokens[n_train:]
        split = f"val = last {val_percent:g}% ({_fmt_count(len(val))} tokens)"
    vocab_size = _bin_vocab_size(train, val, vocab_size, str(path))
    description = (
        f"nanoGPT uint16 tokens: train {path} ({_fmt_count(len(train))} tokens), {split}, vocab_size {vocab_size}"
    )
    return Corpus(train, val, str(path), description, vocab_size)


def _bin_vocab_size(train: np.ndarray, val: np.ndarray, vocab_size: int | None, source: str) -> int:
    """The given ``vocab_size`` (checked when cheap) or ``max token + 1`` (scanned)."""
    if vocab_size is not None and not 1 <= vocab_size <= 2**16:
        raise DataError(f"data.vocab_size={vocab_size!r} must be in [1, 65536] for uint16 tokens in {source!r}")
    if len(train) + len(val) > MAX_SCANNED_TOKENS:
        if vocab_size is None:
            raise DataError(f"data.path={source!r} has {_fmt_count(len(train) + len(val))} tokens, too many to scan "
                            "for the largest id; set data.vocab_size explicitly (e.g. 50257 for GPT-2 tokens)")
        return vocab_size
    max_id = max(
        int(arr[i:i + _SCAN_CHUNK].max()) for arr in (train, val) for i in range(0, len(arr), _SCAN_CHUNK)
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


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _check_shape_args(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}; "
                         "the global batch must split evenly across processes")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """Rows ``tokens[s : s + seq_len + 1]`` for each start ``s`` -> a :data:`Batch`
    with ``inputs``/``targets`` of shape ``int32 [len(starts), seq_len]``."""
    rows = np.array(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


class BatchIterator:
    """Endless random training windows, deterministic per ``(seed, step)``.

    Each global batch has ``batch_size`` rows; row ``r`` is the window
    ``tokens[o_r : o_r + seq_len + 1]`` with offsets
    ``o = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, batch_size)``.
    This process yields rows ``[b * process_index, b * (process_index + 1))``
    with ``b = batch_size // process_count``, so every batch is
    ``{"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len]}``.

    ``step`` is the step of the next batch ``next()`` returns; checkpoint it
    (or :meth:`state`) and pass it back as ``start_step`` to resume exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        """``tokens``: 1-D integer array (``uint16`` or a memmap), at least
        ``seq_len + 1`` long. ``seed`` and ``start_step`` must be >= 0."""
        _check_shape_args(batch_size, seq_len, process_index, process_count)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"the training split has {len(tokens)} tokens but seq_len={seq_len} needs at least "
                            f"{seq_len + 1}; use more data or a shorter seq_len")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = start_step
        self.process_index = process_index
        self.process_count = process_count

    def batch_at(self, step: int) -> Batch:
        """This process's rows of the global batch for ``step`` (does not advance)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        local = self.batch_size // self.process_count
        return _windows(self.tokens, starts[local * self.process_index: local * (self.process_index + 1)],
                        self.seq_len)

    def state(self) -> dict[str, int]:
        """``{"step": next step, "seed": seed}``: enough to resume exactly."""
        return {"step": self.step, "seed": self.seed}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """Deterministic validation batches from the start of ``tokens``.

    Window ``k`` has ``inputs = tokens[k*T : (k+1)*T]`` and
    ``targets = tokens[k*T + 1 : (k+1)*T + 1]`` (``T = seq_len``): inputs never
    overlap and each token after the first is a target exactly once. Global
    batch ``j`` holds windows ``j*B .. (j+1)*B - 1``; a trailing partial batch
    is dropped. At most ``max_batches`` batches (``None``: all). With several
    processes each gets its contiguous block of rows, as in
    :class:`BatchIterator`, so every batch is ``int32 [B // process_count, T]``.

    Raises:
      DataError: ``tokens`` is too short for one full batch (the message says
        how many tokens are needed).
    """
    _check_shape_args(batch_size, seq_len, process_index, process_count)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be >= 1 (or None for all)")
    n_batches = (len(tokens) - 1) // seq_len // batch_size if len(tokens) else 0
    if n_batches == 0:
        raise DataError(f"the validation split has {len(tokens)} tokens but one eval batch of "
                        f"{batch_size}x{seq_len} needs at least {batch_size * seq_len + 1}; "
                        "raise data.val_percent or lower the eval batch_size/seq_len")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    local = batch_size // process_count
    rows = np.arange(local * process_index, local * (process_index + 1))
    return [_windows(tokens, (j * batch_size + rows) * seq_len, seq_len) for j in range(n_batches)]
