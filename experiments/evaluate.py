r"""Evaluates finished training runs on the whole test split (and validation), training nothing.

  python experiments/evaluate.py --workdir=DIR [--workdir=DIR2 ...]

Each DIR is a run folder (experiments/train.py's --workdir, or an ablation suite's run folder): its
config.json and last checkpoint are read, the test split is read whole once (every target once,
moe_jax.data.split_batches) and results.json is rewritten with test_loss, test bits, the
evaluation's cost and the corpus identity. A run that has not finished is refused.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli, trainer

flags.DEFINE_multi_string("workdir", None, "A finished run's folder (repeat the flag for several).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for workdir in flags.FLAGS.workdir:
        try:
            summary = trainer.evaluate_run(workdir)
        except (FileNotFoundError, ValueError) as error:
            cli.fail(str(error))
        print(f"{workdir}: test loss {summary['test_loss']:.4f} over {summary['test_tokens']:,} targets "
              f"({summary['test_eval_s']:.1f} s); validation loss {summary['val_loss']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
