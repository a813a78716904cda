"""`saejax train`: the training loop around the compiled step.

The loop only dispatches work: it takes the next prefetched batch, calls the
jitted step, and every `log_every` steps fetches the metric sums in one transfer.
Resampling runs at scheduled steps on a pool of recent batches already on the
device. Checkpoints are written every `checkpoint_every` steps and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sae as S
from saejax import sharding as SH
from saejax import train_step as T
from saejax.checkpoint import Checkpointer
from saejax.config import RunConfig, dump_yaml, load_config
from saejax.data import ArraySource, Loader, sample_rows, split_rows
from saejax.errors import SaejaxError
from saejax.files import write_json_atomic
from saejax.metrics import MetricsLogger, evaluate
from saejax.saved import save_sae


@dataclass
class TrainResult:
    run_dir: str
    state: T.TrainState
    spec: S.SAESpec
    final_metrics: dict
    stopped_early: bool
    tokens_per_s: float  # over the whole call, compilation and final checkpoint included
    steady_tokens_per_s: float = 0.0  # from the end of the first (compiling) step to the last


def _resample_enabled(cfg: RunConfig) -> bool:
    enabled = cfg.train.resample.enabled
    return cfg.sae.architecture == "relu" if enabled is None else enabled


def checkpoint_info(cfg: RunConfig, d_in: int) -> dict:
    """What a checkpoint must agree on with the config that resumes it."""
    s = cfg.sae
    return {"architecture": s.architecture, "d_in": d_in, "d_sae": s.d_sae, "k": s.k,
            "batch_size": cfg.train.batch_size, "seed": cfg.train.seed, "data_seed": cfg.data.seed,
            "data_slices": data_slices(cfg)}


def data_slices(cfg: RunConfig) -> int:
    return cfg.data.slices or jax.process_count()


def data_statistics(cfg: RunConfig, source: ArraySource) -> tuple[float, np.ndarray]:
    """(input scale, initial b_dec) from a seeded sample of training rows."""
    d_in = source.d_in
    split = split_rows(source.n_rows, cfg.data.validation_tokens)
    sample = sample_rows(source, 16384, cfg.data.seed, split.train_rows)
    scale = 1.0
    if cfg.sae.scale_inputs:
        mean_norm = float(np.linalg.norm(sample, axis=1).mean())
        scale = math.sqrt(d_in) / mean_norm if mean_norm > 0 else 1.0
    sample = sample * scale
    b_dec = {"geometric_median": lambda: S.geometric_median(sample[:4096]),
             "mean": lambda: sample.mean(0), "zeros": lambda: np.zeros(d_in)}[cfg.sae.b_dec_init]()
    return scale, b_dec


def prepare(cfg: RunConfig, source: ArraySource, stats: tuple | None = None):
    """Input scale, b_dec initialisation and the initial state (deterministic in the seeds).
    `stats` reuses (scale, b_dec) already computed for the same data (sweeps)."""
    spec = S.SAESpec.from_config(cfg.sae, source.d_in)
    scale, b_dec = stats if stats is not None else data_statistics(cfg, source)
    total_steps = cfg.train.tokens // cfg.train.batch_size
    tx = T.make_optimizer(cfg.train, total_steps)
    params = S.init_params(spec, jax.random.PRNGKey(cfg.train.seed), b_dec,
                           cfg.sae.jumprelu_init_threshold)
    state = T.init_state(params, tx, cfg.train.seed, scale)
    return spec, tx, state, total_steps


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _check_run_dir(cfg: RunConfig, resume: bool) -> None:
    config_path = os.path.join(cfg.run_dir, "config.yaml")
    if not resume and os.path.exists(config_path):
        raise SaejaxError(f"run directory {cfg.run_dir} already holds a run; resume it with "
                          f"`saejax train --resume {cfg.run_dir}` or choose another run_dir")
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as e:
        raise SaejaxError(f"cannot create run directory {cfg.run_dir}: {e.strerror}") from None


def load_run_config(run_dir: str, overrides: list[str] = ()) -> RunConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise SaejaxError(f"{run_dir} is not a saejax run (no config.yaml)")
    cfg = load_config(path, overrides)
    cfg.run_dir = run_dir  # the run may have been moved since it was written
    return cfg


def train(cfg: RunConfig, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg`. `max_steps` stops early (tests, benches).

    On a mesh (cfg.mesh) the state is placed by `sharding.state_shardings` and the step is
    partitioned by XLA; in a multi-process run every process runs this same function, reads
    only its own slices of the store, and process 0 writes the logs and the final SAE.
    """
    SH.init_distributed(cfg.mesh)
    mesh = SH.make_mesh(cfg.mesh)
    n_procs, proc = jax.process_count(), jax.process_index()
    n_slices = data_slices(cfg)
    if n_slices % n_procs:
        raise SaejaxError(f"{n_procs} processes need data.slices ({n_slices}) to be a multiple "
                          f"of {n_procs}")
    is_main = proc == 0
    source = ArraySource(cfg.data.path, cfg.data.hook)
    if cfg.sae.d_in and cfg.sae.d_in != source.d_in:
        raise SaejaxError(f"sae.d_in is {cfg.sae.d_in} but the data at {cfg.data.path} has "
                          f"d_in {source.d_in}")
    _check_run_dir(cfg, resume)
    if n_procs > 1:  # nobody writes into the run directory before everyone has checked it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("saejax: run directory checked")
    spec, tx, state, total_steps = prepare(cfg, source)
    if total_steps == 0:
        raise SaejaxError(f"train.tokens ({cfg.train.tokens}) is less than one batch "
                          f"({cfg.train.batch_size})")
    shardings = SH.state_shardings(state, mesh)
    state = SH.place(state, shardings)
    info = checkpoint_info(cfg, source.d_in)
    ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.train.keep_checkpoints)
    if resume and ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state, info)
    elif resume:
        pass  # stopped before its first checkpoint: start again from step 0, same config
    elif ckpt.latest_step() is not None:
        raise SaejaxError(f"{cfg.run_dir} already has checkpoints; use --resume")
    elif is_main:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))

    start_step = int(SH.to_host(state.step, mesh))
    per_proc = n_slices // n_procs
    batch_on_mesh = SH.batch_sharding(mesh)
    loader = Loader(source, cfg.data, cfg.train.batch_size, start_batch=start_step,
                    transform=lambda rows: SH.put_batch(rows, batch_on_mesh, cfg.train.batch_size),
                    n_slices=n_slices, slices=list(range(proc * per_proc, (proc + 1) * per_proc)))
    everywhere = SH.replicated(mesh)
    step_fn = jax.jit(T.make_train_step(spec, cfg.sae, tx, total_steps), donate_argnums=0,
                      out_shardings=(shardings, everywhere))
    summarize = jax.jit(T.summarize, static_argnames="dead_tokens", donate_argnums=0,
                        out_shardings=(everywhere, shardings))
    resample_at = T.resample_steps(cfg.train, total_steps) if _resample_enabled(cfg) else set()
    pool = collections.deque(maxlen=max(1, cfg.train.resample.pool_batches))
    logger = MetricsLogger(cfg, total_steps, start_step) if is_main else None
    end_step = total_steps if max_steps is None else min(total_steps, start_step + max_steps)

    stopped = False
    t_start, step = time.perf_counter(), start_step
    t_steady = None
    try:
        # the SAE's shard_map kernels read the mesh from jax.set_mesh
        with _StopFlag() as stop, jax.set_mesh(mesh):
            while step < end_step:
                batch = next(loader)
                state, _ = step_fn(state, batch)
                step += 1
                if t_steady is None:  # one sync, after the compiling step, for the steady rate
                    jax.block_until_ready(state.step)
                    t_steady = time.perf_counter()
                if resample_at:
                    pool.append(batch)
                    if step in resample_at:
                        state = T.resample(state, jnp.concatenate(list(pool)), spec,
                                           cfg.sae.dead_tokens, cfg.train.resample.encoder_scale)
                        state = jax.device_put(state, shardings)  # no-op when already there
                if step % cfg.train.log_every == 0 or step == end_step:
                    metrics, state = summarize(state, dead_tokens=cfg.sae.dead_tokens)
                    if logger is not None:
                        logger.log(step, SH.local_values(metrics))
                if step % cfg.train.checkpoint_every == 0 and step < end_step:
                    ckpt.save(step, state, info)
                if stop.signum is not None:
                    stopped = True
                    break
        jax.block_until_ready(state.step)
        t_loop_end = time.perf_counter()
        ckpt.save(step, state, info)
        ckpt.wait()
    finally:
        loader.close()
        if logger is not None:
            logger.close()
        ckpt.close()
    elapsed = time.perf_counter() - t_start
    tokens_per_s = (step - start_step) * cfg.train.batch_size / max(elapsed, 1e-9)
    steady = 0.0
    if t_steady is not None and step - start_step > 1:
        steady = (step - start_step - 1) * cfg.train.batch_size / max(t_loop_end - t_steady, 1e-9)
    if stopped:
        print(f"\nstopped at step {step}/{total_steps}; checkpoint saved. Resume with "
              f"`saejax train --resume {cfg.run_dir}`", file=sys.stderr)
        return TrainResult(cfg.run_dir, state, spec, {}, True, tokens_per_s, steady)

    final = {}
    if step == total_steps:
        params, scale = SH.to_host((state.params, state.input_scale), mesh)  # collective
        if is_main:
            final = evaluate(jax.tree_util.tree_map(jnp.asarray, params), spec, float(scale),
                             source, cfg.data)
            final["tokens_per_s"] = tokens_per_s
            final["steps"] = step
            save_sae(os.path.join(cfg.run_dir, "sae"), params, spec, float(scale), cfg,
                     source.meta, source.hook)
            write_json_atomic(os.path.join(cfg.run_dir, "eval.json"), final)
    return TrainResult(cfg.run_dir, state, spec, final, False, tokens_per_s, steady)
