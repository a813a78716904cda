"""`saejax sweep`: several SAEs trained in lockstep on the same batches, then compared.

One loader reads and shuffles the data once per step and every member's compiled step
consumes the same batch, all in ONE compiled program (one dispatch per batch; XLA runs the
members one after another with all cores each, where separately dispatched programs would
fight over the CPU's thread pool). The data statistics (input scale, b_dec initialisation)
are computed once per hook. Members differ in d_sae and k (TopK family) or λ (relu, gated), and
in the hook they read (`--hooks`): the loader then reads the hooks of a store side by side
(`ArraySource(also=...)`, one read per hook per block, whatever the number of members), the
whole row goes to the device in one transfer, and each member's step takes its hook's columns
inside the compiled program (a slice there costs nothing on the host; cutting the batch on the
host would mean one transfer per hook or a copy of each strided column block). Dead-latent
resampling is therefore done here, on each member's columns of the recent batches, at the
point of the step where the shared loop does it for a single run. Each member is
a normal run directory (config, metrics, checkpoints, eval, sae/) under OUT/, so `saejax
eval`, `export`, `features`, `dashboard` work on each. Checkpoints are written for all
members at the same steps; running the same command again resumes (or, at the final step,
only finishes: evaluates and saves every member). The sweep holds the lock of OUT/ and of
every member; a start that fails before any checkpoint removes exactly what it created; a
run again that changes what the members train needs `force`. `sweep_table` writes the
comparison. Its "tokens/s (alone)" is each member's own step, compiled by itself and timed
on the last batch after training (the lockstep program's time is shared by all members and
is the sweep's wall time beside it); `time_alone=False` skips that second compile.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from dataclasses import dataclass
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np

from saejax import io
from saejax.config import RunConfig, dump_yaml, with_values
from saejax.core.architectures import has_l1_penalty, selects_top_k
from saejax.errors import SaejaxError
from saejax.store import ActivationStore
from saejax.train import step as T
from saejax.train.bench import time_steps
from saejax.train.checkpoint import Checkpointer, data_identity
from saejax.train.data import ArraySource, Loader
from saejax.train.loop import Member, finish, refill_batches, run_loop
from saejax.train.metrics import MetricsLogger
from saejax.train.run import has_checkpoint, load_run_config, scale_value
from saejax.train.rundir import (
    Created,
    RunLock,
    check_resume_config,
    record_config_change,
    validate,
)
from saejax.train.setup import (
    checkpoint_info,
    data_statistics,
    open_source,
    prepare,
    resample_enabled,
    target_width,
)


def members_of(
    arch: str,
    d_saes: list[int],
    ks: list[int],
    l1s: list[float],
    lrs: list[float] = (),
    hooks: list[str] = (),
) -> list[tuple[str, dict]]:
    """(member name, config values) for every combination of the sizes with k (TopK family)
    or λ (relu, gated), with the learning rates when given, and for each of `hooks` when given
    (the member "HOOK-d1024_k32" trains on data.hook HOOK)."""
    if not d_saes:
        raise SaejaxError("--d-sae needs at least one size, e.g. --d-sae 1024,2048,4096")
    if ks and not selects_top_k(arch):
        raise SaejaxError(f"--k applies to topk and batchtopk, not {arch}")
    if l1s and not has_l1_penalty(arch):
        raise SaejaxError(f"--l1 applies to relu and gated, not {arch}")
    if len(set(hooks)) != len(hooks):
        repeated = sorted({h for h in hooks if hooks.count(h) > 1})
        raise SaejaxError(f"--hooks names a hook twice ({', '.join(repeated)})")
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
    if hooks:
        grid = [
            (f"{hook}-{name}", {"data.hook": hook, **values})
            for hook, (name, values) in product(hooks, grid)
        ]
    names = [name for name, _ in grid]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise SaejaxError(f"the sweep lists a member twice ({', '.join(repeated)})")
    return grid


def sweep_hooks(path: str, names: list[str]) -> list[str]:
    """The hooks `--hooks` names (`all`: every hook of the store), each checked to exist."""
    if path.endswith(".npy"):
        raise SaejaxError(f"--hooks needs a store; {path} is a plain array with no hooks")
    store = ActivationStore.open(path)
    if names == ["all"]:
        return store.hooks
    if not names:
        raise SaejaxError("--hooks needs at least one hook, e.g. --hooks a,b or --hooks all")
    return [store.default_hook(name) for name in names]


@dataclass
class Sources:
    """Where a sweep's members read: `together` is the one training read (every hook of the
    members side by side); `alone[name]` is a member's own hook (its statistics, evaluation and
    saved SAE, exactly as a separate run reads them); `columns[name]` its slice of a batch."""

    together: ArraySource
    alone: dict[str, ArraySource]
    columns: dict[str, tuple[int, int]]


def open_sources(cfgs: list[tuple[str, RunConfig]]) -> Sources:
    """One source per hook the members name, and one that reads them all at the same rows.

    Transcoder members (data.target_hook) read [x | y] as `saejax train` does; a transcoder
    sweep has one (hook, target) pair for all its members, so it is not combined with
    --hooks."""
    by_setting: dict = {}  # (data.hook as configured, data.target_hook)
    for _, cfg in cfgs:
        key = (cfg.data.hook, cfg.data.target_hook)
        if key not in by_setting:
            by_setting[key] = open_source(cfg)
    if len(by_setting) > 1 and any(target for _, target in by_setting):
        raise SaejaxError(
            "a transcoder sweep (data.target_hook) trains one input/target pair; "
            "--hooks cannot be combined with it"
        )
    by_hook = {s.hook: s for s in by_setting.values()}
    hooks = list(by_hook)
    if len(hooks) == 1:
        together = by_hook[hooks[0]]
        span = {hooks[0]: (0, together.row_width)}  # a transcoder's [x | y] columns
    else:
        together = ArraySource(cfgs[0][1].data.path, hooks[0], also=hooks[1:])
        bounds = np.cumsum([0, *together.widths])
        span = {h: (int(bounds[i]), int(bounds[i + 1])) for i, h in enumerate(hooks)}
    alone = {name: by_setting[cfg.data.hook, cfg.data.target_hook] for name, cfg in cfgs}
    return Sources(together, alone, {name: span[alone[name].hook] for name, _ in cfgs})


def run_sweep(
    base: RunConfig,
    grid: list[tuple[str, dict]],
    out: str,
    progress: bool = True,
    max_steps: int | None = None,
    force: bool = False,
    time_alone: bool = True,
) -> list[dict]:
    """Train the grid's members in lockstep; `max_steps` stops early (checkpointed), as a test
    would; `force` lets a run again change what the members train. `time_alone` times each
    member's step on its own at the end (`tokens_per_s`: a second compile of every member's
    step, a few seconds each on a CPU); off, `tokens_per_s` is None and only the sweep's
    wall time is measured, for callers that do not read the figure (tests)."""
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
    if base.data.path.endswith(".npy") and any("data.hook" in values for _, values in grid):
        raise SaejaxError(f"--hooks needs a store; {base.data.path} is a plain array with no hooks")
    sources = open_sources(cfgs)  # an unknown hook fails here, before any folder is made
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
            return _sweep(base, cfgs, sources, out, progress, max_steps, force, created, time_alone)
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
    sources: Sources,
    out: str,
    progress: bool,
    max_steps: int | None,
    force: bool,
    created: Created,
    time_alone: bool,
) -> list[dict]:
    changes = {}
    for name, cfg in cfgs:
        if os.path.exists(os.path.join(cfg.run_dir, "config.yaml")):
            changes[name] = check_resume_config(load_run_config(cfg.run_dir), cfg, force)
    stats = {}  # per hook, as a separate run on that hook computes them
    members, resample_at = [], {}
    for name, cfg in cfgs:
        source = sources.alone[name]
        if source.hook not in stats:
            stats[source.hook] = data_statistics(cfg, source)
        spec, tx, state, total_steps = prepare(cfg, source, stats[source.hook])
        if name not in changes:
            io.write_text(created.add(os.path.join(cfg.run_dir, "config.yaml")), dump_yaml(cfg))
        cfg.log.progress = False  # one progress bar for the sweep, not one per member
        resample_at[name] = (
            T.resample_steps(cfg.train, total_steps) if resample_enabled(cfg) else set()
        )
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
                info={
                    **checkpoint_info(cfg, source.d_in, target_width(source)),
                    **data_identity(source, cfg.data),
                },
                step_fn=T.make_train_step(spec, cfg.sae, tx, total_steps),
            )
        )
    total_steps = base.train.tokens // base.train.batch_size
    start = _restore(members, out, force)
    for m in members:
        if changes.get(m.name):
            record_config_change(m.cfg, changes[m.name], start)
        created.add(os.path.join(m.cfg.run_dir, "metrics.jsonl"))
        m.logger = MetricsLogger(m.cfg, total_steps, start, d_in=sources.alone[m.name].d_in)
    pool_batches = base.train.resample.pool_batches
    refill = refill_batches(set().union(*resample_at.values()), start, pool_batches)
    loader = Loader(  # its first `refill` batches refill the resampling pool
        sources.together,
        base.data,
        base.train.batch_size,
        start_batch=start - refill,
        transform=jax.device_put,  # the whole row, every hook: one transfer per batch
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
    end_step = total_steps if max_steps is None else min(total_steps, max_steps)
    pool = _Pool(loader, pool_batches, keep=any(resample_at.values()))
    try:
        loop = run_loop(
            members,
            _advance(members, sources.columns, resample_at, pool.batches, start),
            pool,
            start,
            end_step,
            pool_batches,
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
    batch = loop.last_batch  # what each member's step alone is timed on
    if batch is None and time_alone:  # nothing trained in this call (a finished sweep run again)
        first = Loader(sources.together, base.data, base.train.batch_size, transform=jax.device_put)
        batch = next(first)
        first.close()
    trained = loop.step - start
    rows = []
    for m in members:
        source = sources.alone[m.name]
        lo, hi = sources.columns[m.name]
        alone = _tokens_per_s_alone(m.step_fn, m.state, batch[:, lo:hi]) if time_alone else None
        final = finish(
            m.cfg,
            m.spec,
            m.state.params,
            scale_value(m.state.input_scale),
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
                "hook": source.hook,
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


class _Pool:
    """The loader, keeping the last `size` batches it gave (the loop's refill batches
    included) for resampling. The sweep resamples each member itself, on its own hook's columns
    of those batches, where the shared loop would resample on whole rows."""

    def __init__(self, loader: Loader, size: int, keep: bool):
        self.loader = loader
        self.batches = collections.deque(maxlen=max(1, size))
        self.keep = keep

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        if self.keep:
            self.batches.append(batch)
        return batch


def _advance(members: list[Member], columns: dict, resample_at: dict, pool, start: int):
    """One step of every member in ONE compiled program, each on its columns of the batch;
    then, where due, resampling on the member's columns of the pool (as the loop does it for a
    single run: after the step, before the metrics fetch and the checkpoint of that step)."""
    spans = [columns[m.name] for m in members]
    step_fns = [m.step_fn for m in members]
    all_steps = jax.jit(
        lambda states, batch: tuple(
            f(s, batch[:, lo:hi])[0] for f, s, (lo, hi) in zip(step_fns, states, spans)
        ),
        donate_argnums=0,
    )
    step = start

    def advance(states, batch):
        nonlocal step
        states = list(all_steps(tuple(states), batch))
        step += 1
        for i, m in enumerate(members):
            if step in resample_at[m.name]:
                lo, hi = spans[i]
                states[i] = T.resample(
                    states[i],
                    jnp.concatenate([b[:, lo:hi] for b in pool]),
                    m.spec,
                    m.cfg.sae.dead_tokens,
                    m.cfg.train.resample.encoder_scale,
                )
        return states

    return advance


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
