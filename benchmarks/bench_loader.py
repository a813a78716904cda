"""The loader's cost: wall tokens/s and host CPU per batch, alone on the machine.

On a GPU the step can outrun the host, so what matters there is how many core-seconds the
loader spends per token (read, NaN/Inf check, shuffle gather, device transfer), and the
NaN/Inf check alone on one 8,192-row read block. The clock starts after `--warmup` batches
(default one epoch: the first touch of the loader's reused buffers and JAX's start are not
the steady state), then three epochs of the synthetic store are timed. With
`--baseline FILE` (another version of saejax/train/data.py, e.g. from
`git show REV:saejax/train/data.py`)
both loaders are timed in interleaved rounds on the same store, and the ratios printed.

    python benchmarks/bench_loader.py [--store PATH] [--batch 4096] [--batches 96] [--rounds 3]
                                      [--d-in 576] [--threads 0] [--gcs] [--warmup -1]
                                      [--baseline OLD_DATA_PY | --baseline-rev REV] [--stages]
                                      [--json]

`--gcs` writes the synthetic store into a local GCS emulator (fake-gcs-server, from the test
extras) and reads it from there: every read an HTTP request, as from a bucket, without the
network's latency.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

from saejax.train import data as current
from saejax.train.bench import StepShape, bench_loader, synthetic_store


def load_module(path: str, name: str = "baseline_data"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def load_revision(rev: str, tmp: str):
    """saejax/train/data.py as it was at git revision `rev`, with that revision's NaN/Inf
    check (saejax/store.py's check_finite) in place of today's."""
    root = os.path.join(os.path.dirname(__file__), "..")
    files = {}
    for name in ("saejax/train/data.py", "saejax/store.py"):
        text = subprocess.run(
            ["git", "show", f"{rev}:{name}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        files[name] = os.path.join(tmp, name.replace("/", "_"))
        with open(files[name], "w") as f:
            f.write(text)
    module = load_module(files["saejax/train/data.py"])
    module.check_finite = load_module(files["saejax/store.py"], "baseline_store").check_finite
    return module


def time_loader(
    module, store: str, batch: int, batches: int, block, threads: int = 0, warmup: int = 0
) -> dict:
    shape = StepShape("relu", 1, 1, batch)
    r = bench_loader(store, shape, batches, module, loader_threads=threads, warmup=warmup)
    check_s = (
        min(timeit.repeat(lambda: module.check_finite(block, 0, store), number=10, repeat=3)) / 10
    )
    return {
        "tokens_per_s": r["tokens_per_s"],
        "cpu_ms_per_batch": r["cpu_ms_per_batch"],
        "tokens_per_cpu_s": r["tokens_per_cpu_s"],
        "check_rows_per_s": len(block) / check_s,
    }


def stage_profile(store_path: str, batch: int, repeat: int = 3) -> dict:
    """Host CPU ms per batch of `batch` rows for each pass the loader makes over the bytes,
    the way before this issue and the way now, timed on one read block of up to 8,192 rows
    (best of `repeat`, after one untimed call)."""
    import jax
    import numpy as np

    from saejax.store import DTYPES, ActivationStore, check_finite, nonfinite_rows

    store = ActivationStore.open(store_path)
    n = min(8192, len(store))
    rows = min(batch, n)
    block = np.empty((n, store.d_in), DTYPES[store.dtype])
    out = np.empty((rows, store.d_in), block.dtype)
    index = np.random.default_rng(0).permutation(n)[:rows]

    def cpu_ms(f, scale: float) -> float:
        f()
        best = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            f()
            best = min(best, time.process_time() - t)
        return 1000.0 * best * scale

    per_block = batch / n  # a batch's share of the block-sized passes
    return {
        "read, a new array per block (before)": cpu_ms(lambda: store.read(0, n), per_block),
        "read into a reused group buffer (now)": cpu_ms(
            lambda: store.read_into(0, n, block).result(), per_block
        ),
        "NaN/Inf check, per-row masks (before)": cpu_ms(
            lambda: nonfinite_rows(block).any(), per_block
        ),
        "NaN/Inf check, cache-sized max (now)": cpu_ms(
            lambda: check_finite(block, 0, store_path), per_block
        ),
        "concatenate the group's blocks (before)": cpu_ms(
            lambda: np.concatenate([block, block]), per_block / 2
        ),
        "gather, a new array (before)": cpu_ms(lambda: np.take(block, index, axis=0), batch / rows),
        "gather into a reused array (now)": cpu_ms(
            lambda: np.take(block, index, axis=0, out=out, mode="clip"), batch / rows
        ),
        "device transfer (jax.device_put)": cpu_ms(
            lambda: jax.block_until_ready(jax.device_put(out)), batch / rows
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="default: a temporary store of random rows")
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="data.loader_threads (0: default)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="batches drawn before the clock starts (-1: one epoch of the synthetic store)",
    )
    ap.add_argument("--gcs", action="store_true", help="the store in a local GCS emulator")
    ap.add_argument("--baseline", default=None, help="another saejax/train/data.py to compare with")
    ap.add_argument(
        "--baseline-rev",
        default=None,
        help="compare with the loader (data.py and the NaN/Inf check) at this git revision",
    )
    ap.add_argument(
        "--stages", action="store_true", help="also time each pass over the bytes on its own"
    )
    ap.add_argument(
        "--only",
        choices=["current", "baseline"],
        default=None,
        help="time one of the two loaders (with --gcs: a second loader in one process has "
        "hung on its first read, the old loader as well as the new one, so the GCS figures "
        "come from one process per loader)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    loaders = {"current": current}
    if args.baseline:
        loaders["baseline"] = load_module(args.baseline)
    elif args.baseline_rev:
        loaders["baseline"] = load_revision(args.baseline_rev, tempfile.mkdtemp())
    if args.only:
        loaders = {args.only: loaders[args.only]}
    emulator = None
    if args.gcs and not args.store:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from helpers import start_gcs_emulator

        # fake-gcs-server on a loaded box sometimes leaves a request unanswered; without a
        # low-speed limit curl waits on it for ever. Stalled 20 s: fail it, and it is retried.
        os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "20")
        os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
        emulator = start_gcs_emulator("bench")
    with tempfile.TemporaryDirectory(prefix="saejax-bench-loader-") as tmp:
        # the timed batches run three times over the store: its per-group work all counts
        where = "gs://bench/store" if emulator else os.path.join(tmp, "store")
        store = args.store or synthetic_store(
            where, args.batch * (args.batches // 3 + 2), args.d_in
        )
        source = current.ArraySource(store)
        warmup = args.warmup if args.warmup >= 0 else source.n_rows // args.batch - 1
        block = source.read(0, min(8192, source.n_rows))  # one read block, as the loader checks
        stages = stage_profile(store, args.batch) if args.stages else None
        runs = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, module in loaders.items():
                runs[name].append(
                    time_loader(
                        module, store, args.batch, args.batches, block, args.threads, warmup
                    )
                )
    if emulator:
        emulator.stop()
    out = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    if stages:
        out["stages_cpu_ms_per_batch"] = stages
    if len(loaders) == 2:
        out["cpu_ratio"] = out["baseline"]["cpu_ms_per_batch"] / out["current"]["cpu_ms_per_batch"]
        out["wall_ratio"] = out["current"]["tokens_per_s"] / out["baseline"]["tokens_per_s"]
        out["check_ratio"] = (
            out["current"]["check_rows_per_s"] / out["baseline"]["check_rows_per_s"]
        )
    if args.json:
        print(json.dumps(out))
        return
    for name in loaders:
        print(
            f"{name:<9} {out[name]['tokens_per_s']:>12,.0f} tok/s  "
            f"{out[name]['cpu_ms_per_batch']:>7.2f} CPU ms per batch of {args.batch} "
            f"({out[name]['tokens_per_cpu_s']:>10,.0f} tok/s per host core)  "
            f"NaN/Inf check {out[name]['check_rows_per_s']:>12,.0f} rows/s"
        )
    for stage, ms in (stages or {}).items():
        print(f"  {stage:<42} {ms:7.2f} CPU ms per batch of {args.batch}")
    if len(loaders) == 2:
        print(
            f"current / baseline: {out['wall_ratio']:.2f}× tokens/s, "
            f"{out['cpu_ratio']:.2f}× less CPU per batch, {out['check_ratio']:.2f}× the check's "
            f"rows/s"
        )


if __name__ == "__main__":
    main()
