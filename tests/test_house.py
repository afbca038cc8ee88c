"""The library stays readable: no module over 400 lines, no function over 80, no import cycle
between its modules (lazy imports inside functions included), so a newcomer reads one idea per file."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted([*(ROOT / "moe_jax").glob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def _module(path: pathlib.Path) -> str:
    """moe_jax/a.py -> moe_jax.a; kernels/b/c.py -> moe_jax.kernels.b.c (installed inside the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "kernels":
        parts = ("moe_jax", *parts)
    return ".".join(part for part in parts if part != "__init__")


def test_no_module_over_400_lines_and_no_function_over_80():
    assert len(FILES) > 40
    long_files = {str(p.relative_to(ROOT)): n for p in FILES if (n := len(p.read_text().splitlines())) > 400}
    assert not long_files, f"split these modules (over 400 lines): {long_files}"
    long_functions = {}
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > 80:
                long_functions[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = length
    assert not long_functions, f"split these functions (over 80 lines): {long_functions}"


def test_no_import_cycle_between_library_modules():
    modules = {_module(p): p for p in FILES}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_jax"):
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("moe_jax")}
        graph[name] = {t for t in targets if t in modules and t != name}
    assert "moe_jax.routers" in graph and "moe_jax.kernels.gating.ops" in graph["moe_jax.routers"]
    done, cycles = set(), []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for name in graph:
        if name not in done:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"
