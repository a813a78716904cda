"""Text corpora as deterministic streams of documents.

Sources: the built-in corpus (CPython's own English prose: the pydoc topics and
the standard library's docstrings, read with `ast`, nothing imported), local
.txt / .jsonl / .parquet files or a directory of them, and Hugging Face datasets
(streamed, when the `datasets` package is installed and a hub is reachable).
"""

from __future__ import annotations

import ast
import json
import os
import platform
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from saejax.errors import SaejaxError

BUILTIN_CORPUS = "builtin"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "ensurepip",
    "turtledemo",
    "tkinter",
    "config-3.11-x86_64-linux-gnu",
}


@dataclass
class Corpus:
    description: str
    documents: Callable[[], Iterator[str]]  # a fresh, identical stream on every call


def builtin_documents() -> Iterator[str]:
    """pydoc topics (sorted by name), then the stdlib's docstrings (sorted by file)."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield topics.topics[name]
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = []
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 80:
                        docs.append(doc)
            if docs:
                yield "\n\n".join(docs)


def _iter_txt(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield f.read()


def _iter_jsonl(path: str, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaejaxError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_column not in record:
                raise SaejaxError(f"{path}:{line_no}: no '{text_column}' field (use --text-column)")
            yield str(record[text_column])


def _iter_parquet(path: str, text_column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SaejaxError("reading .parquet corpora needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if text_column not in table.schema_arrow.names:
        raise SaejaxError(
            f"{path}: no column '{text_column}' (columns: {table.schema_arrow.names})"
        )
    for batch in table.iter_batches(columns=[text_column]):
        yield from (str(t) for t in batch.column(0).to_pylist())


def _file_documents(paths: list[str], text_column: str) -> Iterator[str]:
    for path in paths:
        if path.endswith(".txt"):
            yield from _iter_txt(path)
        elif path.endswith(".jsonl"):
            yield from _iter_jsonl(path, text_column)
        else:
            yield from _iter_parquet(path, text_column)


def _hf_documents(name: str, split: str, text_column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise SaejaxError(
            f"corpus '{name}' is neither a local file nor the built-in corpus; Hugging Face "
            "datasets need the `datasets` package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - the hub raises many types
        raise SaejaxError(f"cannot load dataset '{name}' (split {split}): {e}") from None
    for record in ds:
        if text_column not in record:
            raise SaejaxError(f"dataset '{name}' has no column '{text_column}' (use --text-column)")
        yield str(record[text_column])


def open_corpus(spec: str, split: str = "train", text_column: str = "text") -> Corpus:
    """Resolve `--corpus` to a Corpus, failing early on missing files."""
    if spec in (BUILTIN_CORPUS, "", None):
        desc = f"builtin: CPython {platform.python_version()} pydoc topics + stdlib docstrings"
        return Corpus(desc, builtin_documents)
    parts = [p for p in spec.split(",") if p]
    looks_local = any(p.endswith(TEXT_SUFFIXES) or os.sep in p or p.startswith(".") for p in parts)
    if all(os.path.exists(p) for p in parts):
        files = []
        for p in parts:
            if os.path.isdir(p):
                found = sorted(
                    os.path.join(p, f) for f in os.listdir(p) if f.endswith(TEXT_SUFFIXES)
                )
                if not found:
                    raise SaejaxError(f"corpus directory {p} has no .txt/.jsonl/.parquet files")
                files.extend(found)
            elif p.endswith(TEXT_SUFFIXES):
                files.append(p)
            else:
                raise SaejaxError(
                    f"corpus file {p}: unsupported type (use .txt, .jsonl or .parquet)"
                )
        return Corpus(
            f"files: {','.join(os.path.abspath(p) for p in parts)}",
            lambda: _file_documents(files, text_column),
        )
    if looks_local:
        missing = next(p for p in parts if not os.path.exists(p))
        raise SaejaxError(f"corpus file not found: {missing}")
    return Corpus(
        f"hf: {spec} split={split} column={text_column}",
        lambda: _hf_documents(spec, split, text_column),
    )
