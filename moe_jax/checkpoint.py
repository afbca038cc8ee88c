"""Training checkpoints: a small wrapper over `orbax.checkpoint.CheckpointManager`.

Each checkpoint is one step directory; every entry of the saved dict is an Orbax item of its own,
so parameters can be restored without the optimizer state (a distillation teacher, generation,
the initialisation of another run)::

    <directory>/<step>/
        params/              # an array pytree (StandardSave / StandardRestore)
        opt_state/           # another one
        extra/               # a small JSON dict (JsonSave / JsonRestore): data position, ...
        _CHECKPOINT_METADATA
        commit_success.txt   # written last, just before the commit

Usage::

    with Checkpointer(workdir / "checkpoints", keep=3) as ckpt:
        step = ckpt.latest_step()
        if step is not None:
            items, extra = ckpt.restore(step, target={"params": params_shapes, "opt_state": opt_shapes})
        ...
        ckpt.save(step, {"params": params, "opt_state": opt_state}, extra={"data_step": step})
    params, step = load_params("runs/teacher", target=params_shapes)  # another run's, read-only

Atomicity. Orbax writes a step into `<step>.orbax-checkpoint-tmp` and
renames it to `<step>` when the save is committed (on GCS it writes
`commit_success.txt` instead). A directory with the tmp suffix is therefore
never a checkpoint, and tmp directories left by a crash are deleted when the
next `Checkpointer` opens the directory. As a second guard, this wrapper only
counts a step directory as a checkpoint when it holds `commit_success.txt`
(Orbax 0.12 writes it in both atomicity modes, just before the rename). So a
partly copied step directory, or one with its marker missing, is never
returned by `latest_step()` or `restore()`, does not count towards
`keep`, and is overwritten if that step is saved again. (Checkpoints written
by old Orbax versions without the marker are therefore ignored.)

Integrity. Orbax keeps no checksum of the array data: a flipped bit in a chunk is read back
silently as a wrong value. `save` therefore records a SHA-256 of every leaf (its dtype and bytes)
in the step's `extra` item, committed with the step, and `restore` compares every restored leaf
of the saved dtype with it. A step whose files cannot be read or whose arrays do not match raises
`CorruptCheckpointError`; `restore_latest` then falls back to the previous complete step with a
warning that names the bad one, moving the bad step into `corrupt/` so the run can save that step
again, and fails with that error when no step is readable. (Arrays that this process cannot see
whole, across several hosts, are not checksummed.)

Several processes (`jax.distributed`): every process must construct the
`Checkpointer` and call `save`/`restore`/`close` in the same order,
with the same arguments; Orbax coordinates the writes (each process writes its
own shards, the primary process writes metadata and the `extra` JSON and
commits the step). There is no process-0-only logic here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moe_jax import checkpoint_format

__all__ = ["Checkpointer", "CorruptCheckpointError", "checkpoint_dir", "load_params"]

EXTRA_ITEM = "extra"
CHECKSUM_KEY = "_leaf_sha256"  # in the extra item: item -> {leaf path: [dtype, sha256]}
CORRUPT_DIR = "corrupt"  # where restore_latest moves unreadable steps
CHECKPOINT_DIR = "checkpoints"  # a workdir's checkpoint directory
COMMIT_MARKER = checkpoint_format.COMMIT_MARKER



class CorruptCheckpointError(ValueError):
    """A committed step whose files cannot be read or whose arrays differ from their checksums."""


def _saved_tree(step_dir, name: str) -> Any:
    """The metadata tree of item `name` in a step directory (CorruptCheckpointError if unreadable)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(step_dir / name).tree
    except Exception as error:
        raise CorruptCheckpointError(f"checkpoint {step_dir}/{name} cannot be read: {type(error).__name__}: "
                                     f"{str(error)[:300]}") from error
    finally:
        handler.close()


class Checkpointer:
    """Saves and restores dicts of array pytrees (one Orbax item each) plus a JSON `extra` dict.

    Args:
      directory: root directory (local path or anything `etils.epath`
        understands, e.g. `gs://`). Created if missing.
      keep: number of most recent checkpoints to keep (`None`: keep all).
      read_only: for readers of another run's checkpoints (generation,
        distillation teachers, initialisation): never creates, deletes or
        cleans up anything, so a run that is still saving there is left alone.

    Saving at a step that already has a committed checkpoint never overwrites
    it, and a step below `latest_step()` is not saved: `save` logs and
    returns False.
    """

    def __init__(self, directory, *, keep: Optional[int] = 3, read_only: bool = False):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if not read_only:  # where saves happen, not at import: importing this module changes nothing
            checkpoint_format.whole_shard_array_writes()
        directory = epath.Path(directory)
        if "://" not in str(directory):
            directory = directory.expanduser().resolve()
        self.directory = directory
        self.keep = keep
        self._name_format = checkpoint_format.CommittedStepNameFormat()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            # Delete `<step>.orbax-checkpoint-tmp*` dirs left by a crashed save.
            cleanup_tmp_directories=not read_only,
            step_name_format=self._name_format,
            create=not read_only,
            read_only=read_only,
        )
        self._mngr = ocp.CheckpointManager(directory, options=options)
        self._read_only = read_only
        self._closed = False

    def latest_step(self) -> Optional[int]:
        """The newest committed step, or None if there is none (read when the Checkpointer is
        opened and updated by its own saves)."""
        return self._mngr.latest_step()

    def item_names(self, step: int) -> list[str]:
        """The names of the items saved at `step` (params, opt_state, ...), sorted."""
        step_dir = self.directory / self._name_format.build_name(int(step))
        return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and p.name != EXTRA_ITEM)

    def item_shapes(self, step: int, name: str) -> Any:
        """The saved tree of item `name` at `step` as jax.ShapeDtypeStructs (no shardings): a target
        that restores it whole onto the default device, whatever model wrote it."""
        tree = _saved_tree(self.directory / self._name_format.build_name(int(step)), name)
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree)

    def save(self, step: int, items: dict[str, Any], extra: Optional[dict] = None) -> bool:
        """Saves each entry of `items` (name -> pytree of arrays) as its own item, and `extra`
        (a JSON dict), at `step`. Returns True if a checkpoint was written, False if skipped
        (the step exists or is not newer than the latest). Raises TypeError for a non-JSON
        `extra` before anything is written."""
        self._check_open()
        step = int(step)
        if EXTRA_ITEM in items:
            raise ValueError(f"the item name {EXTRA_ITEM!r} is reserved for `extra`; rename that item")
        extra = checkpoint_format.normalise_extra(extra)
        if CHECKSUM_KEY in extra:
            raise ValueError(f"the extra key {CHECKSUM_KEY!r} is reserved for the checksums; rename it")
        if step in self._mngr.all_steps():
            logging.info("checkpoint for step %d already exists in %s; not saving", step, self.directory)
            return False
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        digests = {name: checkpoint_format.leaf_digests(tree) for name, tree in items.items()}
        extra[CHECKSUM_KEY] = {name: d for name, d in digests.items() if d is not None}
        return bool(self._mngr.save(step, args=ocp.args.Composite(**args, **{EXTRA_ITEM: ocp.args.JsonSave(extra)})))

    def restore(self, step: Optional[int] = None, target: Optional[dict[str, Any]] = None) -> tuple[dict, dict]:
        """Restores `(items, extra)` from `step` (default: the latest).

        Args:
          step: step to restore; None for `latest_step()`.
          target: item name -> pytree whose leaves are `jax.ShapeDtypeStruct`
            (e.g. from `jax.eval_shape`, with or without `sharding=`), jax
            or numpy arrays: only these items are read. The result has the
            target's pytree structure (optax namedtuples included), dtypes
            (arrays are cast if they differ from the saved ones) and shardings;
            a leaf without a sharding gets the one it was saved with. An item
            whose target is None, or every item when `target` is None, is
            rebuilt from its metadata (dicts and lists, saved shardings).

        Raises:
          FileNotFoundError: no (complete) checkpoint in the directory, or none
            at `step`.
          ValueError: a target's parameter paths or shapes differ from the saved
            ones (the message names the path and both shapes).
        """
        self._check_open()
        steps = self._mngr.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No complete checkpoint found in {self.directory}")
            step = max(steps)
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory} (available steps: {sorted(steps)})")
        step_dir = self.directory / self._name_format.build_name(step)
        if target is None:
            target = {path.name: None for path in step_dir.iterdir()
                      if path.is_dir() and path.name != EXTRA_ITEM}
        args = {}
        for name, tree in target.items():
            if not (step_dir / name).exists():
                held = sorted(p.name for p in step_dir.iterdir())
                raise ValueError(f"{step_dir} has no item {name!r}; it holds {held}")
            if tree is None:
                args[name] = ocp.args.StandardRestore()
            else:
                self._check_shapes(step_dir, name, tree)
                args[name] = ocp.args.StandardRestore(checkpoint_format.abstract_target(tree))
        if (step_dir / EXTRA_ITEM).exists():
            args[EXTRA_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:
            if "Topology mismatch" in str(error):  # whole files, another device count: not corrupt, never set aside
                raise ValueError(f"checkpoint step {step} in {self.directory} was saved on another device topology "
                                 f"than this process's {jax.device_count()} {jax.default_backend()} device(s); run "
                                 "with the device count it was saved on (on CPU: XLA_FLAGS="
                                 "--xla_force_host_platform_device_count=N)") from error
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: "
                                         f"{type(error).__name__}: {str(error)[:300]}") from error
        extra = dict(restored[EXTRA_ITEM] or {}) if EXTRA_ITEM in args else {}
        digests = extra.pop(CHECKSUM_KEY, {})
        for name in target:
            self._verify(step, name, restored[name], digests.get(name))
        return {name: restored[name] for name in target}, extra

    def _verify(self, step: int, name: str, tree: Any, saved: Optional[dict]) -> None:
        if not saved:  # written before checksums, or by several hosts
            return
        for path, (dtype, digest) in (checkpoint_format.leaf_digests(tree) or {}).items():
            if path in saved and saved[path][0] == dtype and saved[path][1] != digest:
                raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory}: {name}/{path} differs "
                                             "from the checksum written with it (the files were changed or damaged)")

    def restore_latest(self, target: dict[str, Any]) -> tuple[dict, dict, Optional[int]]:
        """`(items, extra, step)` of the newest step that reads back whole (`restore`'s arguments);
        `({}, {}, None)` when there is no checkpoint. A corrupt newer step is logged with a warning
        that names it and, unless read-only, moved into `corrupt/`. Raises CorruptCheckpointError
        when every step is corrupt."""
        bad = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                items, extra = self.restore(step, target)
            except CorruptCheckpointError as error:
                bad.append(step)
                logging.warning("%s; trying the previous checkpoint", error)
                self._set_aside(step)
                continue
            if bad:
                logging.warning("resuming from step %d in %s: the newer step(s) %s are corrupt%s", step,
                                self.directory, bad, "" if self._read_only else f" (moved into {CORRUPT_DIR}/)")
            return items, extra, step
        if bad:
            raise CorruptCheckpointError(f"every checkpoint in {self.directory} is corrupt (steps {bad}; see the "
                                         "warnings above); restore the directory from a copy, or delete it to "
                                         "start this run afresh")
        return {}, {}, None

    def _set_aside(self, step: int) -> None:
        """Moves a corrupt step out of the way, so the run can write that step again."""
        if self._read_only:
            return
        corrupt = self.directory / CORRUPT_DIR
        corrupt.mkdir(parents=True, exist_ok=True)
        step_dir = self.directory / self._name_format.build_name(step)
        step_dir.rename(corrupt / f"{step_dir.name}.{len(list(corrupt.iterdir()))}")
        self._mngr.reload()

    def restore_params(self, step: Optional[int] = None, target: Any = None) -> Any:
        """The `params` item alone (no optimizer state is read); `target` as in `restore`."""
        items, _ = self.restore(step, target={"params": target})
        return items["params"]

    def _check_shapes(self, step_dir, name: str, target: Any) -> None:
        saved = checkpoint_format.shapes(_saved_tree(step_dir, name))
        wanted = checkpoint_format.shapes(target)
        fix = "the run that wrote it has another model: use its config (or, to resume, a new --workdir)"
        for path, shape in wanted.items():
            if path not in saved:
                raise ValueError(f"{step_dir}/{name} has no {path} (shape {shape} in this model); it holds "
                                 f"{sorted(saved)[:8]}...; {fix}")
            if saved[path] != shape:
                raise ValueError(f"{step_dir}/{name}: {path} has shape {saved[path]} there but {shape} in this "
                                 f"model; {fix}")
        extra = sorted(set(saved) - set(wanted))
        if extra:
            raise ValueError(f"{step_dir}/{name} holds {extra[:8]}, which this model does not have; {fix}")

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads. Idempotent."""
        if not self._closed:
            self._mngr.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer({str(self.directory)!r}) is closed")


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory of a run: `path/checkpoints` when path is a workdir, else path."""
    nested = os.path.join(path, CHECKPOINT_DIR)
    return nested if os.path.isdir(nested) else path


@contextlib.contextmanager
def _other_run(path: str, step: Optional[int]):
    """(read-only Checkpointer, step) of another run: path is its workdir or checkpoint directory,
    step defaults to its latest. FileNotFoundError names what is missing."""
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):  # else the Checkpointer would fail on a missing directory
        raise FileNotFoundError(f"{path} is not a directory; give the workdir of a run or its checkpoints/")
    with Checkpointer(directory, keep=None, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint; train that run further first")
        yield ckpt, step


def load_params(path: str, target: Any = None, step: Optional[int] = None) -> tuple[Any, int]:
    """(params, step) of another run, read-only: path is its workdir or checkpoint directory, step
    defaults to its latest. FileNotFoundError names what is missing; ValueError (from
    `restore`) names a parameter whose shape differs from `target`'s. target "saved": the saved
    tree whole, on the default device, whatever model it belongs to (e.g. a dense run to upcycle)."""
    with _other_run(path, step) as (ckpt, step):
        if isinstance(target, str) and target == "saved":
            target = ckpt.item_shapes(step, "params")
        return ckpt.restore_params(step, target), step


def saved_params_shapes(path: str, step: Optional[int] = None) -> Any:
    """The parameter tree of another run's step (default: its latest) as jax.ShapeDtypeStructs,
    read from the metadata alone (nothing else is loaded): which model it is."""
    with _other_run(path, step) as (ckpt, step):
        return ckpt.item_shapes(step, "params")


def load_router_state(path: str, step: Optional[int] = None) -> dict:
    """The routers' selection biases (aux-loss-free balancing) saved with another run's step (default:
    its latest), read-only; {} when that run has none."""
    with _other_run(path, step) as (ckpt, step):
        if "router_state" not in ckpt.item_names(step):
            return {}
        items, _ = ckpt.restore(step, target={"router_state": None})
        return items["router_state"]
