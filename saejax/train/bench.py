"""`saejax bench`: how fast the training step, the loader and the whole loop run here.

For each architecture and dictionary size: tokens/s of the compiled step on random
activations already on the device, and the fraction of the machine's measured matmul
peak it reaches (counting 2·d_in·d_sae FLOPs per token for every dense matmul the step
does: six for a dense SAE, one for TopK on the sparse kernels). Then, for the first
configuration, the loader's tokens/s and tokens/s per host core (process CPU time) from
a store (on disk, or gs:// / s3://) and the whole training loop's steady tokens/s from
that store, as a fraction of the step's own. `--loader-only` measures the loader alone.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from saejax.core.architectures import selects_top_k, uses_sparse_kernels


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
        dense = self.topk_kernel == "dense"
        return 1 if uses_sparse_kernels(self.arch, "dense" if dense else "sparse") else 6


def run_config(shape: StepShape, data_path: str = "", run_dir: str = ""):
    from saejax.config import RunConfig, with_values

    return with_values(
        RunConfig(),
        {
            "sae.architecture": shape.arch,
            "sae.d_sae": shape.d_sae,
            "sae.k": shape.k,
            "sae.dtype": shape.dtype,
            "sae.topk_kernel": shape.topk_kernel,
            "train.batch_size": shape.batch,
            "train.tokens": 1_000_000_000_000,
            "train.lr_schedule": "constant",  # no decay to place in an endless run
            "train.log_every": 1_000_000,
            "train.checkpoint_every": 1_000_000,
            "train.resample.enabled": False,
            "log.progress": False,
            "data.path": data_path,
            "run_dir": run_dir or "unused",
            "data.validation_tokens": shape.batch,
        },
        check=bool(data_path),
    )


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

        from saejax.core import sae as S
        from saejax.train import step as T
        from saejax.train.setup import spec_from_config

        cfg = run_config(shape)
        spec = spec_from_config(cfg.sae, shape.d_in)
        tx = T.make_optimizer(cfg.train, 1_000_000, cfg.sae)
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
    """FLOP/s of the fastest jitted [batch, d_in] × [d_in, d_sae] matmul with operands in
    `dtype` (best of `repeats`). Below float32 both forms are timed, output in `dtype` and
    output (and accumulation) in float32, and the faster counts: XLA:CPU runs bf16 × bf16
    → float32 about 2.5x faster than bf16 → bf16 on CPUs with bf16 dot instructions."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, d_in)), dt)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(d_in, d_sae)), dt)
    outputs = [None] if dt == jnp.float32 else [None, jnp.float32]
    best = float("inf")
    for out in outputs:
        mm = jax.jit(lambda a, b, out=out: jnp.matmul(a, b, preferred_element_type=out))
        mm(x, w).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            mm(x, w).block_until_ready()
            best = min(best, time.perf_counter() - t)
    return 2.0 * batch * d_in * d_sae / best


def _kernel_name(shape: StepShape) -> str | None:
    """'sparse/c++' (the CPU kernels), 'sparse/xla' (XLA's primitives), 'sparse/pallas' or
    'dense'; None if not TopK."""
    if shape.arch != "topk":
        return None
    if shape.topk_kernel == "dense":
        return "dense"
    from saejax.core.sae import sparse_kernels

    kernels = sparse_kernels(shape.topk_kernel)
    return "sparse/" + ("c++" if kernels == "cpp" else kernels)


def bench_step(shape: StepShape, steps: int, peak: float, timer: StepTimer | None = None) -> dict:
    if timer is None:
        timer = StepTimer(shape)
        timer.run(2)  # compile and warm up
    seconds = timer.run(steps)
    tokens_per_s = shape.batch * steps / seconds
    flops = tokens_per_s * shape.dense_matmuls * 2.0 * shape.d_in * shape.d_sae
    return {
        "arch": shape.arch,
        "d_sae": shape.d_sae,
        "d_in": shape.d_in,
        "batch": shape.batch,
        "k": shape.k if selects_top_k(shape.arch) else None,
        "dtype": shape.dtype,
        "topk_kernel": _kernel_name(shape),
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000.0 * seconds / steps,
        "dense_matmuls": shape.dense_matmuls,
        "flops_per_s": flops,
        "fraction_of_peak": flops / peak,
    }


def synthetic_store(path: str, n_rows: int, d_in: int, dtype: str = "bfloat16") -> str:
    """A store of random rows written with the store's own primitives (for the loop figure)."""
    from saejax import store as st

    rng = np.random.default_rng(0)
    chunk = max(1, (4 << 20) // (d_in * 2))
    meta = st.new_meta(
        "synthetic (saejax bench)", {"bench": d_in}, dtype, 128, chunk, vocab_size=1, complete=False
    )
    if not st.is_remote(path):
        os.makedirs(path, exist_ok=True)
    acts, tokens, doc = st.create_arrays(path, meta, n_rows)
    acts = acts["bench"]
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


def bench_loader(
    store_path: str,
    shape: StepShape,
    batches: int,
    data_module=None,
    loader_threads: int = 0,
    warmup: int = 0,
) -> dict:
    """The loader alone (reads, NaN/Inf check, shuffle gather, device transfer):
    `tokens_per_s` (wall), `cpu_ms_per_batch` (the process's CPU time, every thread) and
    `tokens_per_cpu_s`, its tokens per second of one host core: what a faster device would
    ask of the host, and how many cores would feed it. Timed after `warmup` batches (the
    first touch of the loader's buffers, JAX's start), so work done once per shuffle group
    still counts: time several epochs of a small store, or many groups of a large one.
    `data_module` times another version of saejax.train.data (benchmarks/bench_loader.py);
    `loader_threads` sets data.loader_threads (0: the default)."""
    import jax

    from saejax.config import with_values

    if data_module is None:
        from saejax.train import data as data_module

    cfg = with_values(run_config(shape, store_path), {"data.loader_threads": loader_threads})
    source = data_module.ArraySource(store_path, None)
    loader = data_module.Loader(source, cfg.data, shape.batch, transform=jax.device_put)
    try:
        for _ in range(warmup):
            next(loader)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(loader)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        loader.close()
    tokens = shape.batch * batches
    return {
        "tokens_per_s": tokens / wall,
        "cpu_ms_per_batch": 1000.0 * cpu / batches,
        "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
        "threads": loader.threads,
        "batches": batches,
        "warmup": warmup,
    }


def describe_loader(r: dict, where: str) -> str:
    return (
        f"loader      {r['tokens_per_s']:>10,.0f} tok/s from {where}, "
        f"{r['cpu_ms_per_batch']:.1f} host CPU ms per batch = "
        f"{r['tokens_per_cpu_s']:,.0f} tok/s per host core (loader threads: {r['threads']})"
    )


def store_place(path: str | None) -> str:
    """How the bench names where it read from."""
    if path is None:
        return "a temporary store on disk"
    from saejax.store import is_remote

    return path if is_remote(path) else f"the store on disk ({path})"


def run_loader_bench(
    shape: StepShape, batches: int, store: str | None, loader_threads: int = 0, say=print
) -> dict:
    """`saejax bench --loader-only`: the loader alone, from `store` (a local path or a
    gs:// / s3:// prefix) or from a temporary store of random rows; one epoch of warm-up,
    then `batches` batches timed."""
    with tempfile.TemporaryDirectory(prefix="saejax-bench-store-") as tmp:
        path = store
        if path is None:
            say("store       writing a temporary store of random rows ...")
            path = synthetic_store(
                os.path.join(tmp, "store"), shape.batch * (batches + 2), shape.d_in
            )
        from saejax.store import ActivationStore

        n_batches = max(1, (len(ActivationStore.open(path)) - shape.batch) // shape.batch)
        r = bench_loader(
            path, shape, batches, loader_threads=loader_threads, warmup=min(n_batches, batches)
        )
    say(describe_loader(r, store_place(store)))
    return {"loader": {**r, "store": store_place(store), "d_in": shape.d_in, "batch": shape.batch}}


def bench_loop(store_path: str, shape: StepShape, steps: int) -> float:
    """Steady tokens/s of `train()` itself on the store (loader, step, counters, all of it)."""
    from saejax.train.run import train

    with tempfile.TemporaryDirectory(prefix="saejax-bench-run-") as run_dir:
        cfg = run_config(shape, store_path, os.path.join(run_dir, "run"))
        result = train(cfg, max_steps=steps + 1)
    return result.steady_tokens_per_s


def run_bench(
    shapes: list[StepShape],
    steps: int,
    store: str | None,
    loop: bool,
    say=lambda line: None,
    loop_rounds: int = 3,
    loader_threads: int = 0,
) -> dict:
    import jax

    first = shapes[0]
    peak = matmul_peak(first.batch, first.d_in, max(s.d_sae for s in shapes), first.dtype)
    say(
        f"device      {jax.devices()[0].platform} × {jax.device_count()}; matmul peak "
        f"{peak / 1e9:,.1f} GFLOP/s ({first.batch}×{first.d_in} @ {first.d_in}×"
        f"{max(s.d_sae for s in shapes)}, {first.dtype})"
    )
    results = []
    first_timer = StepTimer(first)
    first_timer.run(2)
    for shape in shapes:
        r = bench_step(shape, steps, peak, first_timer if shape is first else None)
        results.append(r)
        kernel = f" [{r['topk_kernel']}]" if r["topk_kernel"] else ""
        say(
            f"step        {shape.arch:<9}{kernel:<9} d_sae {shape.d_sae:>7,}  "
            f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_ms']:>8.1f} ms/step  "
            f"{100 * r['fraction_of_peak']:5.1f}% of peak ({r['dense_matmuls']} dense matmuls)"
        )
    out = {
        "device": str(jax.devices()[0]),
        "n_devices": jax.device_count(),
        "matmul_peak_flops": peak,
        "results": results,
    }
    if loop:
        with tempfile.TemporaryDirectory(prefix="saejax-bench-store-") as tmp:
            path = store
            if path is None:
                say("store       writing a temporary store of random rows ...")
                path = synthetic_store(
                    os.path.join(tmp, "store"), first.batch * (max(steps, 20) + 2), first.d_in
                )
            # a pass to warm up, then three over the (one-epoch) store: its group reads and
            # shuffles count
            loader = bench_loader(
                path,
                first,
                3 * max(steps, 20),
                loader_threads=loader_threads,
                warmup=max(steps, 20),
            )
            # Rounds of (loop, step): each loop is compared with the step timed on either side
            # of it, and the median round is reported; one round swings by ±3% on a shared box.
            rounds, step_before = [], results[0]["tokens_per_s"]
            for _ in range(loop_rounds):
                loop_tps = bench_loop(path, first, steps)
                step_after = bench_step(first, steps, peak, first_timer)["tokens_per_s"]
                step_tps = 0.5 * (step_before + step_after)
                rounds.append(
                    {
                        "tokens_per_s": loop_tps,
                        "step_tokens_per_s": step_tps,
                        "fraction_of_step": loop_tps / step_tps,
                    }
                )
                step_before = step_after
        median = sorted(rounds, key=lambda r: r["fraction_of_step"])[len(rounds) // 2]
        loop_tps, step_tps = median["tokens_per_s"], median["step_tokens_per_s"]
        out["loader_tokens_per_s"] = loader["tokens_per_s"]
        out["loader_cpu_ms_per_batch"] = loader["cpu_ms_per_batch"]
        out["loader"] = {**loader, "store": store_place(store)}
        out["loop"] = {"arch": first.arch, "d_sae": first.d_sae, **median, "rounds": rounds}
        say(describe_loader(loader, store_place(store)))
        say(
            f"loop        {loop_tps:>10,.0f} tok/s = {loop_tps / step_tps:.3f} × the step's own "
            f"({first.arch}, d_sae {first.d_sae:,}; median of {len(rounds)} rounds: "
            f"{', '.join(format(r['fraction_of_step'], '.3f') for r in rounds)})"
        )
    return out
