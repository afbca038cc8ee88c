r"""Counterfactual routing on a frozen checkpoint (moe_jax.counterfactual): a finished MoE run's test
loss under other routing, with one expert knocked out, or with its two most similar experts merged,
training nothing.

  python experiments/counterfactual.py --workdir=RUN [--max_batches=20] [--kinds=routing,knockout,merge] \
      [--out=DIR]

RUN is a finished run's folder (experiments/train.py's --workdir or an ablation suite's run folder).
--max_batches=0 reads the whole test split (the run's own final evaluation: about a minute per
intervention for a tiny run on 2 cores, 32 knockouts for a tiny MoE); 20 batches (10%) ranks the
experts in seconds each. Writes DIR/counterfactual.md and .json (DIR defaults to RUN).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli, counterfactual, metrics

flags.DEFINE_string("workdir", None, "A finished MoE run's folder.")
flags.DEFINE_integer("max_batches", 0, "Test batches to read (0: the whole test split).")
flags.DEFINE_list("kinds", ["routing", "knockout", "merge"], "Interventions: routing, knockout, merge.")
flags.DEFINE_string("out", None, "Folder for counterfactual.md / .json (default: --workdir).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    unknown = set(f.kinds) - {"routing", "knockout", "merge"}
    if unknown:
        cli.fail(f"--kinds={','.join(f.kinds)}: {sorted(unknown)} unknown; use routing, knockout, merge")
    try:
        run = counterfactual.load_run(f.workdir, f.max_batches)
    except (FileNotFoundError, ValueError) as error:
        cli.fail(str(error))
    rows = counterfactual.run_interventions(run, f.kinds, log=lambda line: print(line, flush=True))
    label = f"{f.workdir} (step {run.step}, {len(run.batches)} test batches)"
    text = counterfactual.markdown(rows, label)
    out = f.out or f.workdir
    os.makedirs(out, exist_ok=True)
    metrics.atomic_write_text(os.path.join(out, "counterfactual.md"), text)
    metrics.atomic_write_text(os.path.join(out, "counterfactual.json"), json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
