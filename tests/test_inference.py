"""Inference: cached decode equals the full forward pass, the serving dispatch path equals the gather
path without drops (with and without expert parallelism), batching does not change a prompt's
output, sampling, bf16, bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, inference, model
from moe_jax import moe as moe_lib

# Layer 1 is MoE (4 experts), layer 0 dense. With 4 experts the serving path runs a step of at most
# 2 top-1 tokens per copy (decode of 2 rows) and a longer one by the dropless path (prefill).
CFG = config.ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_heads=2, max_seq_len=32,
                         moe=config.MoEConfig(experts=4, k=1))
VARIANTS = {"top2": config.replace_moe(CFG, k=2),
            "residual": config.replace_moe(CFG, residual=True)}


@pytest.fixture(scope="module")
def params():
    return jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def generator(params):
    return inference.Generator(params, CFG)


@pytest.mark.parametrize("moe_path", ["serve", "einsum"])  # the serving path and the baseline
def test_cached_decode_matches_full_forward(params, moe_path):
    cfg = inference.serving_config(CFG, moe_path=moe_path)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
    full, _ = jax.jit(model.apply, static_argnums=2)(params, tokens, cfg)
    prefill = jax.jit(inference.prefill, static_argnames=("cfg", "max_len"))
    decode_step = jax.jit(inference.decode_step, static_argnames=("cfg",))
    for prompt_len in (1, 6):  # 1: every position is a decode step; 6: a 12-token (dropless) prefill
        lengths = jnp.full((2,), prompt_len, jnp.int32)
        logits, state = prefill(params, tokens[:, :prompt_len], lengths, cfg=cfg, max_len=10)
        cached = [logits]
        for t in range(prompt_len, 10):
            logits, state = decode_step(params, state, tokens[:, t], cfg=cfg)
            cached.append(logits)
        np.testing.assert_allclose(jnp.stack(cached, axis=1), full[:, prompt_len - 1:], rtol=1e-5, atol=1e-5)


def _serve_vs_gather(layer, x, moe, parallel=None):
    """The layer as served (serving_config: dispatch "serve", no drops, no exchange overflow) and
    by the gather path with drop_tokens=False."""
    gather = dataclasses.replace(moe, drop_tokens=False, dispatch="gather")
    serve = inference.serving_config(config.ModelConfig(hidden_size=32, num_heads=2, moe=moe)).moe
    expected, _ = moe_lib.moe_forward(layer, x, moe=gather, train=False)
    served, stats = moe_lib.moe_forward(layer, x, moe=serve, train=False, parallel=parallel)
    return expected, served, stats["dropped_fraction"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("num_tokens", [2, 12])  # 2 copies <= E/2: per-copy weights; 12: dropless
def test_serve_path_equals_gather_path_without_drops(variant, num_tokens):
    cfg = VARIANTS[variant]
    layer = jax.jit(model.init_params, static_argnums=1)(jax.random.key(2), cfg)["block_1"]["moe"]
    layer = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), layer)  # no zero biases
    x = jax.random.normal(jax.random.key(3), (num_tokens, cfg.hidden_size))
    # a tight capacity factor: the gather reference must not drop because drop_tokens=False, not by luck
    moe = dataclasses.replace(cfg.moe, capacity_factor=0.5, min_capacity=0)
    expected, served, dropped = jax.jit(_serve_vs_gather, static_argnums=2)(layer, x, moe)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(dropped)) < 1e-6


@pytest.mark.parametrize("num_experts", [8, 4])  # 8: split over the expert group; 4: replicated per shard
def test_serve_path_under_expert_parallelism_equals_one_device(num_experts):
    from moe_jax import parallel

    cfg = config.ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_heads=2, max_seq_len=32,
                             moe=config.MoEConfig(experts=num_experts, k=2, second_expert_sampling=False))
    layer = model.init_params(jax.random.key(5), cfg)["block_1"]["moe"]
    layer = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(6), p.shape), layer)
    x = jax.random.normal(jax.random.key(7), (8, 3, cfg.hidden_size))  # [B, T, M], B split over 8 shards
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    expected, served, dropped = jax.jit(_serve_vs_gather, static_argnums=(2, 3))(layer, x, cfg.moe, par)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(dropped)) < 1e-6


def test_left_padded_cached_decode_equals_full_forward_per_prompt(params):
    """Prompts of different lengths in one batch: every decoded position's logits equal the full
    forward pass on that prompt alone, unpadded."""
    cfg = inference.serving_config(CFG)
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, CFG.vocab_size, size=n) for n in (9, 12, 10)]
    prompt_lengths = [2, 7, 4]
    new_tokens = 5
    prompts = [seq[:n] for seq, n in zip(sequences, prompt_lengths)]
    tokens, lengths = inference.pad_prompts(prompts, vocab_size=CFG.vocab_size, max_seq_len=CFG.max_seq_len,
                                            max_new_tokens=new_tokens)
    logits, state = jax.jit(inference.prefill, static_argnames=("cfg", "max_len"))(
        params, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg, max_len=tokens.shape[1] + new_tokens)
    decode_step = jax.jit(inference.decode_step, static_argnames=("cfg",))
    steps = [logits]
    for t in range(new_tokens - 1):  # feed each prompt's own continuation (teacher forcing)
        feed = jnp.asarray([seq[n + t] for seq, n in zip(sequences, prompt_lengths)], jnp.int32)
        logits, state = decode_step(params, state, feed, cfg=cfg)
        steps.append(logits)
    cached = np.asarray(jnp.stack(steps, axis=1))  # [B, new_tokens, V]
    for row, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
        alone, _ = model.apply(params, jnp.asarray(seq[None, :n + new_tokens - 1]), cfg)
        np.testing.assert_allclose(cached[row], np.asarray(alone[0, n - 1:]), rtol=1e-5, atol=1e-5)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]  # shared shapes: the generator compiles each once


def test_greedy_generation_is_deterministic(generator):
    first = generator.generate(PROMPTS, 5)
    again = generator.generate(PROMPTS, 5)
    assert first.tokens == again.tokens
    assert [len(t) for t in first.tokens] == [5, 5]
    assert len(generator._compiled) == 1  # the second call reused the first call's executables


def test_prompt_output_is_the_same_alone_or_in_a_batch(generator):
    assert generator.generate(PROMPTS, 5).tokens == [generator.generate([p], 5).tokens[0] for p in PROMPTS]
    # Logits too, not only their argmax: the left-padded prompt in the batch against it alone.
    prefill = jax.jit(inference.prefill, static_argnames=("cfg", "max_len"))
    tokens, lengths = inference.pad_prompts(PROMPTS, vocab_size=64, max_seq_len=32, max_new_tokens=5)
    batch_logits, _ = prefill(generator.params, tokens, lengths, cfg=generator.cfg, max_len=12)
    alone, _ = prefill(generator.params, jnp.asarray(PROMPTS[1:]), jnp.asarray([3]), cfg=generator.cfg, max_len=8)
    np.testing.assert_allclose(batch_logits[1], alone[0], rtol=1e-5, atol=1e-5)


def test_sampling(generator):
    prompts = PROMPTS[1:]
    greedy = generator.generate(prompts, 5).tokens
    # A nucleus this small keeps only the most likely token: sampling becomes greedy.
    assert generator.generate(prompts, 5, temperature=1.0, top_p=1e-6, seed=1).tokens == greedy
    a = generator.generate(prompts, 5, temperature=2.0, seed=1).tokens
    assert a == generator.generate(prompts, 5, temperature=2.0, seed=1).tokens
    assert a != generator.generate(prompts, 5, temperature=2.0, seed=2).tokens


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.jit(jax.vmap(lambda key: inference.sample_tokens(logits, key, 1.0, 0.7)[0]))(
        jax.random.split(jax.random.key(0), 400))
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is tokens {0, 1}, drawn 5:3.
    assert set(np.unique(draws).tolist()) == {0, 1}
    assert 0.5 < float(jnp.mean(draws == 0)) < 0.75


def test_bfloat16_generation(params):
    generator = inference.Generator(params, CFG, dtype="bfloat16")
    assert generator.params["block_0"]["attn"]["qkv_kernel"].dtype == jnp.bfloat16
    assert generator.params["block_1"]["moe"]["gate"]["kernel"].dtype == jnp.float32  # routing stays float32
    out = generator.generate(PROMPTS[1:], 4)
    assert all(0 <= t < CFG.vocab_size for row in out.tokens for t in row)


def test_dense_model_generates():
    cfg = CFG.replace(moe=None)
    params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), cfg)
    assert len(inference.Generator(params, cfg).generate([[1, 2]], 3).tokens[0]) == 3


@pytest.mark.parametrize("prompts, max_new_tokens, kwargs, match", [
    ([[]], 4, {}, "prompt 0 is empty"),
    ([], 4, {}, "no prompts"),
    ([[1] * 30], 4, {}, "30 tokens and max_new_tokens=4"),
    ([[1] * 33], 1, {}, "33 tokens and max_new_tokens=1: together 34 > model max_seq_len=32"),
    ([[1, 64]], 4, {}, "token id 64 outside"),
    ([[1]], 0, {}, "max_new_tokens=0"),
    ([[1]], 32, {}, "max_new_tokens=32 must be in"),
    ([[1]], 4, {"temperature": -1.0}, "temperature=-1.0"),
    ([[1]], 4, {"top_p": 0.0}, "top_p=0.0"),
])
def test_bad_inputs(generator, prompts, max_new_tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator.generate(prompts, max_new_tokens, **kwargs)


def test_bad_options(params):
    with pytest.raises(ValueError, match="moe_path='fast'"):
        inference.Generator(params, CFG, moe_path="fast")
    with pytest.raises(ValueError, match="dtype='float16'"):
        inference.Generator(params, CFG, dtype="float16")


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_sharded_decode_equals_single_device(mesh):
    from moe_jax import parallel

    cfg = config.ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_heads=4, ffn_size=64,
                             max_seq_len=32, moe=config.MoEConfig(experts=8, k=2, second_expert_sampling=False))
    params = model.init_params(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (3, 7, 5, 9, 2)]  # 5 prompts: filled up to 8
    single = inference.Generator(params, cfg, moe_path="gather").generate(prompts, max_new_tokens=6)
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))
    sharded = inference.Generator(params, cfg, moe_path="gather", parallel=par).generate(prompts, max_new_tokens=6)
    assert sharded.tokens == single.tokens
    assert len(sharded.tokens) == 5


def test_generator_validates_the_mesh(params):
    from moe_jax import parallel

    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    bad = config.replace_moe(CFG, experts=12)  # 12 experts over an expert axis of 8
    with pytest.raises(ValueError, match="num_experts=12, not divisible by the expert mesh axis"):
        inference.Generator(model.init_params(jax.random.key(0), bad), bad, parallel=par)
