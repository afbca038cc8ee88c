"""Timing and table helpers shared by the kernels' benchmark.py files and experiments/bench_kernels.py.

On a GPU the time is the summed device time of the kernels a call launches, measured with CUPTI
(jax.experimental.mosaic.gpu.profiler.measure): launch and Python dispatch overheads, which
dominate microsecond kernels when timed from the host, are left out. Where CUPTI is unavailable
(or on CPU) it is wall-clock time of back-to-back asynchronous calls. Either way the median of
`repeats` measurements after a warm-up call (which compiles).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import jax

from moe_jax.kernels import platform


def _wall_clock_ms(fn: Callable, args, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(5):  # asynchronous dispatch overlaps host overhead with the device
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e3 / 5)
    return statistics.median(samples)


def _cupti_ms(fn: Callable, args, repeats: int) -> Optional[float]:
    try:
        from jax.experimental.mosaic.gpu import profiler

        samples = []
        for _ in range(repeats):
            _, runtime = profiler.measure(fn)(*args)
            if runtime is None:  # no kernel launched
                return None
            samples.append(runtime if isinstance(runtime, float) else sum(runtime))
        return statistics.median(samples)
    except Exception:  # CUPTI missing, already subscribed, or another jax version's API
        return None


TIMERS_USED: set[str] = set()  # named in the reports' headers


def timers_used() -> str:
    return " and ".join(sorted(TIMERS_USED)) or "none"


def time_ms(fn: Callable, *args, repeats: int = 10) -> float:
    """Median milliseconds of fn(*args) (fn should be jitted), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    if platform.on_gpu():
        measured = _cupti_ms(fn, args, repeats)
        if measured is not None:
            TIMERS_USED.add("CUPTI device time")
            return measured
    TIMERS_USED.add("wall clock")
    return _wall_clock_ms(fn, args, repeats)


@dataclasses.dataclass
class Record:
    """One measured row: op, shape string, implementation, time and the derived rates."""

    op: str
    shape: str
    impl: str
    ms: float
    bytes_moved: float = 0.0
    flops: float = 0.0
    baseline_ms: Optional[float] = None  # the reference's time for the same shape
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12

    @property
    def roofline_ms(self) -> float:
        """The H200 lower bound: the slower of moving the bytes and doing the FLOPs."""
        return max(self.bytes_moved / (platform.H200_HBM_TBPS * 1e12),
                   self.flops / (platform.H200_BF16_TFLOPS * 1e12)) * 1e3


HEADER = ("| op | shape | impl | µs | GB/s | TFLOP/s | vs reference | % of H200 roofline | note |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---|")


def markdown_row(record: Record) -> str:
    speedup = f"{record.baseline_ms / record.ms:.2f}x" if record.baseline_ms else "-"
    roofline = f"{100 * record.roofline_ms / record.ms:.0f}%" if record.roofline_ms > 0 else "-"
    return (f"| {record.op} | {record.shape} | {record.impl} | {record.ms * 1e3:.1f} | {record.gbps:.0f} | "
            f"{record.tflops:.1f} | {speedup} | {roofline} | {record.note} |")


def print_table(records: list[Record]) -> None:
    print(f"timer: {timers_used()}; device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(HEADER)
    for record in records:
        print(markdown_row(record), flush=True)
