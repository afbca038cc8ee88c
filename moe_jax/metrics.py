"""Metric logging (JSON lines + TensorBoard), MoE load statistics, MFU, progress bar.

* ``MetricWriter``: ``workdir/metrics.jsonl`` (one JSON object per ``write``),
  ``workdir/config.json`` and TensorBoard scalars in ``workdir/tensorboard/``.
* ``transformer_flops_per_token``, ``mfu``, ``peak_flops_per_device``.
* ``Progress``: a one-line progress bar on stderr (plain lines when not a TTY).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np

__all__ = [
    "MetricWriter",
    "Progress",
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


def _atomic_write_text(path: str, text: str) -> None:
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
    """Writes metrics to ``workdir/metrics.jsonl`` and TensorBoard.

    Each ``write(step, metrics)`` appends one line ``{"step": step, **metrics}``
    to ``metrics.jsonl`` and flushes it. Nested dicts are flattened with ``/``
    (``{"train": {"loss": x}}`` -> ``"train/loss"``). numpy/jax scalars become
    python ints/floats/bools, arrays become lists. Non-finite floats (NaN,
    +-inf) are written as JSON ``null`` so the file stays strict JSON
    (``pandas.read_json(lines=True)`` reads them back as NaN); TensorBoard gets
    the real value. Numeric scalars (bools excluded) also go to TensorBoard
    under their flattened name; strings and lists only go to the JSON file.

    Resuming: pass ``resume_step`` (the step of the checkpoint restored). Lines
    of an existing ``metrics.jsonl`` with ``step > resume_step`` are dropped
    (the file is rewritten atomically) and TensorBoard is told to hide events
    with ``step > resume_step`` (tensorboardX ``purge_step``), so a run killed
    after logging step 120 but resumed from step 100 logs 101.. only once.
    Without ``resume_step`` new lines are appended. In both cases a truncated
    last line (a crash in the middle of a write) is removed.

    Only process 0 (``jax.process_index()``) writes anything; on other
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
        """Drops lines past ``resume_step`` and a torn last line."""
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
            _atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs ``metrics`` at ``step`` (one JSON line + TensorBoard scalars)."""
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
        """Writes ``workdir/config.json`` (atomically; also as TensorBoard text).

        Accepts dicts, dataclasses and objects with ``to_dict()`` (ConfigDict);
        values that JSON cannot hold are converted (numpy -> python, paths ->
        str, anything else -> repr).
        """
        self._check_open()
        if not self.active:
            return
        text = json.dumps(config, default=_json_default, indent=2, sort_keys=True)
        _atomic_write_text(self.config_path, text + "\n")
        if self._tb is not None:
            self._tb.add_text("config", "```\n" + text + "\n```", global_step=0)

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
# MoE load statistics
# ----------------------------------------------------------------------------




# ----------------------------------------------------------------------------
# FLOPs / MFU
# ----------------------------------------------------------------------------


def transformer_flops_per_token(active_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: ``6*N + 12*L*H*T``.

    ``6*N``: forward (2 FLOPs per multiply-add) plus backward (twice the
    forward) for each of the ``N`` parameters a token passes through. For an
    MoE model ``N`` is the *active* parameter count: dense parameters plus
    only the top-k experts a token is routed to, not all experts. Embedding
    tables (a lookup, not a matmul) are conventionally left out; a tied or
    untied output projection is included.

    ``12*L*H*T``: attention scores and the attention-weighted sum of values
    (``Q K^T`` and ``A V``): 2 matmuls x 2 FLOPs per multiply-add x 3 (fwd +
    bwd) x ``L`` layers x ``H`` (hidden = heads * head_dim) x ``T`` (sequence
    length), per token. Causal masking is not discounted (PaLM convention,
    Chowdhery et al. 2022, appendix B).
    """
    return 6.0 * float(active_params) + 12.0 * float(num_layers) * float(hidden) * float(seq_len)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over peak FLOP/s.

    ``flops_per_token * tokens_per_sec / peak_flops``. ``tokens_per_sec`` and
    ``peak_flops`` must cover the same devices: for the global throughput pass
    ``peak_flops_per_device() * jax.device_count()``. Recomputation (remat) is
    not counted, by definition of MFU.
    """
    if not peak_flops > 0:
        return math.nan
    return float(flops_per_token) * float(tokens_per_sec) / float(peak_flops)


# Dense (no sparsity) bf16 peak FLOP/s per device, from vendor data sheets.
# First match of a lower-cased substring of ``device.device_kind`` wins, so
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
    """Best-effort dense bf16 peak FLOP/s of one device (default ``jax.devices()[0]``).

    Looked up from ``device.device_kind`` (e.g. ``"NVIDIA H100 80GB HBM3"``):
    H100/H200 SXM 989e12, A100 312e12, TPU v4 275e12, v5e 197e12, v5p 459e12,
    v6e 918e12, ... CPU devices return ``100e9``, a rough guess. Unknown
    accelerators return NaN (so ``mfu`` gives NaN rather than a wrong number).
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


# ----------------------------------------------------------------------------
# Progress bar
# ----------------------------------------------------------------------------


def _format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """One-line training progress on stderr: step/total, loss, tokens/s, ETA.

    On a TTY the line is redrawn in place (carriage return) at most every
    ``min_interval`` seconds (0.5). When the stream is not a TTY (CI logs,
    files) a plain line is printed at most every ``plain_interval`` seconds
    (30), without control characters. The last step is always shown.

    The ETA uses the average step rate since the first ``update`` (which
    usually includes compilation, so it is excluded).

    Only process 0 prints, unless ``enabled`` is given.
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        stream: TextIO | None = None,
        min_interval: float = 0.5,
        plain_interval: float = 30.0,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.interval = min_interval if self.tty else plain_interval
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._clock = clock
        self._origin: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_print: float | None = None
        self._pending: str | None = None  # latest line not yet shown
        self._width = 0
        self._closed = False

    def update(self, step: int, loss: float | None = None, tokens_per_sec: float | None = None) -> None:
        """Records progress after ``step``; prints if the interval has passed."""
        if not self.enabled or self._closed:
            return
        now = self._clock()
        step = int(step)
        if self._origin is None:
            self._origin = (step, now)
        line = self._format(step, loss, tokens_per_sec, now)
        due = self._last_print is None or now - self._last_print >= self.interval
        if due or step >= self.total_steps:
            self._emit(line)
            self._last_print = now
            self._pending = None
        else:
            self._pending = line

    def close(self) -> None:
        """Prints the latest state if it was not shown and ends the line."""
        if not self.enabled or self._closed:
            self._closed = True
            return
        if self._pending is not None:
            self._emit(self._pending)
        if self.tty and self._width:
            self.stream.write("\n")
        self.stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _format(self, step: int, loss, tokens_per_sec, now: float) -> str:
        total = max(self.total_steps, 1)
        frac = min(max(step / total, 0.0), 1.0)
        eta = None
        origin_step, origin_time = self._origin
        if step > origin_step and now > origin_time:
            rate = (step - origin_step) / (now - origin_time)
            eta = (self.total_steps - step) / rate
        elif step >= self.total_steps:
            eta = 0.0
        parts = [f"step {step}/{self.total_steps}"]
        if self.tty:
            filled = int(round(frac * self.BAR_WIDTH))
            parts[0] += f" [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}]"
        parts[0] += f" {100 * frac:5.1f}%"
        if loss is not None:
            loss = float(_to_python(loss))
            parts.append(f"loss {loss:.4f}")
        if tokens_per_sec is not None:
            parts.append(f"{_format_rate(float(_to_python(tokens_per_sec)))} tok/s")
        parts.append(f"ETA {_format_duration(eta)}")
        return " | ".join(parts)

    def _emit(self, line: str) -> None:
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
