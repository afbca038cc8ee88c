r"""Generates text from a trained checkpoint with the KV-cache serving path (moe_jax.inference).

  python experiments/generate.py --workdir=workdirs/moe --prompt="def main(" [--max_new_tokens=N] \
      [--temperature=0.8] [--top_p=0.95] [--seed=0] [--dtype=bfloat16] [--moe_path=serve] [--step=N]

Reads the run's workdir/config.json and its latest checkpoint (or --step) from workdir/checkpoints,
both written by experiments/train.py, and prints the prompt with its continuation and the speed.
Byte-level tokens: the prompt is UTF-8 bytes. Temperature 0 is greedy decoding. Prompt and new
tokens share the model's max_seq_len: by default it generates as many tokens as fit, and a larger
--max_new_tokens is clipped to that, with a note on stderr.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import cli
from moe_jax import dispatch
from moe_jax import inference
from moe_jax import model as model_lib
from moe_jax import run_config
from moe_jax.corpus import ByteTokenizer

flags.DEFINE_string("workdir", None, "A training run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_string("prompt", None, "Text to continue.")
flags.DEFINE_integer("max_new_tokens", None, "Tokens (bytes) to generate; default and at most what fits after "
                     "the prompt in the model's max_seq_len.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 keeps every token.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "float32", list(inference.DTYPES), "Parameter and compute dtype.")
flags.DEFINE_enum("moe_path", "serve", list(dispatch.PATHS), "MoE dispatch path at inference.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
flags.mark_flags_as_required(["workdir", "prompt"])


def load_run(workdir: str, step=None):
    """(ModelConfig, params, step) of a training run. FileNotFoundError names what is missing."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir} does not exist; pass the --workdir of a run of "
                                "experiments/train.py")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing; --workdir must be a run of experiments/train.py, "
                                "which writes config.json there")
    with open(config_path) as f:
        saved = json.load(f)
    config = ml_collections.ConfigDict(saved["config"])
    # The trainer widens the vocabulary to the corpus's; the saved model entry has the final size.
    model_cfg = run_config.model_config(config, vocab_size=saved["model"]["vocab_size"])
    checkpoint_dir = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir} does not exist: the run saved no checkpoint yet; train it "
                                "past config.checkpoint_every_steps (or to the end) first")
    target = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), model_cfg))
    params, step = checkpoint_lib.load_params(checkpoint_dir, target, step)  # parameters only
    # with aux-loss-free balancing the routers choose experts with the trained selection biases
    router_state = checkpoint_lib.load_router_state(checkpoint_dir, step)
    return model_cfg, params, step, router_state


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
    f = flags.FLAGS
    if not f.prompt:
        cli.fail("--prompt is empty; pass some text to continue, e.g. --prompt='def main('")
    try:
        model_cfg, params, step, router_state = load_run(f.workdir, f.step)
    except (FileNotFoundError, ValueError) as error:
        cli.fail(str(error))
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(f.prompt).tolist()
    room = model_cfg.max_seq_len - len(prompt)  # prompt and new tokens share max_seq_len
    max_new_tokens = max(room, 1) if f.max_new_tokens is None else f.max_new_tokens
    if max_new_tokens > room > 0:
        print(f"--max_new_tokens={max_new_tokens} does not fit after the {len(prompt)}-token prompt in "
              f"max_seq_len={model_cfg.max_seq_len}; generating {room}", file=sys.stderr)
        max_new_tokens = room
    try:
        generator = inference.Generator(params, model_cfg, dtype=f.dtype, moe_path=f.moe_path,
                                        router_state=router_state)
    except ValueError as error:  # a model that cannot be served, e.g. one with a non-causal router
        cli.fail(f"--workdir={f.workdir}: {error}")
    try:
        result = generator.generate([prompt], max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                                    seed=f.seed)
    except ValueError as error:
        cli.fail(f"--prompt / --max_new_tokens: {error}")
    print(f.prompt + tokenizer.decode(result.tokens[0]))
    decode_steps = max(max_new_tokens - 1, 1)
    print(f"\n[step {step}, {model_cfg.layer_experts()} experts per layer, {f.dtype}, moe_path={f.moe_path}] "
          f"{max_new_tokens} tokens at {result.tokens_per_s:.1f} tokens/s (prefill of {len(prompt)} tokens "
          f"{result.prefill_s * 1e3:.1f} ms, decode {result.decode_s * 1e3 / decode_steps:.2f} ms/token; "
          f"compiled in {result.compile_s:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
