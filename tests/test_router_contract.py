"""Every router of the registry, with every implementation it declares, through the same checks:
a new router gets them by being registered, without being named here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config
from moe_jax import moe as moe_lib
from moe_jax import routing as routing_lib
from moe_jax import routers as routers_lib
from tests.helpers import check_gradient

CASES = [(router, impl) for router in sorted(routers_lib.ROUTERS) for impl in routers_lib.ROUTER_IMPLS[router]]
TABLE_FIELDS = ("expert_index", "slot", "weight", "kept")
STAT_FIELDS = ("aux_loss", "z_loss", "expert_counts", "dropped_fraction", "gate_fraction", "token_fraction",
               "token_gates", "token_choices")


def _moe(router, impl, scope="global", k=1):
    return config.MoEConfig(experts=8, k=k, router=router, router_impl=impl, balance_loss_scope=scope,
                            capacity_factor=1.0, min_capacity=1, z_loss_coef=1e-3)


def _gate(seed=0):
    return {"kernel": jax.random.normal(jax.random.key(seed), (16, 8))}


@pytest.mark.parametrize("router,impl", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_routing_fields_are_present_finite_and_shaped(router, impl, train):
    x = jax.random.normal(jax.random.key(1), (48, 16))
    routing = moe_lib.route(_gate(), x, moe=_moe(router, impl), train=train, rng=jax.random.key(2))
    copies = routing.expert_index.shape
    assert copies[0] == 48
    for name in TABLE_FIELDS:
        assert getattr(routing, name).shape == copies, name
    for name in STAT_FIELDS:
        value = getattr(routing, name)
        assert value is not None, f"{router}/{impl}: Routing.{name} is missing"
        assert np.all(np.isfinite(np.asarray(value, np.float32))), f"{router}/{impl}: Routing.{name} is not finite"
    assert routing.token_gates.shape == routing.token_choices.shape == (48, 8)
    kept = np.asarray(routing.kept)
    assert np.all(np.asarray(routing.weight)[~kept] == 0)  # a dropped copy carries no weight
    assert np.all((np.asarray(routing.expert_index) >= 0) & (np.asarray(routing.expert_index) < 8))


@pytest.mark.parametrize("router,impl", CASES)
@pytest.mark.parametrize("scope", routing_lib.BALANCE_LOSS_SCOPES)
def test_every_balance_scope_gives_finite_stats_and_gradients(router, impl, scope):
    params = {"gate": _gate(), "experts": moe_lib.init_experts(jax.random.key(3), 8, 16, 32, 0.3, 0.3, jnp.float32)}
    x = jax.random.normal(jax.random.key(4), (3, 16, 16))
    moe = _moe(router, impl, scope)

    def loss(params):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=jax.random.key(5))
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"] + stats["z_loss"], stats

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    for name in routing_lib.STAT_NAMES:
        assert np.all(np.isfinite(np.asarray(stats[name], np.float32))), f"{router}/{impl}/{scope}: {name}"
    gate_grad = np.asarray(grads["gate"]["kernel"])
    assert np.all(np.isfinite(gate_grad)) and np.abs(gate_grad).sum() > 0, f"{router}/{impl}: no gate gradient"
    # the gate's gradient is the derivative of the loss (weights, aux and z-loss through the router)
    check_gradient(jax.jit(lambda gate: loss({**params, "gate": gate})[0]), params["gate"], seed=6)


def test_an_implementation_a_router_lacks_is_refused():
    for router, impls in routers_lib.ROUTER_IMPLS.items():
        for impl in set(config.ROUTER_IMPLS) - set(impls):
            with pytest.raises(ValueError, match=f"moe.router={router!r} has no {impl!r} implementation"):
                _moe(router, impl)
    assert ("topk", "kernel") in CASES  # the fused kernel is checked like any router
