"""`saejax bench`: how fast the training step, the loader and the whole loop run here.

For each architecture and dictionary size: tokens/s of the compiled step on random
activations already on the device, and the fraction of the machine's measured matmul
peak it reaches (counting 2·d_in·d_sae FLOPs per token for every dense matmul the step
does: six for a dense SAE, one for TopK on the sparse kernels). Then, for the first
configuration, the loader's tokens/s from a store on disk and the whole training
loop's steady tokens/s from that store, as a fraction of the step's own.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from saejax.errors import SaejaxError


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training-step, loader and loop throughput on this machine")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", default="4608,18432", help="comma list")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arch", default="relu,topk", help="comma list of relu, topk, batchtopk, jumprelu")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--topk-kernel", default="sparse", help="sparse (default) or dense")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--store", default=None,
                   help="store for the loader and loop figures (default: a temporary one of "
                        "random rows)")
    p.add_argument("--no-loop", action="store_true", help="skip the loader and loop figures")
    p.add_argument("--loop-rounds", type=int, default=3,
                   help="loop timings, each against the step timed beside it; the median is "
                        "reported")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_bench)


ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass(frozen=True)
class StepShape:
    arch: str
    d_in: int
    d_sae: int
    batch: int
    k: int = 32
    dtype: str = "float32"
    topk_kernel: str = "sparse"

    @property
    def dense_matmuls(self) -> int:
        """Dense [batch, d_in] × [d_in, d_sae]-sized matmuls per step (forward + backward)."""
        return 1 if self.arch == "topk" and self.topk_kernel == "sparse" else 6


def run_config(shape: StepShape, data_path: str = "", run_dir: str = ""):
    from saejax.config import load_config

    return load_config(None, [
        f"sae.architecture={shape.arch}", f"sae.d_sae={shape.d_sae}", f"sae.k={shape.k}",
        f"sae.dtype={shape.dtype}", f"sae.topk_kernel={shape.topk_kernel}",
        f"train.batch_size={shape.batch}", "train.tokens=1000000000000",
        "train.log_every=1000000", "train.checkpoint_every=1000000",
        "train.resample.enabled=false", "log.progress=false",
        f"data.path={data_path}", f"run_dir={run_dir or 'unused'}",
        f"data.validation_tokens={shape.batch}"], check=bool(data_path))


def time_steps(step, state, batch, steps: int):
    """(seconds, state) for `steps` calls of a jitted step on one batch, dispatched back to
    back with one sync at the end. The step may donate `state`: use the returned one."""
    import jax

    t = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - t, state


class StepTimer:
    """The compiled training step of one shape on a fixed random batch on the device."""

    def __init__(self, shape: StepShape, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from saejax import sae as S
        from saejax import train_step as T

        cfg = run_config(shape)
        spec = S.SAESpec.from_config(cfg.sae, shape.d_in)
        tx = T.make_optimizer(cfg.train, 1_000_000)
        params = S.init_params(spec, jax.random.PRNGKey(seed))
        self.state = T.init_state(params, tx, seed, 1.0)
        rows = np.random.default_rng(seed).normal(size=(shape.batch, shape.d_in))
        self.batch = jax.device_put(jnp.asarray(rows, jnp.float32))
        self.step = jax.jit(T.make_train_step(spec, cfg.sae, tx, 1_000_000), donate_argnums=0)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps."""
        seconds, self.state = time_steps(self.step, self.state, self.batch, steps)
        return seconds


def matmul_peak(batch: int, d_in: int, d_sae: int, dtype: str, repeats: int = 3) -> float:
    """FLOP/s of a jitted [batch, d_in] × [d_in, d_sae] matmul (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, d_in)), dt)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(d_in, d_sae)), dt)
    mm = jax.jit(lambda a, b: a @ b)
    mm(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * batch * d_in * d_sae / best


def _kernel_name(shape: StepShape) -> str | None:
    """'sparse/c++' (the CPU kernels), 'sparse/xla' (XLA's primitives) or 'dense'; None if not TopK."""
    if shape.arch != "topk":
        return None
    if shape.topk_kernel != "sparse":
        return shape.topk_kernel
    from saejax import cpu_kernels
    return "sparse/c++" if cpu_kernels.enabled() else "sparse/xla"


def bench_step(shape: StepShape, steps: int, peak: float, timer: StepTimer | None = None) -> dict:
    if timer is None:
        timer = StepTimer(shape)
        timer.run(2)  # compile and warm up
    seconds = timer.run(steps)
    tokens_per_s = shape.batch * steps / seconds
    flops = tokens_per_s * shape.dense_matmuls * 2.0 * shape.d_in * shape.d_sae
    return {"arch": shape.arch, "d_sae": shape.d_sae, "d_in": shape.d_in, "batch": shape.batch,
            "k": shape.k if shape.arch in ("topk", "batchtopk") else None, "dtype": shape.dtype,
            "topk_kernel": _kernel_name(shape),
            "tokens_per_s": tokens_per_s, "step_ms": 1000.0 * seconds / steps,
            "dense_matmuls": shape.dense_matmuls, "flops_per_s": flops,
            "fraction_of_peak": flops / peak}


def synthetic_store(path: str, n_rows: int, d_in: int, dtype: str = "bfloat16") -> str:
    """A store of random rows written with the store's own primitives (for the loop figure)."""
    from saejax import store as st

    rng = np.random.default_rng(0)
    chunk = max(1, (4 << 20) // (d_in * 2))
    meta = {"format_version": 1, "model": "synthetic (saejax bench)", "hooks": ["bench"],
            "hook_d_in": {"bench": d_in}, "d_in": d_in, "dtype": dtype, "context_size": 128,
            "prepend_bos": False, "bos_dropped": False, "n_tokens": 0, "chunk_rows": chunk,
            "vocab_size": 1, "complete": False}
    os.makedirs(path, exist_ok=True)
    acts = st.create_array(path, "acts/bench", [n_rows, d_in], [chunk, d_in], dtype)
    tokens = st.create_array(path, "tokens", [n_rows], [chunk], "int32")
    doc = st.create_array(path, "doc", [n_rows, 2], [chunk, 2], "int32")
    for first in range(0, n_rows, chunk):
        last = min(n_rows, first + chunk)
        rows = rng.normal(size=(last - first, d_in)).astype(np.float32)
        acts[first:last].write(rows.astype(acts.dtype.numpy_dtype)).result()
        tokens[first:last].write(np.zeros(last - first, np.int32)).result()
        idx = np.arange(first, last)
        doc[first:last].write(np.stack([idx // 128, idx % 128], 1).astype(np.int32)).result()
    meta.update(n_tokens=n_rows, complete=True, mean_norm={"bench": float(np.sqrt(d_in))})
    st.write_meta(path, meta)
    return path


def bench_loader(store_path: str, shape: StepShape, batches: int,
                 data_module=None) -> tuple[float, float]:
    """(tokens/s, host CPU ms per batch) of the loader alone: reads, NaN/Inf check, shuffle
    gather, device transfer. The CPU figure is what a faster device would ask of the host.
    Timed from the loader's start, so work done once per shuffle group counts: time several
    epochs of a small store, or many groups of a large one. `data_module` times another
    version of saejax.data (benchmarks/bench_loader.py)."""
    import jax

    if data_module is None:
        from saejax import data as data_module

    cfg = run_config(shape, store_path)
    source = data_module.ArraySource(store_path, None)
    cpu, wall = time.process_time(), time.perf_counter()
    loader = data_module.Loader(source, cfg.data, shape.batch, transform=jax.device_put)
    try:
        for _ in range(batches):
            next(loader)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return shape.batch * batches / wall, 1000.0 * cpu / batches
    finally:
        loader.close()


def bench_loop(store_path: str, shape: StepShape, steps: int) -> float:
    """Steady tokens/s of `train()` itself on the store (loader, step, counters, all of it)."""
    from saejax.train import train

    with tempfile.TemporaryDirectory(prefix="saejax-bench-run-") as run_dir:
        cfg = run_config(shape, store_path, os.path.join(run_dir, "run"))
        result = train(cfg, max_steps=steps + 1)
    return result.steady_tokens_per_s


def run_bench(shapes: list[StepShape], steps: int, store: str | None, loop: bool,
              say=lambda line: None, loop_rounds: int = 3) -> dict:
    import jax

    first = shapes[0]
    peak = matmul_peak(first.batch, first.d_in, max(s.d_sae for s in shapes), first.dtype)
    say(f"device      {jax.devices()[0].platform} × {jax.device_count()}; matmul peak "
        f"{peak / 1e9:,.1f} GFLOP/s ({first.batch}×{first.d_in} @ {first.d_in}×"
        f"{max(s.d_sae for s in shapes)}, {first.dtype})")
    results = []
    first_timer = StepTimer(first)
    first_timer.run(2)
    for shape in shapes:
        r = bench_step(shape, steps, peak, first_timer if shape is first else None)
        results.append(r)
        kernel = f" [{r['topk_kernel']}]" if r["topk_kernel"] else ""
        say(f"step        {shape.arch:<9}{kernel:<9} d_sae {shape.d_sae:>7,}  "
            f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_ms']:>8.1f} ms/step  "
            f"{100 * r['fraction_of_peak']:5.1f}% of peak ({r['dense_matmuls']} dense matmuls)")
    out = {"device": str(jax.devices()[0]), "n_devices": jax.device_count(),
           "matmul_peak_flops": peak, "results": results}
    if loop:
        with tempfile.TemporaryDirectory(prefix="saejax-bench-store-") as tmp:
            path = store
            if path is None:
                say("store       writing a temporary store of random rows ...")
                path = synthetic_store(os.path.join(tmp, "store"),
                                       first.batch * (max(steps, 20) + 2), first.d_in)
            # three passes over the (one-epoch) store: its group reads and shuffles count
            loader_tps, loader_cpu_ms = bench_loader(path, first, 3 * max(steps, 20))
            # Rounds of (loop, step): each loop is compared with the step timed on either side
            # of it, and the median round is reported; one round swings by ±3% on a shared box.
            rounds, step_before = [], results[0]["tokens_per_s"]
            for _ in range(loop_rounds):
                loop_tps = bench_loop(path, first, steps)
                step_after = bench_step(first, steps, peak, first_timer)["tokens_per_s"]
                step_tps = 0.5 * (step_before + step_after)
                rounds.append({"tokens_per_s": loop_tps, "step_tokens_per_s": step_tps,
                               "fraction_of_step": loop_tps / step_tps})
                step_before = step_after
        median = sorted(rounds, key=lambda r: r["fraction_of_step"])[len(rounds) // 2]
        loop_tps, step_tps = median["tokens_per_s"], median["step_tokens_per_s"]
        out["loader_tokens_per_s"] = loader_tps
        out["loader_cpu_ms_per_batch"] = loader_cpu_ms
        out["loop"] = {"arch": first.arch, "d_sae": first.d_sae, **median, "rounds": rounds}
        say(f"loader      {loader_tps:>10,.0f} tok/s from the store on disk, {loader_cpu_ms:.1f} host "
            f"CPU ms per batch")
        say(f"loop        {loop_tps:>10,.0f} tok/s = {loop_tps / step_tps:.3f} × the step's own "
            f"({first.arch}, d_sae {first.d_sae:,}; median of {len(rounds)} rounds: "
            f"{', '.join(format(r['fraction_of_step'], '.3f') for r in rounds)})")
    return out


def _cmd_bench(args) -> int:
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            raise SaejaxError(f"unknown --arch '{a}'; choose from {', '.join(ARCHS)}")
    try:
        sizes = [int(v) for v in args.d_sae.split(",") if v.strip()]
    except ValueError:
        raise SaejaxError(f"--d-sae must be a comma list of whole numbers, got '{args.d_sae}'") from None
    if args.dtype not in ("float32", "bfloat16"):
        raise SaejaxError(f"unknown --dtype '{args.dtype}'; choose float32 or bfloat16")
    if args.topk_kernel not in ("sparse", "dense"):
        raise SaejaxError(f"unknown --topk-kernel '{args.topk_kernel}'; choose sparse or dense")
    if (not sizes or min(sizes) < 1 or args.d_in < 1 or args.batch < 1 or args.steps < 1
            or args.loop_rounds < 1):
        raise SaejaxError("--d-in, --d-sae, --batch, --steps and --loop-rounds must be positive")
    if any(a in ("topk", "batchtopk") for a in archs) and not 0 < args.k <= min(sizes):
        raise SaejaxError(f"--k {args.k} must be between 1 and the smallest --d-sae")
    if args.store is not None:
        from saejax.store import ActivationStore
        store = ActivationStore.open(args.store)
        if store.d_in != args.d_in:
            raise SaejaxError(f"--store {args.store} has d_in {store.d_in} but --d-in is {args.d_in}")
    shapes = [StepShape(a, args.d_in, d, args.batch, args.k, args.dtype, args.topk_kernel)
              for a in archs for d in sizes]
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    out = run_bench(shapes, args.steps, args.store, not args.no_loop, say, args.loop_rounds)
    if args.json:
        print(json.dumps(out))
    return 0
