"""Run configs: each file's get_config(arg) returns the ConfigDict of a run, arg being a scale of
moe_jax.run_config.SCALES (micro, tiny, small, 350m, 1.3b)."""

import importlib.util
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def load_config_file(name: str, arg: str = "tiny"):
    """get_config(arg) of experiments/configs/<name>.py (a file path works too), as --config does."""
    path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.exists(path):
        raise ValueError(f"config {name!r} not found at {path}; use a file of experiments/configs/")
    spec = importlib.util.spec_from_file_location(f"moe_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
