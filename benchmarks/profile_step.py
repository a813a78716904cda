"""Where one training step's time goes: a jax.profiler trace of `saejax bench`'s step,
summed per op.

    python benchmarks/profile_step.py --arch topk --d-sae 18432      # d_in 576, batch 4096

Prints milliseconds per step for the most expensive ops of the compiled step (XLA fusions,
the C++ kernels' ffi_calls, ...), averaged over --steps traced steps after warm-up.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax

from saejax.train.bench import StepShape, StepTimer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="topk")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=18432)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="ops to list")
    args = p.parse_args()

    timer = StepTimer(StepShape(args.arch, args.d_in, args.d_sae, args.batch, args.k))
    timer.run(2)  # compile and warm up
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        seconds = timer.run(args.steps)
        jax.profiler.stop_trace()
        trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[
            -1
        ]
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor", "PjitFunction")):
            total[e["name"]] += e["dur"]
    print(f"{args.arch} d_sae {args.d_sae}: {1e3 * seconds / args.steps:.1f} ms per step")
    for name, micros in total.most_common(args.top):
        print(f"{micros / args.steps / 1e3:9.1f} ms  {name}")


if __name__ == "__main__":
    main()
