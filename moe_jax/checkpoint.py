"""Training checkpoints: a small wrapper over ``orbax.checkpoint.CheckpointManager``.

Each checkpoint is one step directory holding two Orbax items::

    <directory>/<step>/
        state/               # the array pytree (StandardSave / StandardRestore)
        extra/               # a small JSON dict (JsonSave / JsonRestore)
        _CHECKPOINT_METADATA
        commit_success.txt   # written last, just before the commit

Usage::

    with Checkpointer(workdir / "ckpt", keep=3, save_every=1000) as ckpt:
        if ckpt.latest_step() is not None:
            state, extra = ckpt.restore(target=jax.eval_shape(init_state))
        ...
        ckpt.save(step, state, extra={"data_position": pos, "rng": seed})

Atomicity. Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` when the save is committed (on GCS it writes
``commit_success.txt`` instead). A directory with the tmp suffix is therefore
never a checkpoint, and tmp directories left by a crash are deleted when the
next ``Checkpointer`` opens the directory. As a second guard, this wrapper only
counts a step directory as a checkpoint when it holds ``commit_success.txt``
(Orbax 0.12 writes it in both atomicity modes, just before the rename). So a
partly copied step directory, or one with its marker missing, is never
returned by ``latest_step()``, ``all_steps()`` or ``restore()``, does not count
towards ``keep``, and is overwritten if that step is saved again. (Checkpoints
written by old Orbax versions without the marker are therefore ignored.)

Several processes (``jax.distributed``): every process must construct the
``Checkpointer`` and call ``save``/``restore``/``wait``/``close`` in the same
order, with the same arguments; Orbax coordinates the writes (each process
writes its own shards, the primary process writes metadata and the ``extra``
JSON and commits the step). There is no process-0-only logic here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
# Orbax's commit marker; see orbax/checkpoint/_src/path/atomicity_types.py.
COMMIT_MARKER = "commit_success.txt"


def _is_committed(step_dir: epath.Path) -> bool:
    return (step_dir / COMMIT_MARKER).exists()


@dataclasses.dataclass(frozen=True)
class _CommittedStepNameFormat:
    """Orbax ``NameFormat`` that hides step directories without a commit marker.

    Plugged into ``CheckpointManagerOptions.step_name_format``, so Orbax itself
    (latest step, should-save decisions, keep-last-K, restore) never sees an
    uncommitted step. Names are Orbax's standard ones (``<step>``).
    """

    base: Any = dataclasses.field(default_factory=ocp.path.step.standard_name_format)

    def __str__(self) -> str:
        return f"CommittedOnly({self.base})"

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path) -> Iterator[Any]:
        return (m for m in self.base.find_all(base_path) if _is_committed(epath.Path(m.path)))

    def find_step(self, base_path, step: int):
        metadata = self.base.find_step(base_path, step)  # raises ValueError if absent
        if not _is_committed(epath.Path(metadata.path)):
            raise ValueError(
                f"Step directory {metadata.path} has no {COMMIT_MARKER}: the save did "
                "not complete."
            )
        return metadata


def _to_json_value(obj: Any) -> Any:
    """``json.dumps`` hook for numpy / jax scalars and small arrays."""
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(obj)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"`extra` must be JSON-serialisable; got a {type(obj).__name__}: {obj!r:.80}"
    )


def _normalise_extra(extra: dict | None) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"`extra` must be a dict, got {type(extra).__name__}")
    # Round trip through JSON here so that a bad value fails in the caller's
    # thread, before Orbax has created the step's tmp directory.
    return json.loads(json.dumps(extra, default=_to_json_value))


def _concrete_sharding(sharding, mesh):
    """Replaces a NamedSharding over an AbstractMesh with one over a real mesh.

    With explicit mesh axes (``jax.make_mesh``'s default in jax 0.12),
    ``jax.eval_shape`` returns shardings over an ``AbstractMesh``, even inside
    ``jax.set_mesh``; Orbax 0.12.8 fails on them with "_device_assignment is
    not implemented for `jax.sharding.AbstractMesh`".
    """
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    abstract = sharding.mesh
    if not isinstance(abstract, jax.sharding.AbstractMesh):
        return sharding
    candidates = [mesh] if mesh is not None else []
    get_mesh = getattr(jax.sharding, "get_mesh", None)
    context_mesh = get_mesh() if get_mesh is not None else None
    if context_mesh is not None and not context_mesh.empty:
        candidates.append(context_mesh)
    for candidate in candidates:
        if (
            candidate.axis_names == abstract.axis_names
            and tuple(candidate.axis_sizes) == tuple(abstract.axis_sizes)
        ):
            return jax.sharding.NamedSharding(candidate, sharding.spec, memory_kind=sharding.memory_kind)
    raise ValueError(
        f"restore target has a sharding over an abstract mesh ({abstract}), as "
        "jax.eval_shape returns for explicitly sharded arrays; pass the concrete mesh "
        "(`restore(..., mesh=mesh)`), call restore inside `with jax.set_mesh(mesh):`, "
        "or give ShapeDtypeStructs with concrete shardings."
    )


def _abstract_target(target: Any, mesh) -> Any:
    """Maps a target pytree to what ``StandardRestore`` accepts.

    jax arrays become ShapeDtypeStructs (keeping their sharding), numpy scalars
    become 0-d arrays (Orbax rejects ``np.generic`` leaves), abstract-mesh
    shardings are resolved (see ``_concrete_sharding``).
    """

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            sharding = _concrete_sharding(x.sharding, mesh)
            if sharding is x.sharding:
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)
        if isinstance(x, np.generic):
            return np.asarray(x)
        return x

    return jax.tree.map(leaf, target)


class Checkpointer:
    """Saves and restores ``(state, extra)`` pairs under one directory.

    Args:
      directory: root directory (local path or anything ``etils.epath``
        understands, e.g. ``gs://``). Created if missing.
      keep: number of most recent checkpoints to keep (``None``: keep all).
      save_every: if set, ``save(step, ...)`` only writes when ``step`` is a
        multiple of it (plus the very first save into an empty directory, which
        Orbax always accepts). ``force=True`` overrides. ``None``: every call
        saves.
      async_save: if True, ``save`` returns once the arrays are copied to host
        memory and the write continues in a background thread; call ``wait()``
        before relying on the files. ``restore`` and ``close`` wait by
        themselves.
      read_only: for readers of another run's checkpoints (generation,
        distillation teachers): never creates, deletes or cleans up anything,
        so a run that is still saving there is left alone.

    Saving at a step that already has a committed checkpoint never overwrites
    it: ``save`` logs and returns False (also with ``force=True``). Saving at
    a step below ``latest_step()`` is skipped unless ``force=True``.
    """

    def __init__(
        self,
        directory,
        *,
        keep: int | None = 3,
        save_every: int | None = None,
        async_save: bool = False,
        read_only: bool = False,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1 or None, got {save_every}")
        directory = epath.Path(directory)
        if "://" not in str(directory):
            directory = directory.expanduser().resolve()
        self.directory = directory
        self.keep = keep
        self.save_every = save_every
        self.async_save = async_save
        self._name_format = _CommittedStepNameFormat()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every or 1,
            enable_async_checkpointing=async_save,
            # Delete `<step>.orbax-checkpoint-tmp*` dirs left by a crashed save.
            cleanup_tmp_directories=not read_only,
            step_name_format=self._name_format,
            create=not read_only,
            read_only=read_only,
        )
        self._mngr = ocp.CheckpointManager(directory, options=options)
        self._closed = False

    # -- queries ---------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed (or, with async_save, in-flight) steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpointed step, or None if there is none.

        Read from disk when the Checkpointer is opened and updated by its own
        saves (call ``reload()`` to see checkpoints written by another job).
        With ``async_save`` it includes a step whose write is still in flight;
        ``restore`` waits for it.
        """
        return self._mngr.latest_step()

    def reload(self) -> None:
        """Re-reads the list of checkpoints from disk."""
        self._mngr.reload()

    # -- save / restore --------------------------------------------------------

    def save(self, step: int, state: Any, extra: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` (pytree of arrays) and ``extra`` (JSON dict) at ``step``.

        Returns True if a checkpoint was written (or, with async_save, started),
        False if skipped (``save_every``, step not newer than the latest, or the
        step already exists). Raises TypeError for a non-JSON ``extra`` before
        anything is written.
        """
        self._check_open()
        step = int(step)
        extra = _normalise_extra(extra)
        if step in self._mngr.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saving", step, self.directory)
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)}
        )
        return bool(self._mngr.save(step, args=args, force=force))

    def restore(self, step: int | None = None, *, target: Any = None, mesh=None) -> tuple[Any, dict]:
        """Restores ``(state, extra)`` from ``step`` (default: the latest).

        Args:
          step: step to restore; None for ``latest_step()``.
          target: pytree with the structure of the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(init_fn)``, with or
            without ``sharding=``), jax/numpy arrays, or python scalars. The
            result has the target's pytree structure (namedtuples such as optax
            states included), dtypes (arrays are cast if they differ from the
            saved ones) and shardings. A leaf without a sharding gets the
            sharding it was saved with, which needs the same devices.
            Without a target, Orbax rebuilds the tree from its metadata: dicts
            and lists instead of namedtuples/dataclasses, saved shardings.
          mesh: concrete mesh for target shardings defined over an
            ``AbstractMesh`` (what ``jax.eval_shape`` returns for explicitly
            sharded arrays); the mesh set with ``jax.set_mesh`` is used if
            this is None.

        Raises:
          FileNotFoundError: no (complete) checkpoint in the directory, or none
            at ``step``.
        """
        self._check_open()
        self.wait()
        steps = self._mngr.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No complete checkpoint found in {self.directory}")
            step = max(steps)
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory} "
                f"(available steps: {sorted(steps)})"
            )
        state_args = (
            ocp.args.StandardRestore() if target is None
            else ocp.args.StandardRestore(_abstract_target(target, mesh))
        )
        items = {STATE_ITEM: state_args}
        has_extra = (self.directory / self._name_format.build_name(step) / EXTRA_ITEM).exists()
        if has_extra:
            items[EXTRA_ITEM] = ocp.args.JsonRestore()
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        extra = restored[EXTRA_ITEM] if has_extra else {}
        return restored[STATE_ITEM], dict(extra or {})

    # -- lifecycle -------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until an in-flight async save is committed (no-op if sync)."""
        if not self._closed:
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads. Idempotent."""
        if not self._closed:
            self._mngr.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpointer({str(self.directory)!r}, keep={self.keep}, "
            f"save_every={self.save_every}, async_save={self.async_save})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

