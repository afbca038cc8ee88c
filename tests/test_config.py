"""Config validation, placement, presets and parameter counts."""

import pytest

from moe_jax import config, model
from moe_jax.config import ModelConfig, MoEConfig

PAPER_TOTALS = {  # the paper's sizes; counts must be within 5%
    "350m+moe-128": 13e9, "350m+pr-moe-32/64": 4e9, "350m-mos": 3.5e9,
    "1.3b+moe-128": 52e9, "1.3b+pr-moe-64/128": 31e9, "1.3b-mos": 27e9,
    "350m": 350e6, "1.3b": 1.3e9, "6.7b": 6.7e9,
}


@pytest.mark.parametrize("name,total", sorted(PAPER_TOTALS.items()))
def test_preset_sizes_match_paper(name, total):
    count = model.count_params(config.preset(name))
    assert abs(count.total - total) / total < 0.05, (name, str(count))
    assert count.active <= count.total


def test_active_params_count_k_experts():
    dense = model.count_params(config.preset("350m"))
    moe = model.count_params(config.preset("350m+moe-128"))
    # top-1: a token passes the same FFN weights as the dense model plus the gates
    assert 0 < moe.active - dense.total < 12 * 1024 * 128 + 1
    top2 = model.count_params(config.replace_moe(config.preset("350m+moe-128"), k=2))
    per_expert = 2 * 1024 * 4096 + 4096 + 1024
    assert top2.active - moe.active == 12 * per_expert


def test_placement_rules():
    cfg = ModelConfig(num_layers=8, moe=MoEConfig(experts=4))
    assert cfg.layer_experts() == (0, 4, 0, 4, 0, 4, 0, 4)  # 1-based l % 2 == 0
    def layers(num_layers, **moe):
        return ModelConfig(num_layers=num_layers, moe=MoEConfig(**moe)).layer_experts()

    assert layers(8, experts=4, expert_interval=4) == (0, 0, 0, 4, 0, 0, 0, 4)
    assert layers(6, experts=4, placement="first_half") == (4, 4, 4, 0, 0, 0)
    assert layers(6, experts=4, placement="second_half") == (0, 0, 0, 4, 4, 4)
    assert layers(4, experts=2, placement="explicit", layers=(0, 3)) == (2, 0, 0, 2)
    pyramid = ModelConfig(num_layers=8, moe=MoEConfig(experts="2x3,8x1"))
    assert pyramid.layer_experts() == (0, 2, 0, 2, 0, 2, 0, 8)
    assert ModelConfig(num_layers=4, moe=MoEConfig(experts="1x1,4x1")).layer_experts() == (0, 0, 0, 4)


def test_expert_list_parsing():
    assert config.parse_expert_list("32x10,64x2") == (32,) * 10 + (64,) * 2
    assert config.parse_expert_list("128") == 128
    assert config.parse_expert_list([4, 8]) == (4, 8)


@pytest.mark.parametrize("build,field", [
    (lambda: MoEConfig(experts=4, k=5), "moe.k"),
    (lambda: MoEConfig(capacity_factor=0), "moe.capacity_factor"),
    (lambda: MoEConfig(eval_capacity_factor=-1), "moe.eval_capacity_factor"),
    (lambda: MoEConfig(experts="32y10"), "moe.experts"),
    (lambda: MoEConfig(noisy_gate_policy="Gaussian"), "moe.noisy_gate_policy"),
    (lambda: MoEConfig(dispatch="magic"), "moe.dispatch"),
    (lambda: MoEConfig(placement="middle"), "moe.placement"),
    (lambda: MoEConfig(residual=True, k=2), "moe.residual"),
    (lambda: MoEConfig(min_capacity=-1), "moe.min_capacity"),
    (lambda: ModelConfig(hidden_size=100, num_heads=3), "model.num_heads"),
    (lambda: ModelConfig(num_layers=8, moe=MoEConfig(experts="4x3")), "moe.experts"),
    (lambda: ModelConfig(num_layers=4, moe=MoEConfig(placement="explicit", layers=(5,))), "moe.layers"),
    (lambda: ModelConfig(dropout=1.5), "model.dropout"),
    (lambda: ModelConfig(compute_dtype="float8"), "model.compute_dtype"),
    (lambda: config.preset("350m+moe-9"), "preset"),
])
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("+", r"\+")):
        build()


# ----------------------------------------------------------------------------------------------
# Run configs: the model / moe / optim groups are the dataclasses' fields
# ----------------------------------------------------------------------------------------------

def test_run_config_groups_are_the_dataclass_fields():
    import dataclasses

    from moe_jax import run_config, train_lib

    config = run_config.default_config("tiny")
    assert set(config.moe) == {f.name for f in dataclasses.fields(MoEConfig)}
    assert set(config.model) == {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    assert set(config.optim) == {f.name for f in dataclasses.fields(train_lib.OptimConfig)} - {"total_steps"}
    assert config.moe.experts == "0" and run_config.model_config(config).moe is None


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_every_preset_survives_the_run_config(name):
    import ml_collections

    from moe_jax import run_config

    model_group, moe_group = run_config.model_groups(config.preset(name))
    run = ml_collections.ConfigDict({"model": model_group, "moe": moe_group})
    assert run_config.model_config(run) == config.preset(name)


def test_none_and_tuple_fields_take_config_values():
    """A field that may be None or a tuple has one ConfigDict type ("" / 0, a string) and is read back."""
    import dataclasses
    from typing import Optional

    from moe_jax import run_config

    @dataclasses.dataclass(frozen=True)
    class NewSettings:  # a dataclass the run config has never seen
        policy: Optional[str] = None
        size: Optional[int] = None
        layers: tuple[int, ...] = ()
        experts: int | tuple[int, ...] | str = 8

    fields = run_config.to_fields(NewSettings(experts=(32,) * 10 + (64,) * 2))
    assert fields == {"policy": "", "size": 0, "layers": "", "experts": "32x10,64x2"}
    assert run_config.from_fields(NewSettings, fields, "new") == {"policy": None, "size": None, "layers": (),
                                                                   "experts": "32x10,64x2"}
    assert run_config.from_fields(NewSettings, {"policy": "Jitter", "size": 96, "layers": "0, 3"}, "new") == {
        "policy": "Jitter", "size": 96, "layers": (0, 3)}
    with pytest.raises(ValueError, match=r"new\.layers='0,x' must list integers"):
        run_config.from_fields(NewSettings, {"layers": "0,x"}, "new")
    with pytest.raises(ValueError, match=r"new\.bogus is not a field of NewSettings"):
        run_config.from_fields(NewSettings, {"bogus": 1}, "new")


def test_moe_fields_are_command_line_overrides():
    """Every MoEConfig field is a --config.moe.<field> override of a config file, read back typed."""
    import pathlib

    from absl import flags
    from ml_collections import config_flags

    from moe_jax import run_config

    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs" / "moe.py"
    argv = ["test", f"--config={path}:tiny", "--config.moe.router_impl=kernel", "--config.moe.expert_ffn_size=96",
            "--config.moe.noisy_gate_policy=Jitter", "--config.moe.placement=explicit", "--config.moe.layers=1,5",
            "--config.moe.experts=4x1,8x1"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    moe = run_config.model_config(flag_values.config).moe
    assert (moe.router_impl, moe.expert_ffn_size, moe.noisy_gate_policy) == ("kernel", 96, "Jitter")
    assert (moe.layers, moe.experts) == ((1, 5), (4, 8))


def test_scales_fit_the_tiny_presets_to_their_size():
    from moe_jax import run_config

    pr_moe = {"tiny": "tiny+pr-moe"}
    micro, small = run_config.scale_model("micro", pr_moe), run_config.scale_model("small", pr_moe)
    assert (micro.num_layers, micro.hidden_size, micro.max_seq_len) == (4, 32, 32)
    assert micro.moe.experts == (4, 8) and micro.moe.residual
    assert small.moe.experts == (4, 4, 4, 4, 8, 8)  # the large count keeps its quarter of the MoE layers
    assert run_config.scale_model("micro").moe is None
    assert run_config.scale_model("350m", pr_moe) == config.preset("350m").replace(compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="scale 'huge' is unknown"):
        run_config.default_config("huge")


def test_run_settings_type_every_top_level_field_once():
    """default_config's top level and mesh group are exactly RunSettings' and MeshSettings' fields
    (one default each); a misspelt field or a bad value names itself."""
    import dataclasses

    from moe_jax import run_config

    config = run_config.default_config("tiny")
    top = {name for name, value in config.items() if not hasattr(value, "items")}
    assert top == {f.name for f in dataclasses.fields(run_config.RunSettings)}
    assert set(config.mesh) == {f.name for f in dataclasses.fields(run_config.MeshSettings)}
    settings = run_config.run_settings(config)
    assert (settings.total_steps, settings.eval_every_steps) == (300, 100)
    assert settings.last_step == 300
    config.stop_after_steps = 120
    assert run_config.run_settings(config).last_step == 120
    del config["routing_probe"]  # an older run's config: the field keeps its default
    assert run_config.run_settings(config).routing_probe is True
    config.eval_evry_steps = 5
    with pytest.raises(ValueError, match="eval_evry_steps is not a field of RunSettings"):
        run_config.run_settings(config)
    del config["eval_evry_steps"]
    config.init_from_noise = -0.1
    with pytest.raises(ValueError, match="init_from_noise=-0.1 must be >= 0"):
        run_config.validate(config)
    config.init_from_noise = 0.0
    config.mesh.shards = 2
    with pytest.raises(ValueError, match="mesh.shards is not a field of MeshSettings"):
        run_config.validate(config)
