r"""Mixture-of-Students: trains a student against a frozen teacher (staged KD); resumes from --workdir.

  python experiments/distill.py --config=experiments/configs/mos.py:tiny --teacher_workdir=workdirs/pr_moe \
      --workdir=workdirs/mos [--config.kd.schedule=constant] [--config.kd.stop_step=150]

--teacher_workdir is a finished run of experiments/train.py: its config.json gives the teacher's
model and its latest checkpoint the parameters (forward only, never updated). Writes what
experiments/train.py writes (metrics.jsonl also logs kd_loss and kd_on) plus teacher.json, and
prints the same results table. Several hosts: the flags of experiments/train.py
(--coordinator_address, --num_processes, --process_id); the teacher runs sharded like the student.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import host_memory

host_memory.reuse_freed_memory()  # before jax starts its threads

from moe_jax import cli  # noqa: E402
from moe_jax import corpus as corpus_lib  # noqa: E402
from moe_jax import distill  # noqa: E402
from moe_jax import trainer  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Student config file (path.py:arg) with a kd group.",
                                lock_config=True)
flags.DEFINE_string("teacher_workdir", None, "Workdir of the trained teacher (experiments/train.py).")
flags.DEFINE_string("workdir", None, "Where the student's checkpoints, metrics and results go.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "teacher_workdir", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    cli.join_distributed()
    try:
        summary = distill.distill_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.teacher_workdir)
    except (corpus_lib.DataError, ValueError, trainer.TrainingError, FileNotFoundError) as error:
        cli.fail(str(error))
    print(trainer.format_summary(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
