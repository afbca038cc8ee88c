"""Metric writers (JSON lines + TensorBoard) and model FLOPs utilisation.

* `MetricWriter`: `workdir/metrics.jsonl` (one JSON object per `write`),
  `workdir/config.json` and TensorBoard scalars in `workdir/tensorboard/`.
* `transformer_flops_per_token`, `mfu`, `peak_flops_per_device`.

Progress is not drawn here: the trainer writes one absl log line per logging step (step, loss,
tokens/s, ETA from the last window's step time). That needs no progress-bar dependency (tqdm,
clu), reads the same in a terminal, a file and a multi-host job's logs, and goes through the
logging every other module uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping, TextIO

import jax
import numpy as np

__all__ = [
    "MetricWriter",
    "mfu",
    "peak_flops_per_device",
    "transformer_flops_per_token",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


# ----------------------------------------------------------------------------
# Value conversion
# ----------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
    """numpy / jax scalars (and 0-d arrays) -> python bool/int/float; arrays -> lists."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _finite_or_none(value: Any) -> Any:
    """NaN / +-inf -> None (JSON null), recursively; everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"loss": 1}} -> {"train/loss": 1}."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = _to_python(value)
    return flat


def _json_default(obj: Any) -> Any:
    """Fallback for config values: numpy/jax, paths, dataclasses, ConfigDicts."""
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return _to_python(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, np.dtype) or isinstance(obj, type):
        return str(obj)
    return repr(obj)


def atomic_write_text(path: str, text: str) -> None:
    """Writes text to path through a temporary file and a rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# MetricWriter
# ----------------------------------------------------------------------------


class MetricWriter:
    """Writes metrics to `workdir/metrics.jsonl` and TensorBoard.

    Each `write(step, metrics)` appends one line `{"step": step, **metrics}`
    to `metrics.jsonl` and flushes it. Nested dicts are flattened with `/`
    (`{"train": {"loss": x}}` -> `"train/loss"`). numpy/jax scalars become
    python ints/floats/bools, arrays become lists. Non-finite floats (NaN,
    +-inf) are written as JSON `null` so the file stays strict JSON
    (`pandas.read_json(lines=True)` reads them back as NaN); TensorBoard gets
    the real value. Numeric scalars (bools excluded) also go to TensorBoard
    under their flattened name; strings and lists only go to the JSON file.

    Resuming: pass `resume_step` (the step of the checkpoint restored). Lines
    of an existing `metrics.jsonl` with `step > resume_step` are dropped
    (the file is rewritten atomically) and TensorBoard is told to hide events
    with `step > resume_step` (tensorboardX `purge_step`), so a run killed
    after logging step 120 but resumed from step 100 logs 101.. only once.
    Without `resume_step` new lines are appended. In both cases a truncated
    last line (a crash in the middle of a write) is removed.

    Only process 0 (`jax.process_index()`) writes anything; on other
    processes every method is a no-op.
    """

    def __init__(
        self,
        workdir,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.workdir = os.fspath(workdir)
        self.metrics_path = os.path.join(self.workdir, METRICS_FILE)
        self.config_path = os.path.join(self.workdir, CONFIG_FILE)
        self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
        self.active = jax.process_index() == 0  # only process 0 writes
        self._closed = False
        self._file: TextIO | None = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._prepare_existing(resume_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge_step = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(logdir=self.tensorboard_dir, purge_step=purge_step, flush_secs=30)

    def _prepare_existing(self, resume_step: int | None) -> None:
        """Drops lines past `resume_step` and a torn last line."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            raw = f.read()
        lines = raw.split("\n")
        torn = lines[-1] != ""  # the file should end with a newline
        kept, dropped = [], torn
        for line in lines[:-1]:
            if not line.strip():
                dropped = True
                continue
            if resume_step is not None:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    dropped = True
                    continue
                if step > resume_step:
                    dropped = True
                    continue
            kept.append(line)
        if dropped:
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` at `step` (one JSON line + TensorBoard scalars)."""
        self._check_open()
        if not self.active:
            return
        step = int(_to_python(step))
        flat = _flatten(metrics)
        if "step" in flat:
            raise ValueError("'step' is reserved; pass it as the `step` argument")
        record = {"step": step, **{k: _finite_or_none(v) for k, v in flat.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in flat.items():
                if isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._tb.add_scalar(name, float(value), global_step=step)

    def write_config(self, config: Mapping[str, Any] | Any) -> None:
        """Writes `workdir/config.json` (atomically; also as TensorBoard text).

        Accepts dicts, dataclasses and objects with `to_dict()` (ConfigDict);
        values that JSON cannot hold are converted (numpy -> python, paths ->
        str, anything else -> repr).
        """
        self._check_open()
        if not self.active:
            return
        text = json.dumps(config, default=_json_default, indent=2, sort_keys=True)
        atomic_write_text(self.config_path, text + "\n")
        if self._tb is not None:
            self._tb.add_text("config", "``\n" + text + "\n``", global_step=0)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files. Idempotent."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._closed = True

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricWriter is closed")


# ----------------------------------------------------------------------------
# FLOPs / MFU
# ----------------------------------------------------------------------------


def transformer_flops_per_token(active_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: `6*N + 12*L*H*T`.

    `6*N`: forward (2 FLOPs per multiply-add) plus backward (twice the
    forward) for each of the `N` parameters a token passes through. For an
    MoE model `N` is the *active* parameter count: dense parameters plus
    only the top-k experts a token is routed to, not all experts. Embedding
    tables (a lookup, not a matmul) are conventionally left out; a tied or
    untied output projection is included.

    `12*L*H*T`: attention scores and the attention-weighted sum of values
    (`Q K^T` and `A V`): 2 matmuls x 2 FLOPs per multiply-add x 3 (fwd +
    bwd) x `L` layers x `H` (hidden = heads * head_dim) x `T` (sequence
    length), per token. Causal masking is not discounted (PaLM convention,
    Chowdhery et al. 2022, appendix B).
    """
    return 6.0 * float(active_params) + 12.0 * float(num_layers) * float(hidden) * float(seq_len)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over peak FLOP/s.

    `flops_per_token * tokens_per_sec / peak_flops`. `tokens_per_sec` and
    `peak_flops` must cover the same devices: for the global throughput pass
    `peak_flops_per_device() * jax.device_count()`. Recomputation (remat) is
    not counted, by definition of MFU.
    """
    if not peak_flops > 0:
        return math.nan
    return float(flops_per_token) * float(tokens_per_sec) / float(peak_flops)


# Dense (no sparsity) bf16 peak FLOP/s per device, from vendor data sheets.
# First match of a lower-cased substring of `device.device_kind` wins, so
# more specific names come first.
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("gb200", 2.5e15),
    ("b200", 2.25e15),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM; also "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),  # same compute as H100 SXM, more memory
    ("h800", 989e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10", 125e12),
    ("v100", 125e12),  # fp16 tensor cores (no bf16)
    ("tpu v6", 918e12),  # v6e ("TPU v6 lite")
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)
# A rough guess for one CPU "device" (a few cores' worth of AVX-512 FMA); only
# useful to keep MFU plots alive in CPU tests, not as a measurement.
_CPU_PEAK_FLOPS = 100e9


def peak_flops_per_device(device: Any = None) -> float:
    """Best-effort dense bf16 peak FLOP/s of one device (default `jax.devices()[0]`).

    Looked up from `device.device_kind` (e.g. `"NVIDIA H100 80GB HBM3"`):
    H100/H200 SXM 989e12, A100 312e12, TPU v4 275e12, v5e 197e12, v5p 459e12,
    v6e 918e12, ... CPU devices return `100e9`, a rough guess. Unknown
    accelerators return NaN (so `mfu` gives NaN rather than a wrong number).
    """
    if device is None:
        device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    platform = str(getattr(device, "platform", "")).lower()
    if platform == "cpu" or kind == "cpu":
        return _CPU_PEAK_FLOPS
    for key, flops in _PEAK_BF16_FLOPS:
        if key in kind:
            return flops
    return math.nan
