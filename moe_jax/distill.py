"""Mixture-of-Students (MoS): distil a frozen PR-MoE teacher into a shallower PR-MoE student.

The student trains on `CE + aux_loss_coef * sum(l_aux) + w(step) * beta * T^2 * KL(p_t || p_s)`,
where p_t = softmax(z_t / T) and p_s = softmax(z_s / T) are the teacher's and the student's
next-token distributions, the KL is averaged over the (masked) tokens like the LM loss, and w(step)
is the KD schedule (`kd.schedule`, with the 0-based count of completed optimizer steps):
  * "constant":    w = 1 throughout (kd.stop_step is not read);
  * "staged":      w = 1 while step < kd.stop_step, then 0: the paper's staged KD (KD for the
                   first ~70% of the run, LM loss only afterwards), so exactly kd.stop_step steps
                   see the teacher;
  * "linear_fade": w = max(0, 1 - step / kd.stop_step): the teacher's weight falls linearly from
                   1 at the first step to 0 at kd.stop_step.
The teacher runs forward only, in eval mode (train=False: eval capacity, no gate noise), under
stop_gradient; its parameters reach the jitted train step as `hook_inputs`, an argument, so they
are never baked into the compiled program as constants. The schedule is computed from the traced
step, so crossing kd.stop_step recompiles nothing; once w = 0 a `lax.cond` skips the teacher's
forward pass altogether.

Student: the teacher's architecture with fewer layers (24 -> 21 in the paper). `student_config`
shortens a pyramid expert list by dropping entries of the lowest expert count (the early layers)
and keeps the last, large-expert layers: "32x10,64x2" at 24 layers -> "32x8,64x2" at 21. The paper
initialises the student at random; `init_from_teacher` instead copies chosen teacher layers.

Public API:
  KDConfig(beta, temperature, schedule, stop_step); kd_config(config) -> KDConfig
  kd_loss(student_logits, teacher_logits, *, temperature, mask=None) -> T^2 * masked mean KL
  kd_weight(step, kd) -> w(step), float32 scalar in [0, 1]
  make_kd_hook(teacher_cfg, kd) -> train_lib.LossHook
  student_config(teacher_cfg, num_layers) -> ModelConfig
  parse_layer_list(text) -> tuple of 0-based layer indices
  init_from_teacher(teacher_params, student_cfg, teacher_layers) -> student params
  load_teacher_config(teacher_workdir) -> ModelConfig; teacher_checkpoint_step(teacher_workdir) -> step
  restore_teacher_params(teacher_workdir, teacher_cfg, step) -> teacher params
  distill_and_evaluate(config, workdir, teacher_workdir) -> summary (trainer.train_and_evaluate's)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config as config_lib
from moe_jax import corpus as corpus_lib
from moe_jax import model as model_lib
from moe_jax import parallel as parallel_lib
from moe_jax import run_config
from moe_jax import train_lib
from moe_jax import trainer
from moe_jax.config import ModelConfig

KD_SCHEDULES = ("constant", "staged", "linear_fade")
KD_FIELDS = ("beta", "temperature", "schedule", "stop_step", "init_from_teacher_layers")  # a config's kd group
TEACHER_RECORD = "teacher.json"  # written into the student's workdir: which teacher it learned from


# ----------------------------------------------------------------------------------------------
# KD loss and schedule
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Distillation settings (the paper's scripts: beta = 1, T = 1, staged at ~70% of the run)."""

    beta: float = 1.0
    temperature: float = 1.0
    schedule: str = "staged"
    stop_step: int = 0  # "staged" / "linear_fade": KD weight reaches 0 here

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"kd.beta={self.beta} must be >= 0 (the paper uses 1.0)")
        if not self.temperature > 0:
            raise ValueError(f"kd.temperature={self.temperature} must be > 0 (the paper uses 1.0)")
        if self.schedule not in KD_SCHEDULES:
            raise ValueError(f"kd.schedule={self.schedule!r} is unknown; use one of {KD_SCHEDULES}")
        if self.schedule != "constant" and self.stop_step < 1:
            raise ValueError(
                f"kd.stop_step={self.stop_step} must be >= 1 with kd.schedule={self.schedule!r}; set it to "
                "about 70% of total_steps, or use kd.schedule='constant' for KD throughout")


def kd_config(config: ml_collections.ConfigDict) -> KDConfig:
    """The validated KDConfig of a run config's `kd` group."""
    missing = [name for name in KD_FIELDS if "kd" not in config or name not in config.kd]
    if missing:
        raise ValueError(f"the config lacks kd.{', kd.'.join(missing)}; a distillation config has a kd group with "
                         f"{', '.join(KD_FIELDS)} (start from experiments/configs/mos.py)")
    kd = config.kd
    return KDConfig(beta=float(kd.beta), temperature=float(kd.temperature), schedule=kd.schedule,
                    stop_step=int(kd.stop_step))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0,
            mask: Optional[jax.Array] = None) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the tokens where mask != 0.

    student_logits, teacher_logits: [B, T, V]; mask: [B, T] or None (all tokens). Float32 scalar.
    The T^2 factor keeps the gradient's scale independent of T (Hinton et al. 2015).
    """
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)  # [B, T]
    if mask is None:
        mean_kl = jnp.mean(kl)
    else:
        mask = mask.astype(jnp.float32)
        mean_kl = jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return temperature ** 2 * mean_kl


def kd_weight(step: jax.Array, kd: KDConfig) -> jax.Array:
    """w(step) of the module docstring; step is the traced 0-based optimizer step. Float32 scalar."""
    step = jnp.asarray(step, jnp.float32)
    if kd.schedule == "constant":
        return jnp.ones((), jnp.float32)
    if kd.schedule == "staged":
        return jnp.where(step < kd.stop_step, 1.0, 0.0).astype(jnp.float32)
    return jnp.clip(1.0 - step / kd.stop_step, 0.0, 1.0)


def _check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the student's vocab_size={student_vocab} differs from the teacher's ({teacher_vocab}); KD compares "
            f"distributions over the same tokens, so set --config.model.vocab_size={teacher_vocab} and train "
            "on the teacher's data")


def make_kd_hook(teacher_cfg: ModelConfig, kd: KDConfig,
                 parallel: Optional[parallel_lib.ParallelConfig] = None) -> train_lib.LossHook:
    """The KD term as a train_lib.LossHook: hook(logits, batch, step, teacher_params) ->
    (w(step) * kd_loss_value, {"kd_loss": beta * T^2 * KL (0 while w = 0), "kd_on": w(step)}).

    logits: the student's [B, T, V]; batch: {"inputs" [B, T], "targets", optional "mask" [B, T]}.
    On a mesh (`parallel`, the student's) the teacher's forward pass is sharded like the student's:
    its MoE layers run the expert-parallel exchange and its parameters are placed by the same
    partition rules (the trainer places hook inputs with parallel.param_specs).
    """

    def hook(logits, batch, step, teacher_params):
        _check_vocab(logits.shape[-1], teacher_cfg.vocab_size)
        if step is None:
            raise ValueError("the KD hook needs the optimizer step; call it through train_lib.train_step")
        weight = kd_weight(step, kd)

        def distill():
            teacher_logits, _ = model_lib.apply(jax.lax.stop_gradient(teacher_params), batch["inputs"],
                                                teacher_cfg, train=False, parallel=parallel)
            return kd.beta * kd_loss(logits, jax.lax.stop_gradient(teacher_logits), temperature=kd.temperature,
                                     mask=batch.get("mask"))

        # cond, not where: after the KD stage the teacher's forward pass is skipped, not masked.
        full = jax.lax.cond(weight > 0, distill, lambda: jnp.zeros((), jnp.float32))
        return weight * full, {"kd_loss": full, "kd_on": weight}

    return hook


# ----------------------------------------------------------------------------------------------
# The student
# ----------------------------------------------------------------------------------------------

def student_config(teacher_cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """The teacher's architecture at num_layers (<= the teacher's). A pyramid expert list loses the
    entries of its lowest expert count, earliest first, so the last large-expert layers stay:
    24 layers "32x10,64x2" -> 21 layers "32x8,64x2"."""
    if not 1 <= num_layers <= teacher_cfg.num_layers:
        raise ValueError(f"student num_layers={num_layers} must be in [1, {teacher_cfg.num_layers}] "
                         "(the teacher's depth); a student is shallower than its teacher")
    moe = teacher_cfg.moe
    if moe is None or isinstance(moe.experts, int):
        return teacher_cfg.replace(num_layers=num_layers)
    if moe.placement == "explicit":
        raise ValueError("student_config cannot move explicit moe.layers; build the student's ModelConfig "
                         "with its own moe.layers and expert list")
    experts = moe.experts
    probe = teacher_cfg.replace(num_layers=num_layers, moe=dataclasses.replace(moe, experts=max(experts)))
    num_drop = len(experts) - len(probe.moe_layer_indices())
    dropped = set(sorted(range(len(experts)), key=lambda i: (experts[i], i))[:num_drop])
    kept = tuple(count for i, count in enumerate(experts) if i not in dropped)
    return teacher_cfg.replace(num_layers=num_layers, moe=dataclasses.replace(moe, experts=kept))


def parse_layer_list(text: str) -> tuple[int, ...]:
    """"0,1,2,3,4,7,6" -> (0, 1, 2, 3, 4, 7, 6); "" -> () (random init)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"kd.init_from_teacher_layers={text!r} must list 0-based teacher layer indices, one "
                         "per student layer, like '0,1,2,3,4,7,6'; '' initialises the student at random") from None


def init_from_teacher(teacher_params: dict, student_cfg: ModelConfig, teacher_layers: Sequence[int]) -> dict:
    """Student parameters copied from the teacher: student block i <- teacher block teacher_layers[i];
    embeddings and the final LayerNorm come from the teacher too. Each pair of blocks must have the
    same shapes (dense <-> dense, MoE <-> MoE with as many experts). Returns fresh arrays (never the
    teacher's buffers, which the trainer would otherwise donate)."""
    target = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), student_cfg))
    if len(teacher_layers) != student_cfg.num_layers:
        raise ValueError(f"init_from_teacher_layers lists {len(teacher_layers)} layers for a student of "
                         f"{student_cfg.num_layers}; give one teacher layer index per student layer")
    teacher_blocks = sum(name.startswith("block_") for name in teacher_params)
    params = {}
    for name in target:
        source = name
        if name.startswith("block_"):
            student_layer = int(name.removeprefix("block_"))
            teacher_layer = teacher_layers[student_layer]
            if not 0 <= teacher_layer < teacher_blocks:
                raise ValueError(f"init_from_teacher_layers names teacher layer {teacher_layer}; the teacher has "
                                 f"layers 0..{teacher_blocks - 1}")
            source = f"block_{teacher_layer}"
        want = jax.tree.map(lambda x: (x.shape, x.dtype), target[name])
        got = jax.tree.map(lambda x: (x.shape, x.dtype), teacher_params[source])
        if want != got:
            raise ValueError(
                f"student {name} cannot take teacher {source}: their shapes differ (student layer experts "
                f"{student_cfg.layer_experts()}); pair dense with dense layers and MoE layers with equal "
                "expert counts, and keep hidden sizes, max_seq_len and dtypes equal")
        params[name] = jax.tree.map(lambda x: jnp.array(x, copy=True), teacher_params[source])
    return params


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------

def _train_teacher_hint(teacher_workdir: str) -> str:
    return f"e.g. experiments/train.py --config=experiments/configs/pr_moe.py:tiny --workdir={teacher_workdir}"


def _read_teacher_record(teacher_workdir: str) -> dict:
    path = os.path.join(teacher_workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher_workdir={teacher_workdir} has no config.json; train the teacher "
                                f"first: {_train_teacher_hint(teacher_workdir)}")
    with open(path) as f:
        record = json.load(f)
    if "model" not in record or "config" not in record:
        raise ValueError(f"{path} has no 'model' or 'config' entry; it was not written by moe_jax.trainer")
    return record


def load_teacher_config(teacher_workdir: str) -> ModelConfig:
    """The teacher's ModelConfig, rebuilt from the config.json that the trainer wrote (with the
    vocab size the trainer settled on after reading the corpus)."""
    model = dict(_read_teacher_record(teacher_workdir)["model"])
    moe = model.pop("moe")
    try:
        return ModelConfig(**model, moe=config_lib.MoEConfig(**moe) if moe else None)
    except TypeError as error:
        raise ValueError(f"{teacher_workdir}/config.json describes a model this version cannot build "
                         f"({error}); retrain the teacher with this version") from None


def teacher_checkpoint_step(teacher_workdir: str) -> int:
    """The step of the teacher's latest complete checkpoint; FileNotFoundError if there is none.
    Read-only: a teacher that is still training is left alone."""
    directory = os.path.join(teacher_workdir, checkpoint_lib.CHECKPOINT_DIR)
    step = None
    if os.path.isdir(directory):  # else Checkpointer would create it
        with checkpoint_lib.Checkpointer(directory, keep=None, read_only=True) as ckpt:
            step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"--teacher_workdir={teacher_workdir} has no complete checkpoint in {directory}; "
                                f"train the teacher first: {_train_teacher_hint(teacher_workdir)}")
    return step


def restore_teacher_params(teacher_workdir: str, teacher_cfg: ModelConfig, step: int) -> dict:
    """The teacher's parameters at `step` (its optimizer state is not read)."""
    target = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), teacher_cfg))
    params, _ = checkpoint_lib.load_params(teacher_workdir, target, step)
    return params


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str, teacher_workdir: str) -> dict:
    """Trains the student of `config` against the frozen teacher in teacher_workdir with
    trainer.train_and_evaluate (same checkpoints, metrics, resume and failure handling; kd_loss and
    kd_on are logged with the other metrics). Returns train_and_evaluate's summary.

    With kd.init_from_teacher_layers set, a student that has no checkpoint in workdir starts from
    those teacher layers (train_and_evaluate's init_params) with a fresh optimizer state."""
    run_config.validate(config)
    kd = kd_config(config)
    init_layers = parse_layer_list(config.kd.init_from_teacher_layers)
    teacher_record = _read_teacher_record(teacher_workdir)
    teacher_cfg = load_teacher_config(teacher_workdir)
    teacher_step = teacher_checkpoint_step(teacher_workdir)

    # The student's ModelConfig exactly as the trainer will build it (its vocab grows to the corpus').
    corpus = corpus_lib.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes or None,
                                    val_percent=config.data.val_percent, vocab_size=config.data.vocab_size or None)
    student_cfg = run_config.model_config(config, vocab_size=corpus.vocab_size)
    _check_vocab(student_cfg.vocab_size, teacher_cfg.vocab_size)
    if config.data.seq_len > teacher_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the teacher's max_seq_len="
                         f"{teacher_cfg.max_seq_len}; use --config.data.seq_len={teacher_cfg.max_seq_len} or less")
    if teacher_record.get("corpus") != corpus.description:
        logging.warning("the student's corpus (%s) is not the teacher's (%s)", corpus.description,
                        teacher_record.get("corpus"))
    if init_layers:  # pairing checked on shapes now, before the (possibly large) teacher restore
        teacher_shapes = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), teacher_cfg))
        jax.eval_shape(lambda params: init_from_teacher(params, student_cfg, init_layers), teacher_shapes)

    teacher_params = restore_teacher_params(teacher_workdir, teacher_cfg, teacher_step)
    logging.info("teacher: %s at step %d, %s, layer experts %s", teacher_workdir, teacher_step,
                 model_lib.count_params(teacher_cfg), teacher_cfg.layer_experts())
    logging.info("KD: %s", kd)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, TEACHER_RECORD), "w") as f:
        json.dump({"teacher_workdir": os.path.abspath(teacher_workdir), "teacher_step": teacher_step,
                   "teacher_model": dataclasses.asdict(teacher_cfg)}, f, indent=2)

    init_params = None
    if init_layers:  # read only when workdir holds no checkpoint yet
        init_params = functools.partial(init_from_teacher, teacher_params, student_cfg, init_layers)
    par = run_config.parallel_config(config)  # the student's mesh, which the trainer builds the same way
    if par is not None:
        parallel_lib.validate(teacher_cfg, par, config.data.batch_size)
    return trainer.train_and_evaluate(config, workdir, loss_hook=make_kd_hook(teacher_cfg, kd, par),
                                      hook_inputs=teacher_params, init_params=init_params)

