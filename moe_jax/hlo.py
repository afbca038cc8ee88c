"""The compiled HLO text of a step, walked: every computation reachable from the entry, with loop
trip counts, for the dot FLOPs and the collectives of one device (moe_jax.cost builds its records
from `walk_hlo`).

FLOPs. XLA's `compiled.cost_analysis()["flops"]` counts a while loop's body once, whatever its trip
count. The record's `flops` corrects this by walking the compiled HLO text:
  * every dot and convolution in every computation reachable from the entry (fusions, calls, loop
    bodies) is counted as 2 * output elements * contracted size (a convolution: 2 * output
    elements * kernel elements / output features);
  * a while loop multiplies what its body and condition hold by its trip count: the
    `known_trip_count` XLA prints in the loop's backend_config (scan and static fori_loop);
  * a loop without one (a fori_loop with a traced bound, e.g. the dropless tile loop) is bounded
    by the largest leading dimension of the arrays its body writes with dynamic-update-slice, an
    upper bound for loops that write one slice per iteration; `dynamic_trip_count` overrides it,
    and the record counts such loops in `dynamic_loops`;
  * a conditional counts its most expensive branch;
  * flops = cost_analysis flops + (walked dot FLOPs with trip counts - walked dot FLOPs with every
    trip count 1). Only the dots are multiplied: elementwise work inside a loop body stays counted
    once. Custom calls (GPU kernels) have no FLOPs in either count: they are listed in
    `custom_calls` so a caller can add analytic FLOPs for them.

Collectives. Each all-to-all, all-gather, all-reduce, reduce-scatter and collective-permute
(synchronous or the -start half of an async pair; ragged-all-to-all counts as all-to-all) is
recorded with the bytes of its output on one device (a tuple-shaped op sums its elements), times
the trip counts of the loops around it, and its replica groups as logical device ids (the
position of a device in the mesh, row-major); one over groups of one device moves nothing and is
left out. Output bytes are what a device ends up holding, not link traffic: a ring all-reduce
moves about 2 (g - 1) / g of them per device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tempfile
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

COLLECTIVE_KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_OPCODE_KIND = {**{k: k for k in COLLECTIVE_KINDS}, **{f"{k}-start": k for k in COLLECTIVE_KINDS},
                "ragged-all-to-all": "all-to-all"}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


# ----------------------------------------------------------------------------------------------
# The HLO text
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Op:  # one HLO instruction
    name: str
    shape: str  # the output shape's text, e.g. "f32[4,8]{1,0}" or "(f32[2], s32[])"
    opcode: str
    operands: tuple[str, ...]
    attrs: str


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes text[start] (one of '(' and '{', nested either way)."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({"
        depth -= text[i] in ")}"
        if depth == 0:
            return i
    return len(text)


def _parse_op(name: str, text: str) -> _Op:
    """'f32[4]{0} dot(%a, %b), attrs' (a tuple shape in balanced parens) -> _Op."""
    end = _closing(text, 0) + 1 if text.startswith("(") else text.find(" ")
    shape, rest = text[:end], text[end:].lstrip()
    match = re.match(r"([\w\-]+)\(", rest)
    if not match:
        return _Op(name, shape, rest.split(" ")[0], (), rest)
    close = _closing(rest, match.end() - 1)
    operands = rest[match.end():close]
    return _Op(name, shape, match.group(1), tuple(re.findall(r"%([\w.\-]+)", operands)),
               rest[close + 1:] + " " + operands)


def parse_hlo(text: str) -> tuple[dict[str, list[_Op]], str]:
    """HLO module text -> ({computation name: its instructions}, entry computation name)."""
    computations: dict[str, list[_Op]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and "=" not in line.split("(")[0]:
                current = header.group(1)
                computations[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(_parse_op(match.group(1), match.group(2)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text() of a compiled function")
    return computations, entry


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:  # [(dtype, dims)] of a shape's arrays
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)
            if dtype in _DTYPE_BYTES]


def _op_flops(op: _Op, shapes: dict[str, str]) -> float:
    """2 * output elements * contracted size of a dot; of a convolution, the kernel's elements
    per output feature stand for the contracted size. 0 for any other op."""
    if op.opcode not in ("dot", "convolution") or len(op.operands) < 2:
        return 0.0
    out = _arrays(op.shape)
    lhs, rhs = (_arrays(shapes.get(name, "")) for name in op.operands[:2])
    labels = re.search(r"dim_labels=\w+_(\w+)->", op.attrs)
    if not out or not lhs or not rhs or (op.opcode == "convolution" and not labels):
        return 0.0
    if op.opcode == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", op.attrs)
        contracted = math.prod(lhs[0][1][int(d)] for d in (dims.group(1).split(",") if dims else ()) if d)
    else:
        contracted = math.prod(rhs[0][1]) / max(1, rhs[0][1][labels.group(1).index("o")])
    return 2.0 * math.prod(out[0][1]) * contracted


def _replica_groups(attrs: str) -> tuple[tuple[int, ...], ...]:
    """Replica groups in any of XLA's spellings: {{0,1},{2,3}}, [2,2]<=[4] (iota, optionally
    T(perm)), or mesh['a'=2,'b'=2] {'a'}. () when absent or unreadable."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = re.findall(r"'([^']+)'", mesh.group(2))
        if not set(chosen) <= set(names):  # e.g. a sub-axis spelling this parser does not know
            return ()
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        order = [names.index(a) for a in names if a not in chosen] + [names.index(a) for a in chosen]
        size = math.prod(sizes[names.index(a)] for a in chosen)
        return tuple(tuple(int(i) for i in g) for g in ids.transpose(order).reshape(-1, size))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if iota:
        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
        return tuple(tuple(int(i) for i in g) for g in ids.reshape(int(iota.group(1)), int(iota.group(2))))
    listed = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if listed:
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([0-9,]*)\}", listed.group(1)))
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if pairs:
        return tuple(tuple(int(i) for i in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1)))
    return ()


def _collective_bytes(op: _Op) -> int:
    """Output bytes (a tuple sums its elements); an async start's tuple also holds its operands,
    which are left out."""
    arrays = _arrays(op.shape)
    if op.opcode in ("all-gather-start", "collective-permute-start") and op.shape.startswith("("):
        # (operands..., outputs...[, u32 contexts])
        arrays = [arrays[1]] if op.opcode == "collective-permute-start" else arrays[len(arrays) // 2:]
    return int(sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in arrays))


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of the compiled step. bytes: its output on one device, times `count`."""

    kind: str
    bytes: int
    count: int  # executions per step (trip counts of the loops around it)
    groups: tuple[tuple[int, ...], ...]  # logical device ids per group; for a permute, (source, target) pairs
    name: str

    @property
    def group_size(self) -> int:
        return max((len(g) for g in self.groups), default=0) if self.kind != "collective-permute" else 2


@dataclasses.dataclass
class _Walk:
    dot_flops: float = 0.0  # with trip counts
    dot_flops_once: float = 0.0  # every loop body once, as cost_analysis counts it
    collectives: list = dataclasses.field(default_factory=list)
    dynamic_loops: int = 0
    custom_calls: list = dataclasses.field(default_factory=list)

def _loop_bound(body: str, computations: dict[str, list[_Op]]) -> int:
    """Largest leading dimension the loop body (or a fusion it calls) writes with dynamic-update-slice."""
    bound, todo = 0, [body]
    while todo:  # fusions call fusions, never back: no cycles
        for op in computations.get(todo.pop(), ()):
            dims = _arrays(op.shape) if op.opcode == "dynamic-update-slice" else []
            bound = max(bound, dims[0][1][0] if dims and dims[0][1] else 0)
            todo.extend(callee for key, callee in _CALLS.findall(op.attrs) if key == "calls")
    return bound


def walk_hlo(text: str, dynamic_trip_count: Optional[int] = None) -> _Walk:
    """Dot/convolution FLOPs and collectives of a compiled module, loops multiplied out (module docstring)."""
    computations, entry = parse_hlo(text)
    shapes = {op.name: op.shape for ops in computations.values() for op in ops}
    result = _Walk()

    @functools.lru_cache(maxsize=None)
    def visit(name: str) -> tuple[float, float, tuple]:
        """(dot FLOPs with trip counts, dot FLOPs with trip counts 1, ((collective, multiplier), ...))."""
        flops, once, found = 0.0, 0.0, []
        for op in computations.get(name, ()):
            flops, once = flops + _op_flops(op, shapes), once + _op_flops(op, shapes)
            if op.opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', op.attrs)
                result.custom_calls.append(target.group(1) if target else op.name)
            groups = _replica_groups(op.attrs) if op.opcode in _OPCODE_KIND else ((),)
            if max(map(len, groups), default=2) > 1:  # a group of one device moves nothing
                found.append((Collective(_OPCODE_KIND[op.opcode], _collective_bytes(op), 1, groups, op.name), 1))
            callees = dict(_CALLS.findall(op.attrs))
            if op.opcode == "while":
                trip = _TRIP.search(op.attrs)
                trips = int(trip.group(1)) if trip else dynamic_trip_count or max(
                    1, _loop_bound(callees.get("body", ""), computations))
                if not trip:
                    result.dynamic_loops += 1
                    logging.info("loop %s has no static trip count; counted %d times", op.name, trips)
                for key in ("body", "condition"):
                    inner, inner_once, inner_found = visit(callees.get(key, ""))
                    flops, once = flops + trips * inner, once + inner_once
                    found.extend((c, m * trips) for c, m in inner_found)
                continue
            if op.opcode == "conditional":
                branches = _BRANCHES.search(op.attrs)
                names = branches.group(1).split(",") if branches else list(callees.values())
                best = max((visit(b.strip().lstrip("%")) for b in names), key=lambda c: c[0], default=(0, 0, ()))
                flops, once = flops + best[0], once + best[1]
                found.extend(best[2])
                continue
            for key, callee in callees.items():
                if key != "to_apply" or op.opcode == "call":  # a reducer holds no dots or collectives
                    inner, inner_once, inner_found = visit(callee)
                    flops, once = flops + inner, once + inner_once
                    found.extend(inner_found)
        return flops, once, tuple(found)

    result.dot_flops, result.dot_flops_once, found = visit(entry)
    result.collectives = [dataclasses.replace(c, bytes=c.bytes * m, count=m) for c, m in found]
    return result


# ----------------------------------------------------------------------------------------------
# The cost record
# ----------------------------------------------------------------------------------------------


def compile_partitioned(lowered, options: Optional[dict] = None):
    """(compiled, text): `lowered` compiled, and its module right after XLA's SPMD partitioner, with
    the collectives in the dtypes the program asks for. A backend rewrites them afterwards: XLA:CPU
    promotes bfloat16 all-reduces, reduce-scatters, all-gathers and all-to-alls to float32 (a GPU
    runs them in bfloat16), and GPU fuses an all-reduce and a slice into a reduce-scatter."""
    # A persistent-cache hit runs no pass and dumps nothing (dump options are not in the cache key):
    # the cache is off for this compile (reset_cache makes jax read the setting again).
    cached = jax.config.jax_enable_compilation_cache
    with tempfile.TemporaryDirectory() as directory:
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            compiled = lowered.compile({**(options or {}), "xla_dump_to": directory,
                                        "xla_dump_hlo_pass_re": "spmd-partitioning"})
        finally:
            jax.config.update("jax_enable_compilation_cache", cached)
            compilation_cache.reset_cache()
        dumps = sorted(f for f in os.listdir(directory) if "after_spmd-partitioning" in f)
        if not dumps:
            raise RuntimeError(f"XLA wrote no module after spmd-partitioning (files: {os.listdir(directory)})")
        with open(os.path.join(directory, dumps[-1])) as f:
            return compiled, f.read()
