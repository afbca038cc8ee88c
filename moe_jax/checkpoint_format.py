"""What a checkpoint holds on disk, beside Orbax's own files (moe_jax.checkpoint is the API):
the commit marker that makes a step count, the SHA-256 of every leaf, the shapes leaves are stored
with (a typed PRNG key as its raw key data), the JSON `extra` item, and how orbax writes arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe_jax.pytree import path_name

# Orbax's commit marker; see orbax/checkpoint/_src/path/atomicity_types.py.
COMMIT_MARKER = "commit_success.txt"


def whole_shard_array_writes() -> None:
    """Has replica 0 of each shard write it whole (orbax's choice when JAX_PLATFORMS names a GPU),
    unless a custom array handler is registered already. Otherwise orbax saves replica-parallel: every
    replicated array is split between its replicas by one eager slice per replica, array shape and
    slice, each a separate XLA compile. With several devices on one host (virtual CPU devices, a
    CPU multi-host run) a save then spends seconds compiling slices and writes nothing in parallel
    that it would not write anyway. The values saved are the same, and checkpoints written either way
    restore either way."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if type(current) is ocp.type_handlers.ArrayHandler and getattr(current, "_use_replica_parallel", False):
        # orbax warns on every override, and this one is meant
        quiet = lambda record: "overriding" not in record.getMessage()  # noqa: E731
        std_logging.getLogger("absl").addFilter(quiet)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
                use_replica_parallel=False,  # the rest as orbax's default handler has it
                array_metadata_store=getattr(current, "_array_metadata_store", None)), override=True)
        finally:
            std_logging.getLogger("absl").removeFilter(quiet)


def leaf_digests(tree) -> Optional[dict]:
    """{leaf path: [dtype, sha256 of its bytes]}, or None when a leaf is not wholly on this host."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        if is_prng_key(leaf):
            leaf = jax.random.key_data(leaf)  # a typed PRNG key: its raw bits
        value = np.ascontiguousarray(jax.device_get(leaf))
        out[path_name(path)] = [str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]
    return out


def is_committed(step_dir: epath.Path) -> bool:
    return (step_dir / COMMIT_MARKER).exists()


@dataclasses.dataclass(frozen=True)
class CommittedStepNameFormat:
    """Orbax `NameFormat` that hides step directories without a commit marker.

    Plugged into `CheckpointManagerOptions.step_name_format`, so Orbax itself
    (latest step, should-save decisions, keep-last-K, restore) never sees an
    uncommitted step. Names are Orbax's standard ones (`<step>`).
    """

    base: Any = dataclasses.field(default_factory=ocp.path.step.standard_name_format)

    def __str__(self) -> str:
        return f"CommittedOnly({self.base})"

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path) -> Iterator[Any]:
        return (m for m in self.base.find_all(base_path) if is_committed(epath.Path(m.path)))

    def find_step(self, base_path, step: int):
        metadata = self.base.find_step(base_path, step)  # raises ValueError if absent
        if not is_committed(epath.Path(metadata.path)):
            raise ValueError(
                f"Step directory {metadata.path} has no {COMMIT_MARKER}: the save did "
                "not complete."
            )
        return metadata


def to_json_value(obj: Any) -> Any:
    """`json.dumps` hook for numpy / jax scalars and small arrays."""
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(obj)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"`extra` must be JSON-serialisable; got a {type(obj).__name__}: {obj!r:.80}"
    )


def normalise_extra(extra: dict | None) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"`extra` must be a dict, got {type(extra).__name__}")
    # Round trip through JSON here so that a bad value fails in the caller's
    # thread, before Orbax has created the step's tmp directory.
    return json.loads(json.dumps(extra, default=to_json_value))


def abstract_target(target: Any) -> Any:
    """Maps a target pytree to what `StandardRestore` accepts: jax arrays become
    ShapeDtypeStructs (keeping their sharding), numpy scalars 0-d arrays (Orbax rejects
    `np.generic` leaves)."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.generic):
            return np.asarray(x)
        return x

    return jax.tree.map(leaf, target)


def is_prng_key(leaf) -> bool:
    """A typed PRNG key array (or its abstract shape): stored on disk as its raw key data."""
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def stored_shape(leaf) -> tuple:
    """The shape a leaf has on disk: a typed PRNG key array is stored as its raw key data."""
    if is_prng_key(leaf):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))


def shapes(tree) -> dict[str, tuple]:
    return {path_name(path): stored_shape(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
