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
    assert out["loader"]["tokens_per_cpu_s"] > 0 and out["loader"]["warmup"] > 0
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
        (("--loader-only", "--loader-batches", "0"), "must be positive"),
        (("--loader-only", "--loader-threads", "-1"), "--loader-threads must be at least 0"),
    ]:
        result = run_cli("bench", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def loader_report(store: str, env=None) -> dict:
    result = run_cli(
        "bench",
        "--loader-only",
        "--store",
        store,
        "--d-in",
        "16",
        "--batch",
        "64",
        "--loader-batches",
        "6",
        "--loader-threads",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["loader"]


def test_bench_reports_the_loader_per_host_core_from_disk_and_from_a_bucket(tmp_path):
    """`saejax bench --loader-only` times the loader alone from the store it is given: wall
    tokens/s, host CPU per batch, and tokens per second of one host core (process CPU time),
    which is the figure to divide an accelerator's appetite by."""
    from saejax.train.bench import synthetic_store
    from tests.helpers import start_gcs_emulator

    local = synthetic_store(str(tmp_path / "store"), 64 * 10, 16)
    r = loader_report(local)
    assert r["store"] == f"the store on disk ({local})" and r["threads"] == 2
    assert r["batches"] == 6 and r["d_in"] == 16 and r["batch"] == 64
    assert r["tokens_per_s"] > 0 and r["cpu_ms_per_batch"] > 0
    # tokens per CPU-second and CPU per batch are one figure seen two ways
    assert abs(r["tokens_per_cpu_s"] * r["cpu_ms_per_batch"] / 1000 - 64) < 1e-6 * 64

    saved = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    emulator = start_gcs_emulator("benchbkt")  # sets TENSORSTORE_GCS_HTTP_URL here
    try:
        synthetic_store("gs://benchbkt/store", 64 * 10, 16)
        r = loader_report("gs://benchbkt/store")
        assert r["store"] == "gs://benchbkt/store" and r["tokens_per_cpu_s"] > 0
    finally:
        emulator.stop()
        if saved is None:
            os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
        else:
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = saved
