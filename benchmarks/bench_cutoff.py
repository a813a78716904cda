"""BatchTopK's batch cutoff and AuxK's per-row k-th largest: a sort against the counts.

Times, in one process on random ReLU'd pre-activations, the ways to find (a) the (k·rows)-th
largest entry of a batch: `lax.top_k` over the flattened batch (a sort), a bit-by-bit count
over the whole batch, and saejax's search among each row's 4k largest; (b) each row's aux_k-th
largest: `lax.top_k` and saejax's selection (the C++ kernel where it is built). Each is
checked against the first before it is timed.

    python benchmarks/bench_cutoff.py --rows 4096 --d-sae 16384 --k 32 --aux-k 512
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from saejax.core import sae as S


def best_ms(fn, x, repeats: int) -> float:
    fn(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--aux-k", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    pre = jax.nn.relu(jax.random.normal(jax.random.key(0), (args.rows, args.d_sae)))
    n_keep, kernels = args.k * args.rows, S.sparse_kernels("auto")
    cutoffs = {
        "sort (lax.top_k of the flattened batch)": lambda p: jax.lax.top_k(p.reshape(-1), n_keep)[
            0
        ][-1],
        "count over the whole batch": lambda p: S.kth_largest_across(
            p.reshape(1, -1), n_keep, None
        )[0, 0],
        f"count among each row's {S.CANDIDATE_FACTOR}k largest ({kernels})": lambda p: (
            S._batchtopk_cutoff(p, args.k, kernels)
        ),
    }
    per_row = {
        "lax.top_k per row": lambda p: jax.lax.top_k(p, args.aux_k)[0][:, -1:],
        f"saejax ({kernels})": lambda p: S._kth_largest_per_row(p, args.aux_k, kernels),
    }
    print(f"{args.rows} rows x {args.d_sae} latents, k {args.k}, aux_k {args.aux_k}")
    for title, table in (("batch cutoff", cutoffs), ("per-row k-th largest", per_row)):
        reference = None
        for name, fn in table.items():
            fn = jax.jit(fn)
            value = fn(pre)
            reference = value if reference is None else reference
            assert jnp.array_equal(value, reference), name
            print(f"{title:22s} {name:48s} {best_ms(fn, pre, args.repeats):10.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
