"""`saejax sweep`: several SAEs trained in lockstep on the same batches, then compared.

One loader reads and shuffles the data once per step and every member's compiled step
consumes the same batch, all in ONE compiled program (one dispatch per batch; XLA runs the
members one after another with all cores each, where separately dispatched programs would
fight over the CPU's thread pool). The data statistics (input scale, b_dec initialisation)
are computed once. Members differ in d_sae and k (TopK family) or λ (relu, gated). Each member is
a normal run directory (config, metrics, checkpoints, eval, sae/) under OUT/, so `saejax
eval`, `export`, `features`, `dashboard` work on each. Checkpoints are written for all
members at the same steps; running the same command again resumes (or, at the final step,
only finishes: evaluates and saves every member). The sweep holds the lock of OUT/ and of
every member; a start that fails before any checkpoint removes exactly what it created; a
run again that changes what the members train needs `force`. `sweep_table` writes the
comparison.
"""

from __future__ import annotations

import contextlib
import os
import sys
from itertools import product

import jax
import jax.numpy as jnp

from saejax import io
from saejax.config import RunConfig, dump_yaml, with_values
from saejax.core.architectures import has_l1_penalty, selects_top_k
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.bench import time_steps
from saejax.train.checkpoint import Checkpointer, data_identity
from saejax.train.data import ArraySource, Loader
from saejax.train.loop import Member, finish, refill_batches, run_loop
from saejax.train.metrics import MetricsLogger
from saejax.train.run import has_checkpoint, load_run_config
from saejax.train.rundir import (
    Created,
    RunLock,
    check_resume_config,
    record_config_change,
    validate,
)
from saejax.train.setup import checkpoint_info, data_statistics, prepare, resample_enabled


def members_of(
    arch: str, d_saes: list[int], ks: list[int], l1s: list[float], lrs: list[float] = ()
) -> list[tuple[str, dict]]:
    """(member name, config values) for every combination of the sizes with k (TopK family)
    or λ (relu, gated), and with the learning rates when given."""
    if not d_saes:
        raise SaejaxError("--d-sae needs at least one size, e.g. --d-sae 1024,2048,4096")
    if ks and not selects_top_k(arch):
        raise SaejaxError(f"--k applies to topk and batchtopk, not {arch}")
    if l1s and not has_l1_penalty(arch):
        raise SaejaxError(f"--l1 applies to relu and gated, not {arch}")
    if selects_top_k(arch) and ks:
        grid = [(f"d{d}_k{k}", {"sae.d_sae": d, "sae.k": k}) for d, k in product(d_saes, ks)]
    elif l1s:
        grid = [
            (f"d{d}_l1_{l1:g}", {"sae.d_sae": d, "sae.l1_coefficient": l1})
            for d, l1 in product(d_saes, l1s)
        ]
    else:
        grid = [(f"d{d}", {"sae.d_sae": d}) for d in d_saes]
    if lrs:
        grid = [
            (f"{name}_lr{lr:g}", {**values, "train.lr": lr})
            for (name, values), lr in product(grid, lrs)
        ]
    names = [name for name, _ in grid]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise SaejaxError(f"the sweep lists a member twice ({', '.join(repeated)})")
    return grid


def run_sweep(
    base: RunConfig,
    grid: list[tuple[str, dict]],
    out: str,
    progress: bool = True,
    max_steps: int | None = None,
    force: bool = False,
) -> list[dict]:
    """Train the grid's members in lockstep; `max_steps` stops early (checkpointed), as a test
    would; `force` lets a run again change what the members train."""
    cfgs = [
        (name, with_values(base, {**values, "run_dir": os.path.join(out, name)}))
        for name, values in grid
    ]
    if base.mesh.data * base.mesh.model > 1:
        raise SaejaxError("sweeps run on one device for now (mesh: {data: 1, model: 1})")
    validate(base)
    if base.train.tokens // base.train.batch_size == 0:
        raise SaejaxError(
            f"train.tokens ({base.train.tokens}) is less than one batch ({base.train.batch_size})"
        )
    created = Created()
    failed = False
    with contextlib.ExitStack() as locks:
        try:
            held = [locks.enter_context(RunLock(out, created))]
            held += [locks.enter_context(RunLock(cfg.run_dir, created)) for _, cfg in cfgs]
        except BaseException:  # one is held by another process: leave no folder we created
            locks.close()
            created.remove_empty()
            raise
        try:
            return _sweep(base, cfgs, out, progress, max_steps, force, created)
        except BaseException:
            failed = not any(has_checkpoint(cfg.run_dir) for _, cfg in cfgs)
            if failed:  # nothing to resume: leave OUT/ as it was before this call
                created.undo(keep=tuple(lock.path for lock in held))
            raise
        finally:
            if failed:
                for lock in held:
                    lock.release()
                created.remove_empty()


def _sweep(
    base: RunConfig,
    cfgs: list[tuple[str, RunConfig]],
    out: str,
    progress: bool,
    max_steps: int | None,
    force: bool,
    created: Created,
) -> list[dict]:
    source = ArraySource(base.data.path, base.data.hook)
    changes = {}
    for name, cfg in cfgs:
        if os.path.exists(os.path.join(cfg.run_dir, "config.yaml")):
            changes[name] = check_resume_config(load_run_config(cfg.run_dir), cfg, force)
    stats = data_statistics(base, source)
    members = []
    for name, cfg in cfgs:
        spec, tx, state, total_steps = prepare(cfg, source, stats)
        if name not in changes:
            io.write_text(created.add(os.path.join(cfg.run_dir, "config.yaml")), dump_yaml(cfg))
        cfg.log.progress = False  # one progress bar for the sweep, not one per member
        members.append(
            Member(
                name,
                cfg,
                spec,
                state,
                summarize=jax.jit(T.summarize, static_argnames="dead_tokens", donate_argnums=0),
                ckpt=Checkpointer(
                    created.add(os.path.join(cfg.run_dir, "checkpoints")),
                    cfg.train.keep_checkpoints,
                ),
                info={**checkpoint_info(cfg, source.d_in), **data_identity(source, cfg.data)},
                resample_at=T.resample_steps(cfg.train, total_steps)
                if resample_enabled(cfg)
                else set(),
                step_fn=T.make_train_step(spec, cfg.sae, tx, total_steps),
            )
        )
    total_steps = base.train.tokens // base.train.batch_size
    start = _restore(members, out, force)
    for m in members:
        if changes.get(m.name):
            record_config_change(m.cfg, changes[m.name], start)
        created.add(os.path.join(m.cfg.run_dir, "metrics.jsonl"))
        m.logger = MetricsLogger(m.cfg, total_steps, start, d_in=source.d_in)
    resample_at = set().union(*(m.resample_at for m in members))
    refill = refill_batches(resample_at, start, base.train.resample.pool_batches)
    loader = Loader(  # its first `refill` batches refill the resampling pool
        source,
        base.data,
        base.train.batch_size,
        start_batch=start - refill,
        transform=jax.device_put,
    )
    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start,
        unit="step",
        desc=f"sweep ×{len(members)}",
        disable=not progress,
        file=sys.stderr,
    )
    step_fns = [m.step_fn for m in members]
    all_steps = jax.jit(
        lambda states, batch: tuple(f(s, batch)[0] for f, s in zip(step_fns, states)),
        donate_argnums=0,
    )
    end_step = total_steps if max_steps is None else min(total_steps, max_steps)
    try:
        loop = run_loop(
            members,
            lambda states, batch: all_steps(tuple(states), batch),
            loader,
            start,
            end_step,
            base.train.resample.pool_batches,
            bar=bar,
            refill=refill,
        )
    except BaseException:
        for m in members:
            m.logger.close()
        raise
    finally:
        bar.close()
        loader.close()
        for m in members:
            m.ckpt.close()
    if loop.stopped:
        for m in members:
            m.logger.close()
        print(
            f"\nstopped at step {loop.step}/{total_steps}; run the same command to resume",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    batch = loop.last_batch
    if batch is None:  # nothing trained in this call (a finished sweep run again)
        first = Loader(source, base.data, base.train.batch_size, transform=jax.device_put)
        batch = next(first)
        first.close()
    trained = loop.step - start
    rows = []
    for m in members:
        alone = _tokens_per_s_alone(m.step_fn, m.state, batch)
        final = finish(
            m.cfg,
            m.spec,
            m.state.params,
            float(m.state.input_scale),
            source,
            {
                "steps": loop.step,
                "tokens_per_s": alone,
                "sweep_tokens_per_s": trained * base.train.batch_size / max(loop.seconds, 1e-9),
            },
        )
        m.logger.log_final(final)  # the held-out evaluation reaches TensorBoard/wandb too
        m.logger.close()
        rows.append(
            {
                "name": m.name,
                "run_dir": m.cfg.run_dir,
                "architecture": m.spec.architecture,
                "d_sae": m.spec.d_sae,
                "k": m.spec.k if selects_top_k(m.spec.architecture) else None,
                "l1": m.cfg.sae.l1_coefficient if has_l1_penalty(m.spec.architecture) else None,
                "fvu": final["fvu"],
                "l0": final["l0"],
                "dead_fraction": final["dead_fraction"],
                "dense_fraction": final["dense_fraction"],
                "tokens_per_s": alone,
                "sweep_wall_s": loop.seconds if trained > 0 else None,
            }
        )
    return rows


def _restore(members: list[Member], out: str, force: bool = False) -> int:
    """Restore every member from the latest step all of them have; 0 when none has one."""
    latest = [m.ckpt.latest_step() for m in members]
    if all(s is None for s in latest):
        return 0
    if any(s is None for s in latest):
        raise SaejaxError(
            f"the sweep in {out} has checkpoints for some members only; "
            "remove the folder to start again"
        )
    start = min(latest)
    for m in members:
        m.state, _ = m.ckpt.restore(m.state, m.info, step=start, force_data=force)
    return start


def _tokens_per_s_alone(step_fn, state, batch, steps: int = 3) -> float:
    """The member's own training-step throughput, on a copy of its state (the step donates)."""
    step_fn = jax.jit(step_fn, donate_argnums=0)
    _, state = time_steps(step_fn, jax.tree.map(jnp.copy, state), batch, 1)  # compile, warm up
    seconds, _ = time_steps(step_fn, state, batch, steps)
    return steps * batch.shape[0] / seconds
