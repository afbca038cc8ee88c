"""Random MoE layer parameters for tests: moe_forward's layout, nonzero biases (never zeros)."""

import jax


def moe_layer_params(num_experts: int, model_dim: int, ffn_dim: int, seed: int) -> dict:
    """{gate: {kernel [M, E]}, experts: {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}}."""
    keys = jax.random.split(jax.random.key(seed), 5)
    return {"gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts))},
            "experts": {"w1": jax.random.normal(keys[1], (num_experts, model_dim, ffn_dim)) * 0.3,
                        "b1": jax.random.normal(keys[2], (num_experts, ffn_dim)) * 0.1,
                        "w2": jax.random.normal(keys[3], (num_experts, ffn_dim, model_dim)) * 0.3,
                        "b2": jax.random.normal(keys[4], (num_experts, model_dim)) * 0.1}}
