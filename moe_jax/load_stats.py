"""Host-side statistics of the experts' load, from the layer statistics that routing reports.

Plain numpy on device-fetched arrays: the training loop calls them on its logging steps only.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def expert_load_stats(
    counts,
    kept_counts=None,
    *,
    capacity: int | None = None,
) -> dict[str, float]:
    """Load-balance statistics of one MoE layer.

    Args:
      counts: [E] tokens routed to each expert (token-expert assignments,
        before any capacity drop; for top-k routing each token counts k times).
      kept_counts: optional [E] assignments each expert actually processed
        (after the capacity drop).
      capacity: optional per-expert capacity; if given (and kept_counts is
        not), kept_counts = min(counts, capacity).

    Returns:
      dict of python floats:
        load_imbalance: max / mean count (1.0 = perfectly balanced; E = all
          tokens on one expert).
        load_cv: coefficient of variation, std / mean (population std).
        frac_experts_unused: fraction of experts that got no tokens.
        load_min, load_median, load_max: tokens per expert.
        dead_experts: experts that got no tokens (over the window the counts cover).
        dropped_frac: 1 - sum(kept) / sum(counts); only with
          kept_counts or capacity.
      With no tokens at all, ratios over the mean are NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array [E], got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("counts must be non-negative")
    if kept_counts is not None and capacity is not None:
        raise ValueError("give kept_counts or capacity, not both")
    mean = counts.mean()
    stats = {
        "load_imbalance": float(counts.max() / mean) if mean > 0 else math.nan,
        "load_cv": float(counts.std() / mean) if mean > 0 else math.nan,
        "frac_experts_unused": float(np.mean(counts == 0)),
        # tokens per expert: the spread behind the imbalance ratio
        "load_min": float(counts.min()), "load_median": float(np.median(counts)), "load_max": float(counts.max()),
        "dead_experts": int(np.sum(counts == 0)),
    }
    if capacity is not None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        kept_counts = np.minimum(counts, capacity)
    if kept_counts is not None:
        kept = np.asarray(kept_counts, dtype=np.float64)
        if kept.shape != counts.shape:
            raise ValueError(f"kept_counts shape {kept.shape} != counts shape {counts.shape}")
        if np.any(kept < 0) or np.any(kept > counts):
            raise ValueError("need 0 <= kept_counts <= counts")
        total = counts.sum()
        stats["dropped_frac"] = float(1.0 - kept.sum() / total) if total > 0 else 0.0
    return stats


def layer_stats(moe_layers: dict, window_counts: Optional[dict] = None) -> dict:
    """Per MoE layer (host side): the logged step's token counts, dropped fraction, fraction of
    tokens with no expert, router entropy and load imbalance, and over the logging window
    (window_counts: each layer's expert counts summed over the window's steps) the load percentiles
    (tokens per expert) and the dead experts (no token in the whole window)."""
    out = {}
    for layer, stats in moe_layers.items():
        counts = np.asarray(stats["expert_counts"])
        load = expert_load_stats(counts, np.asarray(stats["kept_counts"]))
        window = counts if window_counts is None else np.asarray(window_counts[layer])
        window_load = expert_load_stats(window)
        out[f"layer{layer}"] = {
            "dropped_fraction": float(stats["dropped_fraction"]),
            "unrouted_fraction": float(stats["unrouted_fraction"]),
            "router_entropy": float(stats["router_entropy"]),
            "load_imbalance": load["load_imbalance"], "expert_counts": counts.tolist(),
            "window_load_min": window_load["load_min"], "window_load_median": window_load["load_median"],
            "window_load_max": window_load["load_max"], "dead_experts": window_load["dead_experts"]}
    return out


def add_window_counts(window_counts: Optional[dict], moe_layers: dict) -> dict:
    """Each layer's expert counts added to the window's running sums (on device: no host sync)."""
    step_counts = {layer: stats["expert_counts"] for layer, stats in moe_layers.items()}
    if window_counts is None:
        return step_counts
    return {layer: window_counts[layer] + counts for layer, counts in step_counts.items()}
