r"""The README's main job: trains the tiny PR-MoE and the tiny dense model for the same steps on the
Python standard library corpus, then prints a results table.

  python experiments/demo.py [--workdir=workdirs/demo] [--steps=300]

About 4 minutes on 2 CPU cores. Both runs resume from their workdirs if interrupted.
"""

import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()  # before jax starts its threads

from experiments.configs import load_config_file  # noqa: E402
from moe_jax import trainer  # noqa: E402

flags.DEFINE_string("workdir", "workdirs/demo", "Parent folder of the two runs.")
flags.DEFINE_integer("steps", 300, "Training steps of each model.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results = {}
    for name in ("pr_moe", "dense"):
        config = load_config_file(name)
        config.total_steps = flags.FLAGS.steps
        start = time.perf_counter()
        print(f"== training tiny {name} for {config.total_steps} steps", flush=True)
        summary = trainer.train_and_evaluate(config, os.path.join(flags.FLAGS.workdir, name),
                                             progress=lambda line: print(f"  {line}", flush=True))
        summary["wall_s"] = time.perf_counter() - start
        results[name] = summary
    print()
    print(f"corpus: {results['dense']['corpus']}")
    header = (f"{'model':<8} {'params total':>13} {'active':>10} {'val loss':>9} {'test loss':>10} {'test bpb':>9} "
              f"{'tokens/s':>9} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<8} {r['params_total']:>13,} {r['params_active']:>10,} {r['val_loss']:>9.4f} "
              f"{r['test_loss']:>10.4f} {r['test_bpb']:>9.4f} {r['tokens_per_sec']:>9.0f} {r['wall_s']:>7.1f}")
    gap = results["dense"]["test_bpb"] - results["pr_moe"]["test_bpb"]
    print(f"\nOn the whole test split PR-MoE is {gap:+.4f} bits per byte {'better' if gap > 0 else 'worse'} than "
          f"dense at equal steps and tokens ({flags.FLAGS.steps} steps; one seed: the ablation suite has the "
          "claims over seeds).")


if __name__ == "__main__":
    app.run(main)
