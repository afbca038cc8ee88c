"""The one name of a pytree path, as every module prints and matches it: 'block_1/moe/experts/w1'."""

from __future__ import annotations


def path_name(path) -> str:
    """A path of jax.tree_util.tree_flatten_with_path as 'a/b/0/c' (dict keys, attribute names and
    sequence indices)."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
