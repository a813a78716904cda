"""The package's layering, as DESIGN.md states it, held by reading every module's imports.

    core     → errors (and itself)             JAX maths only
    train    → core, store, config, io, errors
    interp   → train's, extract, analysis      everything that needs the language model
    cli      → anything; nothing imports cli
    extract  → saejax.store / io / errors, analysis; never JAX
    analysis → saejax.io; NumPy only
No `_private` name is imported across modules, and the import graph has no cycle
(imports inside functions count too).
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("saejax", "extract", "analysis")

TRAIN_MAY = (
    "saejax.errors",
    "saejax.io",
    "saejax.config",
    "saejax.store",
    "saejax.core",
    "saejax.train",
    "saejax",
)  # "saejax": the package root, for __version__
RULES = [  # (module prefix, what it may import); the first matching prefix decides
    ("saejax.cli", None),
    ("saejax.__main__", None),
    ("saejax.errors", ()),
    ("saejax.io", ()),
    ("saejax.config", ("saejax.errors", "saejax.io", "saejax.core.architectures")),
    ("saejax.store", ("saejax.errors", "saejax.io")),
    ("saejax.core", ("saejax.errors", "saejax.core")),
    ("saejax.train", TRAIN_MAY),
    ("saejax.interp", (*TRAIN_MAY, "saejax.interp", "extract", "analysis")),
    ("saejax", ()),
    ("extract", ("saejax.errors", "saejax.io", "saejax.store", "extract", "analysis")),
    ("analysis", ("saejax.io", "analysis")),
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the module, anywhere."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if ours(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (node.module, alias.name))
    return found


def allowed(importer: str, target: str) -> bool:
    for prefix, may in RULES:
        if importer == prefix or importer.startswith(prefix + "."):
            if may is None:
                return True
            return any(target == m or target.startswith(m + ".") for m in may if m != "saejax") or (
                "saejax" in may and target == "saejax"
            )
    raise AssertionError(f"no layering rule covers {importer}")


def test_every_import_follows_the_layering():
    broken = [
        f"{importer} imports {target}"
        for importer in sorted(MODULES)
        for target, _ in imports_of(importer)
        if not allowed(importer, target)
    ]
    assert not broken, "\n".join(broken)


def test_nothing_outside_cli_imports_cli():
    users = [
        m
        for m in MODULES
        if not m.startswith("saejax.cli")
        and m != "saejax.__main__"
        and any(t.startswith("saejax.cli") for t, _ in imports_of(m))
    ]
    assert not users


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{m} imports {name} from {target}"
        for m in sorted(MODULES)
        for target, name in imports_of(m)
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" → ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own submodules is not a cycle of the layering
    cycles = [
        c for c in cycles if not all(part.startswith(c.split(" → ")[0]) for part in c.split(" → "))
    ]
    assert not cycles, "\n".join(cycles)


def test_every_module_is_covered_by_the_test():
    assert {
        "saejax.core.sae",
        "saejax.train.loop",
        "saejax.interp.eval",
        "saejax.cli",
        "extract.extractor",
        "analysis.weights",
    } <= set(MODULES)


# ---- what actually gets loaded --------------------------------------------------------
def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return {m.split(".")[0] for m in out.stdout.strip().split(",")}


def test_extract_never_imports_jax():
    pytest.importorskip("torch")
    mods = imported_after("import extract.extractor, extract.hooks, extract.models, extract.corpus")
    assert "jax" not in mods and "flax" not in mods


def test_store_needs_neither_jax_nor_torch():
    mods = imported_after("import saejax.store")
    assert "jax" not in mods and "torch" not in mods


def test_the_command_line_starts_without_jax_or_torch():
    mods = imported_after("import saejax.cli; saejax.cli.build_parser()")
    assert not {"torch", "transformers", "jax"} & mods


def test_python_m_saejax_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "saejax", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    for command in (
        "extract",
        "store",
        "demo",
        "analyze",
        "train",
        "export",
        "bench",
        "eval",
        "steer",
        "features",
        "search",
        "dashboard",
        "sweep",
    ):
        assert f"    {command} " in out or f"    {command}\n" in out, command
