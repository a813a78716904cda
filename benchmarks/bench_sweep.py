"""Lockstep sweep vs separate runs over the same data (issue 8).

    python benchmarks/bench_sweep.py --store /tmp/demo2/store --d-sae 1024,2048,4096 \\
        --tokens 204800 --batch 2048

Times `saejax sweep` (one loader, shared data statistics, N compiled steps per batch)
against N separate `train()` calls of the same members, back to back, each from a fresh
folder; prints wall seconds and the ratio (separate / lockstep).
"""

import argparse
import os
import shutil
import tempfile
import time

from saejax.config import load_config, with_values
from saejax.train.run import train
from saejax.train.sweep import members_of, run_sweep


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--hook", default=None)
    p.add_argument("--d-sae", default="1024,2048,4096")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=204800)
    p.add_argument("--batch", type=int, default=2048)
    args = p.parse_args()
    sets = [
        f"data.path={args.store}",
        f"train.tokens={args.tokens}",
        f"train.batch_size={args.batch}",
        f"sae.k={args.k}",
        "log.progress=false",
        "train.log_every=50",
        "train.checkpoint_every=1000000",
    ] + ([f"data.hook={args.hook}"] if args.hook else [])
    grid = members_of("topk", [int(v) for v in args.d_sae.split(",")], [], [])
    tmp = tempfile.mkdtemp(prefix="saejax-bench-sweep-")
    try:
        t = time.perf_counter()
        run_sweep(load_config(None, sets), grid, os.path.join(tmp, "sweep"), progress=False)
        lockstep = time.perf_counter() - t
        t = time.perf_counter()
        for name, extra in grid:
            train(
                with_values(
                    load_config(None, sets), {**extra, "run_dir": os.path.join(tmp, "alone", name)}
                )
            )
        separate = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{len(grid)} members, {args.tokens:,} tokens each: lockstep {lockstep:.1f} s, "
        f"separate {separate:.1f} s, ratio {separate / lockstep:.2f}x"
    )


if __name__ == "__main__":
    main()
