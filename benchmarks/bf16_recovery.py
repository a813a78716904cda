"""Toy ground-truth recovery in bfloat16 against float32, on the shipped defaults.

Trains each architecture twice with `train()` on the same superposition data (512 known unit
directions in 64 dimensions, each active with probability 1%; tests/helpers.py), once with
`sae.dtype=float32` and once with `sae.dtype=bfloat16`, every other setting at its default,
and prints the mean max cosine between the true directions and the decoder rows.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bf16_recovery.py --arch topk,relu
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

from helpers import mean_max_cosine, superposition_data  # noqa: E402

from saejax.config import load_config  # noqa: E402
from saejax.train.run import train  # noqa: E402


def recovery(data_path: str, run_dir: str, arch: str, dtype: str, overrides: list[str]) -> dict:
    cfg = load_config(
        None,
        [
            f"data.path={data_path}",
            f"run_dir={run_dir}",
            f"sae.architecture={arch}",
            f"sae.dtype={dtype}",
            "log.progress=false",
            *overrides,
        ],
    )
    result = train(cfg)
    return {
        "mean_max_cosine": mean_max_cosine(DIRECTIONS, result.state.params["W_dec"]),
        "fvu": float(result.final_metrics.get("fvu", float("nan"))),
        "l0": float(result.final_metrics.get("l0", float("nan"))),
    }


def main() -> None:
    global DIRECTIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="topk,relu")
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("overrides", nargs="*", help="extra config settings (key=value)")
    args = parser.parse_args()
    rows, DIRECTIONS = superposition_data(args.rows)
    with tempfile.TemporaryDirectory(prefix="saejax-bf16-") as tmp:
        path = os.path.join(tmp, "rows.npy")
        np.save(path, rows)
        for arch in args.arch.split(","):
            got = {
                dtype: recovery(
                    path, os.path.join(tmp, f"{arch}-{dtype}"), arch, dtype, args.overrides
                )
                for dtype in ("float32", "bfloat16")
            }
            f32, bf16 = got["float32"], got["bfloat16"]
            print(
                f"{arch:<9} mean max cosine float32 {f32['mean_max_cosine']:.4f}  bfloat16 "
                f"{bf16['mean_max_cosine']:.4f}  (difference "
                f"{bf16['mean_max_cosine'] - f32['mean_max_cosine']:+.4f}); fvu {f32['fvu']:.4f} "
                f"vs {bf16['fvu']:.4f}; l0 {f32['l0']:.1f} vs {bf16['l0']:.1f}",
                flush=True,
            )


DIRECTIONS = None

if __name__ == "__main__":
    main()
