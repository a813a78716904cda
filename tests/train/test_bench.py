"""`saejax bench` runs the real step, loader and loop and reports them as one JSON line."""

import json
import os
import subprocess
import sys


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "saejax", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def test_bench_json_line():
    result = run_cli(
        "bench",
        "--d-in",
        "32",
        "--d-sae",
        "64,128",
        "--batch",
        "256",
        "--k",
        "4",
        "--arch",
        "relu,topk",
        "--steps",
        "2",
        "--loop-rounds",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    rows = {(r["arch"], r["d_sae"]): r for r in out["results"]}
    assert set(rows) == {("relu", 64), ("relu", 128), ("topk", 64), ("topk", 128)}
    assert all(r["tokens_per_s"] > 0 and r["fraction_of_peak"] > 0 for r in rows.values())
    assert rows[("topk", 64)]["dense_matmuls"] == 1 and rows[("relu", 64)]["dense_matmuls"] == 6
    assert out["matmul_peak_flops"] > 0 and out["loader_tokens_per_s"] > 0
    assert out["loader_cpu_ms_per_batch"] > 0
    assert out["loop"]["tokens_per_s"] > 0 and out["loop"]["arch"] == "relu"
    rounds = out["loop"]["rounds"]
    assert len(rounds) == 2 and out["loop"] in [{**out["loop"], **r} for r in rounds]


def test_bench_bad_options():
    for args, message in [
        (("--arch", "transcoder"), "unknown --arch"),
        (("--d-sae", "12x"), "comma list"),
        (("--dtype", "float64"), "unknown --dtype"),
        (("--k", "500", "--d-sae", "64"), "--k 500"),
        (("--loop-rounds", "0"), "must be positive"),
    ]:
        result = run_cli("bench", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
