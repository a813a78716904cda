"""The import boundaries of DESIGN.md: extract/ never imports JAX; the training core never torch."""

import subprocess
import sys

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {m.split(".")[0] for m in out.stdout.strip().split(",")}


def test_extract_never_imports_jax():
    pytest.importorskip("torch")
    mods = imported_after("import extract.extractor, extract.hooks, extract.models, extract.corpus")
    assert "jax" not in mods and "flax" not in mods


def test_store_needs_neither_jax_nor_torch():
    mods = imported_after("import saejax.store")
    assert "jax" not in mods and "torch" not in mods


def test_training_core_never_imports_torch():
    mods = imported_after("import saejax.cli; saejax.cli.build_parser()")
    assert "torch" not in mods and "transformers" not in mods
