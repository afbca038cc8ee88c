"""Batches for language-model training and evaluation over a corpus split.

Token streams are 1-D integer arrays (`uint16`, or the `np.memmap` of a
`.bin` corpus), as `moe_jax.corpus.load_corpus` returns them.

Batches are `{"inputs": int32 [B, T], "targets": int32 [B, T]}` with
`targets[:, t] == inputs[:, t + 1]` in the underlying stream (each row is a
window of `T + 1` tokens).

Determinism rule: the training batch for step `i` is a pure function of
`(tokens, seed, i, batch_size, seq_len)`: its window offsets are drawn from
`np.random.default_rng([seed, i])`. Resuming with `start_step=n` therefore
reproduces exactly what an uninterrupted run sees from step `n` on, and the
global batch is the same for every `process_count` (each process takes its
contiguous block of rows). Evaluation batches use no randomness at all.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moe_jax.corpus import DataError

__all__ = [
    "Batch",
    "BatchIterator",
    "eval_batches",
    "split_batches",
]

Batch = dict[str, np.ndarray]
"""`{"inputs": int32 [B, T], "targets": int32 [B, T]}`."""


def _check_shape_args(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}; "
                         "the global batch must split evenly across processes")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """Rows `tokens[s : s + seq_len + 1]` for each start `s` -> a :data:`Batch`
    with `inputs`/`targets` of shape `int32 [len(starts), seq_len]`."""
    rows = np.array(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


class BatchIterator:
    """Endless random training windows, deterministic per `(seed, step)`.

    Each global batch has `batch_size` rows; row `r` is the window
    `tokens[o_r : o_r + seq_len + 1]` with offsets
    `o = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, batch_size)`.
    This process yields rows `[b * process_index, b * (process_index + 1))`
    with `b = batch_size // process_count`, so every batch is
    `{"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len]}`.

    `step` is the step of the next batch `next()` returns; checkpoint it
    (or `state`) and pass it back as `start_step` to resume exactly.
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
        """`tokens`: 1-D integer array (`uint16` or a memmap), at least
        `seq_len + 1` long. `seed` and `start_step` must be >= 0."""
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
        """This process's rows of the global batch for `step` (does not advance)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        local = self.batch_size // self.process_count
        return _windows(self.tokens, starts[local * self.process_index: local * (self.process_index + 1)],
                        self.seq_len)

    def state(self) -> dict[str, int]:
        """`{"step": next step, "seed": seed}`: enough to resume exactly."""
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
    """Deterministic validation batches from the start of `tokens`.

    Window `k` has `inputs = tokens[k*T : (k+1)*T]` and
    `targets = tokens[k*T + 1 : (k+1)*T + 1]` (`T = seq_len`): inputs never
    overlap and each token after the first is a target exactly once. Global
    batch `j` holds windows `j*B .. (j+1)*B - 1`; a trailing partial batch
    is dropped. At most `max_batches` batches (`None`: all). With several
    processes each gets its contiguous block of rows, as in
    `BatchIterator`, so every batch is `int32 [B // process_count, T]`.

    Raises:
      DataError: `tokens` is too short for one full batch (the message says
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


def split_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """Every target of a split exactly once: the whole-split evaluation (the test split's).

    Window `k` covers targets `tokens[k*T + 1 : (k+1)*T + 1]` (`T = seq_len`),
    for `k = 0 .. ceil((N - 1) / T) - 1`: consecutive, not overlapping, the
    last one partial. Each batch adds `"mask": float32 [B, T]`, 1 for a real
    target and 0 for padding (the last window's tail, and the empty rows that
    fill the last batch to B). So `sum(mask)` over all batches is `N - 1` and
    the loss `sum(nll * mask) / sum(mask)` counts every target once. With
    several processes each gets its contiguous block of rows, as in
    `eval_batches`.

    Raises:
      DataError: the split has fewer than 2 tokens (no target).
    """
    _check_shape_args(batch_size, seq_len, process_index, process_count)
    num_targets = len(tokens) - 1
    if num_targets < 1:
        raise DataError(f"the split has {len(tokens)} token(s); at least 2 are needed for one target")
    num_windows = -(-num_targets // seq_len)
    num_batches = -(-num_windows // batch_size)
    padded = np.zeros(num_batches * batch_size * seq_len + 1, np.int32)
    padded[:len(tokens)] = np.asarray(tokens, np.int32)
    mask = np.zeros(num_batches * batch_size * seq_len, np.float32)
    mask[:num_targets] = 1.0
    local = batch_size // process_count
    rows = slice(local * process_index, local * (process_index + 1))
    batches = []
    for j in range(num_batches):
        start = j * batch_size * seq_len
        window = padded[start:start + batch_size * seq_len + 1]
        inputs = window[:-1].reshape(batch_size, seq_len)
        targets = window[1:].reshape(batch_size, seq_len)
        weights = mask[start:start + batch_size * seq_len].reshape(batch_size, seq_len)
        batches.append({"inputs": np.ascontiguousarray(inputs[rows]), "targets": np.ascontiguousarray(targets[rows]),
                        "mask": np.ascontiguousarray(weights[rows])})
    return batches
