"""A disk that fills up during `saejax extract`: one line, exit 2, meta.json still counting
only complete rows, and the same command once space is freed ends with the store an
uninterrupted run writes.

The disk is filled for real, without root: the extraction runs under RLIMIT_FSIZE, so the
kernel fails every write past a file size (EFBIG) inside TensorStore's writer, as ENOSPC
fails a write on a full disk (saejax.errors.DISK_FULL handles both alike)."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from saejax.store import ActivationStore, read_meta  # noqa: E402

UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from saejax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def extract(model, corpus, out, tokens: int, file_size_limit: int | None = None):
    args = [
        "extract",
        "--model",
        model,
        "--corpus",
        corpus,
        "--hooks",
        "blocks.1.hook_resid_post",
        "--tokens",
        str(tokens),
        "--context",
        "32",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        "--chunk-mib",
        "0.02",  # chunks of 163 rows: 20 kB of activations each
        "--quiet",
        "--out",
        str(out),
    ]
    limit = [] if file_size_limit is None else [str(file_size_limit)]
    code = ["-c", UNDER_A_FILE_SIZE_LIMIT] if limit else ["-m", "saejax"]
    return subprocess.run(  # stderr goes to a pipe: a file would be capped too
        [sys.executable, *code, *limit, *args],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
    )


def contents(path) -> dict:
    store = ActivationStore.open(str(path))
    return {"acts": store.read(0, len(store)), "tokens": store.tokens(), "doc": store.doc()}


def test_extraction_that_runs_out_of_space_keeps_its_rows_and_continues(
    tiny_gpt2, corpus_file, tmp_path
):
    store = tmp_path / "store"
    assert extract(tiny_gpt2, corpus_file, store, 1000).returncode == 0
    failed = extract(tiny_gpt2, corpus_file, store, 3000, file_size_limit=8192)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith(f"saejax: error: cannot write to the store {store} (File too large)")
    assert "its first 1,000 rows are kept" in lines[0]
    assert read_meta(str(store))["n_tokens"] == 1000  # nothing counted that is not on disk

    assert extract(tiny_gpt2, corpus_file, store, 3000).returncode == 0  # space freed
    assert extract(tiny_gpt2, corpus_file, tmp_path / "once", 3000).returncode == 0
    got, want = contents(store), contents(tmp_path / "once")
    assert len(got["acts"]) == 3000
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
