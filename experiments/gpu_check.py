r"""The GPU check: every GPU claim of the project measured in one command, each part under its own
time limit, written as one JSON and one Markdown report.

  bash scripts/gpu_check.sh [OUT_DIR]              # on the GPU machine (installs the carried wheels)
  python experiments/gpu_check.py --out=DIR        # the same, with what is installed
  python experiments/gpu_check.py --out=DIR --dry_run   # CPU, tiny shapes: the CI's rehearsal

Parts, in order (each one a subprocess of this file, `--part=NAME`, killed at its time limit; a
part that fails or times out leaves the others' results standing):

  env      versions, devices, which optional packages import (jax-triton, tokamax)
  pytest   `pytest -m gpu`: every compiled kernel against its reference, float32 and bfloat16,
           forward and gradients
  edges    experiments/kernel_edge_cases.py: the kernels at ragged shapes and several tilings
           against NumPy (the sweep that found the unmasked edge blocks)
  train    (with the XLA flags experiments/train.py adds: moe_jax.xla_flags) 20 bfloat16 training
           steps of the 350M+PR-MoE-32/64 preset cut to --train_layers layers: compile time,
           tokens/s, MFU, peak memory from the compiled step and the device
  kernels  at the paper's 1.3B shapes (M=2048, F=8192) in bfloat16: fused gating vs the XLA
           router (E 64 and 128, 8k and 32k tokens); the Pallas grouped matmul vs jax.lax.ragged_dot
           vs the capacity buffer's batched matmul (and tokamax's ragged_dot where it imports):
           TFLOP/s and the fraction of the 790 TFLOP/s bf16 peak
  layer    one MoE layer (1.3B+MoE-128: S=16384, E=128, top-1, cf 1.0) forward+backward per
           dispatch path, against the dense FFN of the same active FLOPs
  decode   decode latency at batch 1 and 8 per serving path (experiments/bench_inference.py)

Reports: DIR/gpu_check.json (every record, each part's status, time and log tail),
DIR/gpu_check.md (the tables) and DIR/gpu_check.log (every part's output). The whole check is
sized to end within 8 minutes on one H200 (--budget_s); each part gets the smaller of its own
limit and what is left of the budget.

--dry_run runs every part on the CPU at tiny shapes: the parts that need a GPU (compiled Pallas
kernels, jax-triton) report "skipped", and anything else that breaks fails the check (exit 1), so a
typo fails CI and not the GPU minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after an installed moe_jax (the check installs one); experiments/ from here

flags.DEFINE_string("out", None, "Folder for gpu_check.json, gpu_check.md and gpu_check.log.")
flags.DEFINE_bool("dry_run", False, "CPU, tiny shapes; GPU-only parts report skipped.")
flags.DEFINE_list("parts", None, "Parts to run (default: all, in order).")
flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget of the whole check in seconds.")
flags.DEFINE_integer("train_layers", 12, "Layers of the 350M+PR-MoE-32/64 model trained by the train part.")
flags.DEFINE_integer("train_steps", 20, "Timed training steps.")
flags.DEFINE_string("part", None, "Internal: run one part and write its JSON to --part_out.")
flags.DEFINE_string("part_out", None, "Internal: the part's JSON file.")
flags.DEFINE_float("part_limit_s", 600.0, "Internal: the part's time limit (its own children stop before it).")

H200_BF16_PEAK_TFLOPS = 790.0  # measured dense bf16 matmul rate on this card (the device notes)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    timeout_s: float  # on a GPU; a dry run gets dry_timeout_s
    dry_timeout_s: float = 240.0


PARTS = (
    # limits from the first H200 runs (2026-12-04): pytest took 49 s, the gather training variant
    # 55 s (35 s of it compiling); the budget cuts whatever is left for the last part
    Part("env", "Environment", 30),
    Part("pytest", "pytest -m gpu", 90),
    Part("edges", "Kernels at ragged shapes against NumPy", 60),
    Part("train", "Training steps (bfloat16)", 120),
    Part("kernels", "Kernels at the paper's shapes (bfloat16)", 70),
    Part("layer", "MoE layer per dispatch path, forward+backward (bfloat16)", 70),
    Part("decode", "Decode latency per serving path", 60),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------------------------------------
# Inside a part's process
# ----------------------------------------------------------------------------------------------

class PartResult:
    """What one part found: records (dicts), notes (lines) and skipped items; written after every
    change, so a part killed at its limit still leaves what it measured."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"records": [], "notes": [], "skipped": []}
        self.flush()

    def add(self, record: dict) -> None:
        self.data["records"].append(record)
        print(json.dumps(record), flush=True)
        self.flush()

    def note(self, line: str) -> None:
        self.data["notes"].append(line)
        print(line, flush=True)
        self.flush()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        print(f"skipped: {what}: {why}", flush=True)
        self.flush()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as out:
            json.dump(self.data, out, indent=1, default=str)
        os.replace(tmp, self.path)


def _backend() -> str:
    import jax
    return jax.default_backend()


def _on_gpu() -> bool:
    return _backend() == "gpu"


def part_env(result: PartResult, dry_run: bool) -> None:
    import importlib.metadata as metadata
    import platform as host_platform

    import jax

    from moe_jax import xla_flags
    training_flags = xla_flags.with_gpu_overlap_flags("")

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "ml_collections", "numpy",
                 "tensorboardX", "chex", "triton", "jax-triton", "tokamax", "pytest", "pytest-xdist"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    imports = {}
    for module in ("jax_triton", "tokamax", "ml_collections", "tensorboardX"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as error:  # the reason is the report
            imports[module] = f"{type(error).__name__}: {str(error)[:300]}"
    device = jax.devices()[0]
    memory = {}
    try:
        stats = device.memory_stats() or {}
        memory = {k: stats[k] for k in ("bytes_limit", "bytes_in_use") if k in stats}
    except Exception:
        pass
    result.set("env", {
        "python": host_platform.python_version(), "backend": jax.default_backend(),
        "device_kind": device.device_kind, "device_count": jax.device_count(), "memory": memory,
        "versions": versions, "imports": imports, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "training_xla_flags": training_flags,  # what experiments/train.py adds (moe_jax.xla_flags)
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    })
    from moe_jax.kernels import platform
    result.note(f"jax {jax.__version__} on {jax.default_backend()} ({device.device_kind} x{jax.device_count()}); "
                f"jax-triton kernels usable: {platform.jax_triton_available()}")
    if not dry_run and not _on_gpu():
        raise SystemExit(f"no GPU: JAX's default backend is {jax.default_backend()!r}. Run with --dry_run on CPU.")


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def part_pytest(result: PartResult, dry_run: bool, limit_s: float) -> None:
    """pytest -m gpu in a child process; the outcome of every test from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        env = dict(os.environ)
        env["MOE_JAX_TEST_CACHE"] = ""  # no persistent cache: nothing stale, nothing written in the repo
        if not dry_run:  # tests/conftest.py defaults to CPU: name the GPU, keep XLA's optimisations
            env.update(JAX_PLATFORMS="cuda", XLA_FLAGS=env.get("XLA_FLAGS", ""), XLA_PYTHON_CLIENT_PREALLOCATE="false")
        workers = ["-n", "4"] if not dry_run else []
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *workers,
                   "-rfEs", f"--junitxml={junit}", os.path.join(ROOT, "tests")]
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired as expired:  # report the tests that finished
            proc = subprocess.CompletedProcess(command, -9, _text(expired.stdout), _text(expired.stderr))
            result.note(f"pytest stopped at its {limit_s:.0f} s limit")
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
        if not os.path.exists(junit):
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-1500:]}")
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", (child.get("message") or "")[:500]
                elif child.tag == "skipped":
                    outcome, message = "skipped", (child.get("message") or "")[:200]
            counts[outcome] += 1
            result.add({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                        "seconds": float(case.get("time") or 0), "message": message})
        result.set("counts", counts)
        result.note(f"pytest -m gpu: {counts['passed']} passed, {counts['failed']} failed, "
                    f"{counts['skipped']} skipped (exit {proc.returncode})")
        if counts["failed"] or proc.returncode not in (0, 5):
            raise RuntimeError(f"pytest -m gpu: {counts['failed']} failed (exit {proc.returncode})")
        if counts["passed"] == 0:
            result.skip("pytest -m gpu", f"no GPU test ran: every one skips on {_backend()}")
            result.set("status", "skipped")


def _train_model(dry_run: bool, layers: int):
    from moe_jax import config as config_lib
    from moe_jax import run_config

    if dry_run:
        return run_config._fit_to_depth(config_lib.preset("tiny+pr-moe"), {"num_layers": 4, "max_seq_len": 64,
                                                                           "compute_dtype": "bfloat16"}), 4, 64
    model = run_config._fit_to_depth(config_lib.preset("350m+pr-moe-32/64"),
                                     {"num_layers": layers, "max_seq_len": 2048, "compute_dtype": "bfloat16"})
    return model, 8, 2048


def part_train(result: PartResult, dry_run: bool, layers: int, steps: int) -> None:
    import functools

    import jax
    import numpy as np

    from moe_jax import cost, metrics as metrics_lib, model as model_lib, train_lib
    from moe_jax.config import replace_moe

    base, batch_size, seq_len = _train_model(dry_run, layers)
    steps = 3 if dry_run else steps
    variants = [("gather", base),
                ("kernel + fused gating", replace_moe(base, dispatch="kernel", router_impl="kernel"))]
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-4, min_learning_rate=1e-5,
                                                               warmup_steps=2, total_steps=1000))
    counts = model_lib.count_params(base)
    flops_per_token = metrics_lib.transformer_flops_per_token(counts.active, base.num_layers, base.hidden_size,
                                                              seq_len)
    result.note(f"model: 350M+PR-MoE-32/64 cut to {base.num_layers} layers (layer experts "
                f"{base.layer_experts()}), {counts.total / 1e9:.2f}B parameters, {counts.active / 1e6:.0f}M "
                f"active; batch {batch_size} x {seq_len} tokens, bfloat16 compute, float32 parameters and AdamW"
                if not dry_run else f"dry run: tiny PR-MoE, {base.num_layers} layers, batch {batch_size} x {seq_len}")
    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    batch = {"inputs": rng.integers(0, base.vocab_size, shape).astype(np.int32),
             "targets": rng.integers(0, base.vocab_size, shape).astype(np.int32)}
    peak = metrics_lib.peak_flops_per_device()
    for name, model_cfg in variants:
        if name.startswith("kernel") and not _on_gpu():
            result.skip(f"train {name}", "the compiled kernels need a GPU")
            continue
        state = jax.jit(functools.partial(train_lib.init_state, model_cfg=model_cfg, optimizer=optimizer))(
            jax.random.key(0))
        step = jax.jit(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer),
                       donate_argnums=0)
        start = time.perf_counter()
        compiled = step.lower(state, batch, jax.random.key(1)).compile()
        compile_s = time.perf_counter() - start
        record = cost.record_of(compiled)
        memory = compiled.memory_analysis()
        compiled_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        state, metrics = compiled(state, batch, jax.random.key(1))  # first step (warm-up)
        first_loss = float(metrics["loss"])
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batch, jax.random.key(2 + i))
        last_loss = float(metrics["loss"])  # blocks
        seconds = time.perf_counter() - start
        tokens_per_s = steps * batch_size * seq_len / seconds
        device_peak = None
        try:
            device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        except Exception:
            pass
        result.add({
            "variant": name, "layers": model_cfg.num_layers, "params": counts.total, "active_params": counts.active,
            "batch": batch_size, "seq_len": seq_len, "steps": steps, "compile_s": compile_s,
            "ms_per_step": 1e3 * seconds / steps, "tokens_per_s": tokens_per_s,
            "model_flops_per_token": flops_per_token,
            "compiled_flops_per_token": record.flops / (batch_size * seq_len),
            "mfu_datasheet": metrics_lib.mfu(flops_per_token, tokens_per_s, peak),
            "fraction_of_790": flops_per_token * tokens_per_s / (H200_BF16_PEAK_TFLOPS * 1e12),
            "compiled_peak_bytes": compiled_peak, "temp_bytes": memory.temp_size_in_bytes,
            "device_peak_bytes": device_peak, "first_loss": first_loss, "last_loss": last_loss,
            "finite": bool(np.isfinite(last_loss)),
        })
        if not np.isfinite(last_loss):
            raise RuntimeError(f"train {name}: the loss is {last_loss} after {steps} steps")
        del state, compiled, step


def part_kernels(result: PartResult, dry_run: bool) -> None:
    from moe_jax.kernels import bench_util
    from moe_jax.kernels.gating import benchmark as gating_benchmark
    from moe_jax.kernels.grouped_matmul import benchmark as gmm_benchmark

    if dry_run:
        gating_shapes, gmm_shapes = [(64, 8, 1), (64, 8, 2)], [(64, 16, 32, 4)]
    else:
        gating_shapes = [(s, e, k) for s in (8192, 32768) for e in (64, 128) for k in (1, 2)]
        gmm_shapes = [(n, 2048, 8192, g) for n in (8192, 32768) for g in (64, 128)]
    if not _on_gpu():
        result.skip("Pallas and jax-triton kernels", "compiled kernels need a GPU (the references ran)")
    notes = []  # the grouped matmul first: the larger share of the part's time limit
    gmm_benchmark.run(gmm_shapes, tiles=gmm_benchmark.TILES[:2], notes=notes,
                      on_record=lambda r: result.add(_record_dict(r, peak=True)))
    for line in notes:
        result.note(line)
    gating_benchmark.run(gating_shapes, on_record=lambda r: result.add(_record_dict(r)))
    print(bench_util.timers_used(), flush=True)
    result.set("timer", bench_util.timers_used())


def _record_dict(record, peak: bool = False) -> dict:
    row = {"op": record.op, "shape": record.shape, "impl": record.impl, "us": record.ms * 1e3,
           "gbps": record.gbps, "tflops": record.tflops,
           "speedup": record.baseline_ms / record.ms if record.baseline_ms else None}
    if peak:
        row["fraction_of_790"] = record.tflops / H200_BF16_PEAK_TFLOPS
    return row


def part_layer(result: PartResult, dry_run: bool) -> None:
    from experiments import moe_layer_timing

    layers = [("tiny", 256, 8, 32, 64)] if dry_run else [moe_layer_timing.LAYERS[1]]
    deadline = time.perf_counter() + 3600  # the part's own time limit stops it
    moe_layer_timing.run_layers(layers, deadline, directions=("forward+backward",), with_dense=True,
                                on_record=lambda r: result.add({**_record_dict(r), "vs_dense": r.note}))
    if not _on_gpu():
        result.skip("kernel paths", "the compiled kernels need a GPU (off GPU they would time the references)")


def part_decode(result: PartResult, dry_run: bool, limit_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = os.path.join(tmp, "decode.json")
        if dry_run:
            sizes = ["--batches=1,2", "--prompt_lens=8", "--experts=4", "--model_dim=32", "--ffn_dim=64",
                     "--num_layers=2", "--new_tokens=3", "--repeats=1", "--layer_calls=2"]
        else:
            sizes = ["--batches=1,8", "--prompt_lens=128", "--experts=64", "--model_dim=1024", "--ffn_dim=4096",
                     "--num_layers=4", "--new_tokens=16", "--repeats=3"]
        command = [sys.executable, os.path.join(ROOT, "experiments", "bench_inference.py"), *sizes,
                   f"--json={records}", f"--png={os.path.join(tmp, 'decode.png')}"]
        try:  # its output streams into the log; its records are written after each measurement
            proc = subprocess.run(command, cwd=ROOT, timeout=limit_s)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
            result.note(f"bench_inference.py stopped at the part's {limit_s:.0f} s limit; the rows it finished:")
        if os.path.exists(records):
            with open(records) as f:
                for record in json.load(f):
                    result.add(record)
        if returncode not in (0, None):
            raise RuntimeError(f"bench_inference.py exited {returncode}")
    if not _on_gpu():
        result.skip("decode kernel path", "the compiled kernels need a GPU")


def part_edges(result: PartResult, dry_run: bool, limit_s: float) -> None:
    """kernel_edge_cases.py in a child process (interpret mode in a dry run); its table into notes."""
    command = [sys.executable, os.path.join(ROOT, "experiments", "kernel_edge_cases.py")]
    command += ["--interpret"] if dry_run else []
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        output, returncode = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as expired:
        output, returncode = _text(expired.stdout), None
        result.note(f"kernel_edge_cases.py stopped at its {limit_s:.0f} s limit")
    print(output[-8000:], flush=True)
    rows = [line for line in output.splitlines() if line.count("|") >= 4]
    for line in rows:
        cells = [c.strip() for c in line.split("|")]
        result.add({"op": cells[0], "case": cells[1], "setting": cells[2], "status": cells[3], "detail": cells[4]})
    wrong = [line for line in rows if "WRONG" in line or "ERROR" in line]
    result.set("counts", {"rows": len(rows), "wrong": len(wrong)})
    if returncode is None or returncode != 0 or wrong:
        raise RuntimeError(f"kernel_edge_cases.py: {len(wrong)} of {len(rows)} (case, setting) pairs wrong "
                           f"(exit {returncode})")


def run_part(name: str, path: str) -> None:
    f = flags.FLAGS
    result = PartResult(path)
    child_limit = max(5.0, f.part_limit_s - 15)  # a child process stops first, so the part can report
    runners = {
        "env": lambda: part_env(result, f.dry_run),
        "pytest": lambda: part_pytest(result, f.dry_run, child_limit),
        "edges": lambda: part_edges(result, f.dry_run, child_limit),
        "train": lambda: part_train(result, f.dry_run, f.train_layers, f.train_steps),
        "kernels": lambda: part_kernels(result, f.dry_run),
        "layer": lambda: part_layer(result, f.dry_run),
        "decode": lambda: part_decode(result, f.dry_run, child_limit),
    }
    try:
        runners[name]()
    except BaseException as error:
        result.set("error", "".join(traceback.format_exception(error))[-4000:])
        raise


# ----------------------------------------------------------------------------------------------
# The orchestrator
# ----------------------------------------------------------------------------------------------

def run_all(out_dir: str, parts: list[Part], dry_run: bool, budget_s: float) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "gpu_check.log")
    report = {"command": " ".join(sys.argv), "dry_run": dry_run, "budget_s": budget_s, "parts": {}}
    start = time.perf_counter()
    env = dict(os.environ)
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "w") as log, tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            left = budget_s - (time.perf_counter() - start)
            limit = min(part.dry_timeout_s if dry_run else part.timeout_s, left)
            entry = {"title": part.title, "limit_s": round(limit, 1)}
            report["parts"][part.name] = entry
            if limit < 5:
                entry.update(status="not run", reason=f"the {budget_s:.0f} s budget was spent")
                continue
            part_path = os.path.join(tmp, f"{part.name}.json")
            command = [sys.executable, os.path.abspath(__file__), f"--part={part.name}", f"--part_out={part_path}",
                       f"--train_layers={flags.FLAGS.train_layers}", f"--train_steps={flags.FLAGS.train_steps}",
                       f"--part_limit_s={limit}"]
            command += ["--dry_run"] if dry_run else []
            log.write(f"\n===== {part.name} (limit {limit:.0f} s) =====\n")
            log.flush()
            print(f"[{time.perf_counter() - start:5.0f} s] {part.name} (limit {limit:.0f} s)", flush=True)
            part_start = time.perf_counter()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=limit)
                status = "ok" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the part and every process it started
                output, _ = proc.communicate()
                status = "timeout"
            log.write(output or "")
            log.flush()
            entry.update(status=status, seconds=round(time.perf_counter() - part_start, 1), returncode=proc.returncode,
                         log_tail=(output or "")[-2500:])
            part_status = None
            if os.path.exists(part_path):
                with open(part_path) as f:
                    found = json.load(f)
                part_status = found.pop("status", None)
                entry.update(found)
            if status == "ok" and part_status:  # a part that ran but could do nothing here says "skipped"
                entry["status"] = part_status
            print(f"        {part.name}: {entry['status']} in {entry['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as out:
        json.dump(report, out, indent=1, default=str)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as out:
        out.write(markdown(report))
    return report


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def markdown(report: dict) -> str:
    parts = report["parts"]
    env = parts.get("env", {}).get("env", {})
    lines = ["# moe-jax GPU check" + (" (dry run on CPU)" if report["dry_run"] else ""), "",
             f"{env.get('date', '-')}; {env.get('device_kind', '-')} x{env.get('device_count', '-')}, "
             f"backend {env.get('backend', '-')}, Python {env.get('python', '-')}, "
             f"jax {env.get('versions', {}).get('jax', '-')}; {report['seconds']} s of "
             f"{report['budget_s']:.0f}. Command: `{report['command']}`.", "",
             "| part | status | seconds | limit s |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {p['status']} | {_fmt(p.get('seconds'))} | {_fmt(p.get('limit_s'))} |"
              for name, p in parts.items()]
    for name, p in parts.items():
        lines += ["", f"## {p['title']}", ""]
        if env and name == "env":
            lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)]
            lines += ["- imports: " + ", ".join(f"{k}: {v}" for k, v in env.get("imports", {}).items())]
        records = p.get("records", [])
        if name == "pytest" and records:
            failed = [r for r in records if r["outcome"] == "failed"]
            lines += [f"{p.get('counts')}"]
            lines += _table(["failed test", "message"], [[r["test"], r["message"][:200]] for r in failed])
        elif name == "edges" and records:
            bad = [r for r in records if r["status"] != "ok"]
            lines += [f"{len(records) - len(bad)} of {len(records)} (case, setting) pairs equal NumPy"]
            lines += _table(["op", "case", "setting", "status", "detail"],
                            [[r["op"], r["case"], r["setting"], r["status"], r["detail"]] for r in bad])
        elif name == "train" and records:
            lines += _table(["variant", "layers", "params", "batch x seq", "compile s", "ms/step", "tokens/s",
                             "MFU (989 TF datasheet)", "of 790 TF", "compiled peak GiB", "device peak GiB",
                             "loss first -> last"],
                            [[r["variant"], r["layers"], f"{r['params'] / 1e9:.2f}B", f"{r['batch']} x {r['seq_len']}",
                              r["compile_s"], r["ms_per_step"], f"{r['tokens_per_s']:.0f}",
                              f"{100 * r['mfu_datasheet']:.1f}%", f"{100 * r['fraction_of_790']:.1f}%",
                              r["compiled_peak_bytes"] / 2 ** 30,
                              None if r["device_peak_bytes"] is None else r["device_peak_bytes"] / 2 ** 30,
                              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"] for r in records])
        elif name in ("kernels", "layer") and records:
            header = ["op", "shape", "impl", "µs", "GB/s", "TFLOP/s", "vs first row"]
            header += ["of 790 TF"] if name == "kernels" else ["vs dense FFN"]
            lines += _table(header, [[r["op"], r["shape"], r["impl"], r["us"], r["gbps"], r["tflops"],
                                      None if r["speedup"] is None else f"{r['speedup']:.2f}x",
                                      f"{100 * r['fraction_of_790']:.0f}%" if "fraction_of_790" in r
                                      else r.get("vs_dense", "")] for r in records])
        elif name == "decode" and records:
            lines += _table(["path", "E", "batch", "prompt", "prefill ms", "decode ms/token", "tokens/s",
                             "MoE layer ms"],
                            [[r["path"], r["E"], r["batch"], r["prompt_len"], r["prefill_ms"], r["ms_per_token"],
                              f"{r['tokens_per_s']:.0f}", r["moe_layer_ms"]] for r in records])
        lines += [f"- {line}" for line in p.get("notes", [])]
        lines += [f"- skipped: {s['what']}: {s['why']}" for s in p.get("skipped", [])]
        if p["status"] in ("failed", "timeout"):
            lines += ["", "```", (p.get("error") or p.get("log_tail", ""))[-1500:], "```"]
        elif p["status"] == "not run":
            lines += [f"not run: {p['reason']}"]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.part:
        if f.part not in PART_NAMES or not f.part_out:
            raise app.UsageError(f"--part must be one of {PART_NAMES}, with --part_out")
        if f.part == "train":  # trained as experiments/train.py trains: its XLA flags (moe_jax.xla_flags)
            from moe_jax import xla_flags
            xla_flags.add_gpu_overlap_flags()
        run_part(f.part, f.part_out)
        return
    if not f.out:
        raise app.UsageError("--out=DIR is required (where gpu_check.json and gpu_check.md go)")
    names = f.parts or list(PART_NAMES)
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        raise app.UsageError(f"--parts holds {unknown}; use some of {PART_NAMES}")
    report = run_all(f.out, [p for p in PARTS if p.name in names], f.dry_run, f.budget_s)
    print(f"wrote {os.path.join(f.out, 'gpu_check.md')} and gpu_check.json ({report['seconds']} s)")
    bad = [name for name, p in report["parts"].items() if p["status"] in ("failed", "timeout", "not run")]
    if bad:
        print(f"parts that did not finish: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
