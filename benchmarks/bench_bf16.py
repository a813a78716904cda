"""bfloat16 against float32 compute, interleaved in one process so that machine noise hits
both alike: the compiled step of each architecture and the matmul peak of each dtype.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_bf16.py --arch topk,relu --d-sae 18432

Each round times `--steps` steps of every (arch, dtype) back to back, and the bf16/f32 ratio
of tokens/s is taken per round; the median round is reported.
"""

from __future__ import annotations

import argparse
import statistics

from saejax.train.bench import StepShape, StepTimer, matmul_peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="topk,relu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=18432)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    dtypes = ("float32", "bfloat16")
    peaks = {dt: [] for dt in dtypes}
    timers = {}
    for arch in args.arch.split(","):
        for dt in dtypes:
            shape = StepShape(arch, args.d_in, args.d_sae, args.batch, 32, dt)
            timers[arch, dt] = StepTimer(shape)
            timers[arch, dt].run(1)  # compile
    ratios = {arch: [] for arch in args.arch.split(",")}
    for r in range(args.rounds):
        for dt in dtypes:
            peaks[dt].append(matmul_peak(args.batch, args.d_in, args.d_sae, dt, repeats=2))
        for arch in ratios:
            tps = {dt: args.batch * args.steps / timers[arch, dt].run(args.steps) for dt in dtypes}
            ratios[arch].append(tps["bfloat16"] / tps["float32"])
            print(
                f"round {r}  {arch:<5} float32 {tps['float32']:8,.0f} tok/s  bfloat16 "
                f"{tps['bfloat16']:8,.0f} tok/s  ratio {ratios[arch][-1]:.2f}",
                flush=True,
            )
        print(
            f"round {r}  matmul peak float32 {peaks['float32'][-1] / 1e9:.1f} GFLOP/s, "
            f"bfloat16 {peaks['bfloat16'][-1] / 1e9:.1f} GFLOP/s "
            f"(ratio {peaks['bfloat16'][-1] / peaks['float32'][-1]:.2f})",
            flush=True,
        )
    for arch, values in ratios.items():
        print(f"median  {arch:<5} bf16 / f32 tokens/s {statistics.median(values):.2f}")
    peak_ratio = statistics.median(b / f for b, f in zip(peaks["bfloat16"], peaks["float32"]))
    print(f"median  matmul peak bf16 / f32 {peak_ratio:.2f}")


if __name__ == "__main__":
    main()
