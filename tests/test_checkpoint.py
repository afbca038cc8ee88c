"""Tests for moe_jax.checkpoint (Orbax CheckpointManager wrapper): items restored together or alone."""
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.checkpoint import COMMIT_MARKER, Checkpointer, CorruptCheckpointError, load_params
from conftest import binary_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed: int):
    """Train-state-like items: nested params and their optax adamw state (namedtuples)."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "embed": jax.random.normal(k[0], (16, 8), jnp.float32),
        "layers": [
            {"w": jax.random.normal(k[1], (8, 8), jnp.bfloat16), "b": jax.random.uniform(k[2], (8,)) + 0.5},
            {"w": jax.random.normal(k[3], (8, 8), jnp.bfloat16), "b": jax.random.uniform(k[0], (8,)) + 0.5},
        ],
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(k[1], p.shape, p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu/nu/count
    return {"params": params, "opt_state": opt_state}


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_round_trip_with_target_and_extra(tmp_path):
    state = make_state(1)
    extra = {"data_position": np.int64(1234), "rng": [7, 11], "loss": np.float32(2.5), "name": "run"}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, extra=extra)
        assert ckpt.latest_step() == 10
        restored, restored_extra = ckpt.restore(target=jax.eval_shape(lambda: state))
    assert_same_tree(restored, state)
    # optax namedtuples survive (ScaleByAdamState etc.)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert restored_extra == {"data_position": 1234, "rng": [7, 11], "loss": 2.5, "name": "run"}

    # A fresh Checkpointer on the same directory sees it; a target made of real
    # arrays works too; without a target the values are still right.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 10
        restored, _ = ckpt.restore(10, target=make_state(99))
        assert_same_tree(restored, state)
        untargeted, _ = ckpt.restore()
        np.testing.assert_array_equal(untargeted["params"]["embed"], state["params"]["embed"])


def test_keep_last_k(tmp_path):
    state = make_state(2)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        saved = {s: ckpt.save(s, state, extra={"s": s}) for s in (10, 20, 30, 35)}
        assert saved == {10: True, 20: True, 30: True, 35: True}
        assert ckpt.latest_step() == 35
        assert ckpt.restore(30)[1] == {"s": 30}
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["30", "35"]


def test_existing_step_is_skipped_not_overwritten(tmp_path):
    first, second = make_state(3), make_state(4)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, first, extra={"v": 1})
        assert ckpt.save(5, second, extra={"v": 2}) is False
        assert ckpt.save(3, second) is False  # older than latest
        restored, extra = ckpt.restore(5, target=jax.eval_shape(lambda: first))
    assert_same_tree(restored, first)
    assert extra == {"v": 1}


def test_restore_errors(tmp_path):
    directory = tmp_path / "empty"
    with Checkpointer(directory) as ckpt:
        with pytest.raises(FileNotFoundError, match=str(directory)):
            ckpt.restore()
        ckpt.save(1, make_state(5))
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(2)
        with pytest.raises(ValueError, match="reserved"):
            ckpt.save(3, {"extra": make_state(5)["params"]})


def test_bad_extra_fails_before_writing(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, make_state(6), extra={"obj": object()})
        assert ckpt.latest_step() is None
    assert not [p for p in os.listdir(tmp_path) if p.startswith("1")]


def test_restore_with_shardings(tmp_path):
    mesh = jax.make_mesh((8,), ("x",))
    sharded = NamedSharding(mesh, P("x"))
    w = jax.random.normal(jax.random.key(7), (16, 4))
    params = {"w": jax.device_put(w, sharded), "b": jax.random.normal(jax.random.key(8), (16,))}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"params": params})
        # Different sharding than saved (replicated), given explicitly.
        target = {
            "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, P())),
            "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
        }
        restored = ckpt.restore_params(target=target)
        assert restored["w"].sharding == target["w"].sharding
        assert restored["b"].sharding == target["b"].sharding
        np.testing.assert_array_equal(restored["w"], w)
        # A target of real arrays keeps their shardings.
        restored = ckpt.restore_params(target=params)
        assert restored["w"].sharding.is_equivalent_to(sharded, 2)
        np.testing.assert_array_equal(restored["w"], w)


def test_params_restore_alone(tmp_path):
    """Parameters are an item of their own: they restore without the optimizer state, even when
    that item is gone, and from the workdir of another run (read-only)."""
    state = make_state(12)
    params_shape = jax.eval_shape(lambda: state["params"])
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(4, state, extra={"data_step": 4})
    assert sorted(p for p in os.listdir(tmp_path / "checkpoints" / "4") if not p.startswith("_")) == sorted([
        COMMIT_MARKER, "extra", "opt_state", "params"])
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "opt_state")
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert_same_tree(ckpt.restore_params(4, target=params_shape), state["params"])
        items, extra = ckpt.restore(target={"params": params_shape})
        assert list(items) == ["params"] and extra == {"data_step": 4}
        with pytest.raises(ValueError, match="no item 'opt_state'"):
            ckpt.restore(4, target={"opt_state": None})
    params, step = load_params(str(tmp_path), target=params_shape)  # the workdir holding checkpoints/
    assert step == 4
    assert_same_tree(params, state["params"])
    with pytest.raises(FileNotFoundError, match="no/such/run is not a directory"):
        load_params(str(tmp_path / "no" / "such" / "run"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        load_params(str(tmp_path / "empty"))


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    state = make_state(13)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        wider = jax.eval_shape(lambda: state["params"])
        wider["layers"][1]["w"] = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)
        with pytest.raises(ValueError, match=r"layers/1/w has shape \(8, 8\) there but \(8, 16\) in this model"):
            ckpt.restore_params(target=wider)
        extra_param = {**jax.eval_shape(lambda: state["params"]), "head": jax.ShapeDtypeStruct((8,), jnp.float32)}
        with pytest.raises(ValueError, match=r"has no head \(shape \(8,\) in this model\)"):
            ckpt.restore_params(target=extra_param)
        fewer = {"embed": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
        with pytest.raises(ValueError, match="layers/0/b"):
            ckpt.restore_params(target=fewer)


def test_half_written_checkpoints_are_ignored(tmp_path):
    """Leftover tmp dirs and step dirs without the commit marker are never used."""
    state = make_state(11)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(10, state, extra={"s": 10})
        ckpt.save(20, state, extra={"s": 20})
    # What a crash leaves behind, with higher step numbers than the last good
    # checkpoint: Orbax's tmp dirs (current and older naming) and a final-named
    # step dir whose commit marker is missing (e.g. an interrupted copy).
    for name in ("30.orbax-checkpoint-tmp", "40.orbax-checkpoint-tmp-1712345678"):
        os.makedirs(tmp_path / name / "params")
        (tmp_path / name / "params" / "garbage").write_bytes(os.urandom(64))
    partial = tmp_path / "50"
    os.makedirs(partial / "params")
    (partial / "_CHECKPOINT_METADATA").write_text("{}")
    (partial / "params" / "garbage").write_bytes(os.urandom(64))

    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == 20
        restored, extra = ckpt.restore(target=jax.eval_shape(lambda: state))
        assert extra == {"s": 20}
        assert_same_tree(restored, state)
        with pytest.raises(FileNotFoundError):
            ckpt.restore(50)
        # Resuming and saving again: tmp dirs are cleaned up, the partial step
        # is replaced by a real one, keep=2 counts only committed steps.
        assert ckpt.save(30, state, extra={"s": 30})
        assert ckpt.save(50, state, extra={"s": 50})
        assert ckpt.latest_step() == 50
        assert ckpt.restore(50)[1] == {"s": 50}
    assert sorted(os.listdir(tmp_path)) == ["30", "50"]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from orbax.checkpoint.path import atomicity
    from moe_jax.checkpoint import Checkpointer

    directory = sys.argv[1]
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((64, 32)).astype(np.float32), "n": np.int32(7)}
    ckpt = Checkpointer(directory)
    ckpt.save(10, {"state": state}, extra={"s": 10})

    # Die right before step 20 is committed: all data is written to the tmp
    # dir, only the final rename of the step directory is missing.
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def crash(self):
        if self.get_final().name == "20":
            os._exit(17)
        return await original(self)
    atomicity.AtomicRenameTemporaryPath.finalize = crash
    state["w"] = state["w"] + 1.0
    ckpt.save(20, {"state": state}, extra={"s": 20})
    os._exit(0)  # not reached
    """
)


def test_crash_during_save_subprocess(tmp_path):
    env = dict(binary_env(), PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("20")]
    assert leftovers and all(".orbax-checkpoint-tmp" in p for p in leftovers), os.listdir(tmp_path)

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 10
        target = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "n": np.int32(0)}
        items, extra = ckpt.restore(target={"state": target})
    restored = items["state"]
    assert extra == {"s": 10}
    expected = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
    assert int(restored["n"]) == 7


def _damage(step_dir, how: str) -> None:
    """Damages a committed step's params files: one flipped byte in the largest array chunk (read back
    silently as a wrong value without a checksum), every file truncated to half, or zeroed."""
    files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "flip":
        data = bytearray(files[-1].read_bytes())
        data[len(data) // 2] ^= 0xFF
        files[-1].write_bytes(bytes(data))
    for path in files if how != "flip" else []:
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: size // 2] if how == "truncate" else b"\0" * size)


@pytest.mark.parametrize("how", ["flip", "truncate", "zero"])
def test_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, how, caplog):
    rng = np.random.default_rng(0)
    old = {"params": {"w": rng.standard_normal((128, 64)).astype(np.float32)}}
    new = {"params": {"w": old["params"]["w"] + 1.0}}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(10, old, extra={"s": 10})
        ckpt.save(20, new, extra={"s": 20})
    _damage(tmp_path / "20", how)
    target = {"params": {"w": jax.ShapeDtypeStruct((128, 64), jnp.float32)}}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        with pytest.raises(ValueError, match="step 20|20/params"):  # CorruptCheckpointError
            ckpt.restore(20, target)
        with caplog.at_level("WARNING"):
            items, extra, step = ckpt.restore_latest(target)
        assert step == 10 and extra == {"s": 10}
        np.testing.assert_array_equal(np.asarray(items["params"]["w"]), old["params"]["w"])
        assert any("20" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
        assert ckpt.latest_step() == 10  # set aside: the run can write step 20 again
        assert ckpt.save(20, new, extra={"s": 20})
        np.testing.assert_array_equal(np.asarray(ckpt.restore(20, target)[0]["params"]["w"]), new["params"]["w"])
    assert os.listdir(tmp_path / "corrupt") == ["20.0"]


def test_every_step_damaged_is_a_clear_error(tmp_path):
    state = {"params": {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    _damage(tmp_path / "1", "flip")
    _damage(tmp_path / "2", "zero")
    with Checkpointer(tmp_path, keep=3) as ckpt:
        with pytest.raises(CorruptCheckpointError, match=r"every checkpoint in .* is corrupt \(steps \[2, 1\]"):
            ckpt.restore_latest({"params": jax.eval_shape(lambda: state["params"])})
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.restore_latest({"params": None}) == ({}, {}, None)


def test_saving_replicated_arrays_on_many_devices_compiles_nothing(tmp_path):
    """Each replica's shard is written whole: off GPU orbax's default (replica-parallel saving)
    slices every replicated array between its 8 replicas, one eager XLA compile per replica,
    shape and slice, seconds per save of a small model."""
    mesh = jax.make_mesh((8,), ("d",))
    shapes = [(40, 11), (5, 24, 3), (56,), (7, 72)]  # divisible by 8 (replicas); saved by no other test
    tree = {f"a{i}": jax.device_put(jax.random.normal(jax.random.key(i), shape), NamedSharding(mesh, P()))
            for i, shape in enumerate(shapes)}
    tree["sharded"] = jax.device_put(jax.random.normal(jax.random.key(9), (8, 23)), NamedSharding(mesh, P("d")))
    jax.block_until_ready(tree)
    compiles = []  # fresh compiles, and programs the persistent compilation cache returns

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        with Checkpointer(tmp_path) as ckpt:
            assert ckpt.save(1, {"params": tree})
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    assert compiles == []
    with Checkpointer(tmp_path) as ckpt:
        restored, _ = ckpt.restore(target={"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)})
    assert_same_tree(restored["params"], tree)
    assert restored["params"]["sharded"].sharding.spec == P("d")


def test_prng_keys_restore_as_keys(tmp_path):
    """The array handler this module registers keeps orbax's array metadata (a key's PRNG impl)."""
    keys = {"key": jax.random.key(3), "split": jax.random.split(jax.random.key(4), 4)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, {"keys": keys})
        restored, _ = ckpt.restore(target={"keys": jax.eval_shape(lambda: keys)})
    for name, key in keys.items():
        assert jax.dtypes.issubdtype(restored["keys"][name].dtype, jax.dtypes.prng_key), name
        np.testing.assert_array_equal(jax.random.key_data(restored["keys"][name]), jax.random.key_data(key))


def test_importing_the_module_leaves_orbax_as_it_was():
    """The whole-shard array handler is registered where a writing Checkpointer is made, not at import."""
    import subprocess
    import sys

    code = ("import jax, orbax.checkpoint as ocp\n"
            "before = ocp.type_handlers.get_type_handler(jax.Array)\n"
            "import moe_jax.checkpoint\n"
            "assert ocp.type_handlers.get_type_handler(jax.Array) is before, 'import changed the handler'\n"
            "import tempfile\n"
            "moe_jax.checkpoint.Checkpointer(tempfile.mkdtemp()).close()\n"
            "after = ocp.type_handlers.get_type_handler(jax.Array)\n"
            "assert not getattr(after, '_use_replica_parallel', True), 'a writing Checkpointer registers it'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
