r"""Trains a GPT / MoE GPT; resumes from --workdir when it holds a checkpoint.

  python experiments/train.py --config=experiments/configs/pr_moe.py:tiny --workdir=/tmp/pr_moe \
      [--config.total_steps=200] [--config.moe.capacity_factor=2.0] [--config.data.path=my.txt]

Writes config.json, metrics.jsonl, tensorboard/, checkpoints/ and results.json into the workdir and
prints a short results table at the end.

Several processes (hosts): start one per host with the same flags plus
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Each process reads its share of
every batch; the mesh spans all processes' devices; Orbax saves and restores from every process.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import host_memory, xla_flags

host_memory.reuse_freed_memory()  # before jax starts its threads
xla_flags.add_gpu_overlap_flags()  # collectives overlapped with compute on GPU; before jax starts

from moe_jax import cli  # noqa: E402
from moe_jax import corpus as corpus_lib  # noqa: E402
from moe_jax import trainer  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (path.py:arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    cli.join_distributed()
    try:
        summary = trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (corpus_lib.DataError, ValueError, trainer.TrainingError, FileNotFoundError) as error:
        cli.fail(str(error))
    print(trainer.format_summary(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
