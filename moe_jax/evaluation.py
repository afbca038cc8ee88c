"""Evaluation of a run's parameters: the training-time validation subset (`evaluate`) and the final
pass over the whole test split (`evaluate_test`)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
from absl import logging

from moe_jax import data as data_lib
from moe_jax import train_lib


def evaluate(params, eval_data: list, eval_fn, bits_metric: str = "val_bpb", eval_keys: Optional[list] = None,
             on_probe: Optional[Callable[[dict], None]] = None, prefix: str = "val") -> dict:
    """Loss over eval_data as {prefix}_loss and bits_metric; eval_keys[i] is batch i's 'gating' key
    (None: deterministic). on_probe receives batch 0's routing codes when eval_fn records them (the
    probe batch)."""
    nll, tokens = 0.0, 0.0
    for i, batch in enumerate(eval_data):
        out = eval_fn(params, batch, None if eval_keys is None else eval_keys[i])
        if i == 0 and on_probe is not None and out.get("routing"):
            on_probe(out["routing"])
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / tokens
    return {f"{prefix}_loss": loss, bits_metric: train_lib.nats_to_bits(loss), f"{prefix}_tokens": int(tokens)}


def eval_keys(count: int, deterministic: bool) -> Optional[list]:
    """The fixed 'gating' keys of an evaluation's batches (DeepSpeed routes evaluation with RTS and
    top-2's sampled second expert: a fixed key per batch keeps every evaluation replayable), or None
    for routing without noise."""
    return None if deterministic else [train_lib.eval_rng(i) for i in range(count)]


def evaluate_test(params, corpus, batch_size: int, seq_len: int, eval_fn, deterministic: bool = False,
                  place=lambda batch: batch) -> dict:
    """The final evaluation: every target of the test split once (moe_jax.data.split_batches), the
    same windows for every run of a corpus, batch i routed with the fixed key train_lib.eval_rng(i)
    (DeepSpeed's eval routing; deterministic: none). The last batch's padding rows (masked out of
    the loss) are routed with the real tokens, as any batch's tokens are. Returns test_loss, test
    bits, test_tokens, test_windows and test_eval_s (its cost)."""
    start = time.perf_counter()
    batches = data_lib.split_batches(corpus.test, batch_size=batch_size, seq_len=seq_len,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    bits = corpus.bits_metric.replace("val_", "test_", 1)
    metrics = evaluate(params, [place(batch) for batch in batches], eval_fn, bits,
                       eval_keys(len(batches), deterministic), prefix="test")
    metrics["test_windows"] = -(-(len(corpus.test) - 1) // seq_len)
    metrics["test_eval_s"] = time.perf_counter() - start
    logging.info("test split: %d windows, %d targets, loss %.4f, %.1f s", metrics["test_windows"],
                 metrics["test_tokens"], metrics["test_loss"], metrics["test_eval_s"])
    return metrics
