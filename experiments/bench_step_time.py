r"""Training-step time of several configs measured in one process, alternating, on the same batch.

  python experiments/bench_step_time.py [top2 residual moe dense]

Each config (experiments/configs/<name>.py:tiny) is compiled first; then 6 rounds of 5 steps per
config, interleaved so that load from other jobs hits every config alike. Prints the median and
minimum ms per step.
"""

import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()  # before jax starts its threads (MOE_JAX_MALLOC=default: malloc's own policy)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import load_config_file  # noqa: E402
from moe_jax import run_config, train_lib  # noqa: E402


def main(names):
    runs = {}
    for name in names:
        config = load_config_file(name)
        model_cfg = run_config.model_config(config)
        optimizer = train_lib.make_optimizer(run_config.optim_config(config))
        state = train_lib.init_state(jax.random.key(0), model_cfg, optimizer)
        step = jax.jit(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer))
        shape = (config.data.batch_size, config.data.seq_len)
        rng = np.random.default_rng(0)
        batch = {"inputs": rng.integers(0, 256, shape).astype(np.int32),
                 "targets": rng.integers(0, 256, shape).astype(np.int32)}
        state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(metrics["loss"])
        runs[name] = [step, state, batch, []]
    for _ in range(6):
        for run in runs.values():
            step, state, batch, times = run
            start = time.perf_counter()
            for _ in range(5):
                state, metrics = step(state, batch, jax.random.key(1))
            jax.block_until_ready(metrics["loss"])
            times.append((time.perf_counter() - start) / 5)
            run[1] = state
    for name, (_, _, _, times) in runs.items():
        print(f"{name:12s} median {1e3 * np.median(times):7.1f} ms/step   min {1e3 * min(times):7.1f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1:] or ["top2", "residual", "moe", "dense"])
