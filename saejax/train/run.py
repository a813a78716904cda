"""`saejax train`: one SAE trained by the shared loop (`train.loop`), on one device or a mesh.

In a multi-process run every process runs `train()`, reads only its own slices of the
store, and process 0 writes the logs and the final SAE.

The run directory's rules (`train.rundir`): process 0 holds its lock for the whole call; a
call that fails before the run has a checkpoint removes exactly what it created; a resume
that changes what is trained needs `force`. A run resumed (or run again) at its final step
only finishes: evaluation, RUN/sae/ and eval.json, with no training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import jax
import numpy as np

from saejax import io
from saejax.config import RunConfig, dump_yaml, load_config
from saejax.core import sae as S
from saejax.core import sharding as SH
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.checkpoint import Checkpointer, data_identity
from saejax.train.data import ArraySource, Loader, split_rows, validation_rows
from saejax.train.launch import Launch, check_same_config, flat_config, started_together
from saejax.train.loop import Member, finish, refill_batches, run_loop
from saejax.train.metrics import MetricsLogger
from saejax.train.remote_run import is_remote, read_config_text, train_remote
from saejax.train.rundir import (
    Created,
    RunLock,
    check_resume_config,
    record_config_change,
    validate,
)
from saejax.train.setup import (
    checkpoint_info,
    data_slices,
    init_distributed,
    mesh_for,
    open_source,
    prepare,
    resample_enabled,
    target_width,
)
from saejax.train.watchdog import (
    StepWatchdog,
    end_if_peer_lost,
    ending_on_lost_peer,
    ends_on_its_own,
    watch_run,
)


@dataclass
class TrainResult:
    run_dir: str
    state: T.TrainState
    spec: S.SAESpec
    final_metrics: dict
    stopped_early: bool
    tokens_per_s: float  # over the whole call, compilation and final checkpoint included
    steady_tokens_per_s: float = 0.0  # from the end of the first (compiling) step to the last


def _check_run_dir(cfg: RunConfig, resume: bool) -> None:
    config_path = os.path.join(cfg.run_dir, "config.yaml")
    if not resume and os.path.exists(config_path):
        raise SaejaxError(
            f"run directory {cfg.run_dir} already holds a run; resume it with "
            f"`saejax train --resume {cfg.run_dir}` or choose another run_dir"
        )


def has_checkpoint(run_dir: str) -> bool:
    """Whether the run has a completed checkpoint (orbax names them by their step)."""
    folder = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _previous_rate(run_dir: str) -> float:
    """The throughput eval.json recorded, for a run that is only finished again."""
    try:
        with open(os.path.join(run_dir, "eval.json")) as f:
            return float(json.load(f).get("tokens_per_s") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


def load_run_config(run_dir: str, overrides: list[str] = ()) -> RunConfig:
    if is_remote(run_dir):  # read from its bucket (train_remote makes the working copy)
        text = read_config_text(run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            io.write_text(os.path.join(tmp, "config.yaml"), text)
            cfg = load_config(os.path.join(tmp, "config.yaml"), overrides)
        cfg.run_dir = run_dir
        return cfg
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise SaejaxError(f"{run_dir} is not a saejax run (no config.yaml)")
    cfg = load_config(path, overrides)
    cfg.run_dir = run_dir  # the run may have been moved since it was written
    return cfg


def train(
    cfg: RunConfig,
    resume: bool = False,
    max_steps: int | None = None,
    force: bool = False,
    launch: Launch | None = None,
    mirror=None,
) -> TrainResult:
    """Train (or resume) the run described by `cfg`. `max_steps` stops early (tests, benches);
    `force` lets a resume change what is trained (config.yaml is rewritten, the change
    recorded in metrics.jsonl) or continue on data that changed since the checkpoint.

    On a mesh (cfg.mesh) the state is placed by `sharding.state_shardings` and the step is
    partitioned by XLA. `launch` (train.launch.resolve_launch: flags, environment) says how
    the processes of a multi-process run meet; None reads the environment.

    A `gs://` or `s3://` run_dir trains in a local working copy mirrored into the bucket
    (train.remote_run); `mirror` is that copy's uploader, passed by train_remote.
    """
    validate(cfg)
    if is_remote(cfg.run_dir):
        return train_remote(
            cfg,
            resume,
            lambda local, mirror: train(local, resume, max_steps, force, launch, mirror),
        )
    if cfg.train.tokens // cfg.train.batch_size == 0:
        raise SaejaxError(
            f"train.tokens ({cfg.train.tokens}) is less than one batch ({cfg.train.batch_size})"
        )
    init_distributed(cfg.mesh, launch)
    kept = functools.partial(last_checkpoint, cfg.run_dir)  # named in a lost peer's line
    with ending_on_lost_peer(cfg.run_dir, kept):  # a peer that dies at the start, too
        check_same_config(flat_config(cfg))  # every process trains the same config (or exit 2)
    if mirror is not None and jax.process_count() > 1:
        raise SaejaxError(
            f"{mirror.url}: a run directory on object storage takes one process; multi-process "
            "runs need a run directory on a filesystem every host sees"
        )
    is_main = jax.process_index() == 0
    created = Created()
    lock = RunLock(cfg.run_dir, created) if is_main else None
    # what a peer's failure line names, and the lock to release when this process ends for it
    watch_run(cfg.run_dir, kept, lock.release if lock is not None else None)
    # a process failing here ends its peers with its line
    with ending_on_lost_peer(cfg.run_dir, kept), started_together():
        if lock is not None:
            try:
                lock.acquire()
            except BaseException:  # held by another process: leave no folder we created
                created.remove_empty()
                raise
        else:
            os.makedirs(cfg.run_dir, exist_ok=True)
    failed = False
    try:
        return _train(cfg, resume, max_steps, force, created, mirror)
    except BaseException as e:
        # a lost peer surfaces as any type: the peers' beacons decide (watchdog's rule)
        end_if_peer_lost(e, cfg.run_dir, kept)
        failed = is_main and not has_checkpoint(cfg.run_dir)
        if failed:  # nothing to resume: leave the directory as it was before this call
            created.undo(keep=(lock.path,))
        raise
    finally:
        ends_on_its_own()  # done or failed: a peer failing later is not this process's end
        if lock is not None:
            lock.release()
        if failed:
            created.remove_empty()


def _train(
    cfg: RunConfig, resume: bool, max_steps: int | None, force: bool, created: Created, mirror
) -> TrainResult:
    # nobody writes into the run directory before every process has passed its checks
    with started_together():
        mesh = mesh_for(cfg.mesh)
        n_procs, proc = jax.process_count(), jax.process_index()
        n_slices = data_slices(cfg)
        if n_slices % n_procs:
            raise SaejaxError(
                f"{n_procs} processes need data.slices ({n_slices}) to be a multiple of {n_procs}"
            )
        is_main = proc == 0
        source = open_source(cfg)
        if cfg.sae.d_in and cfg.sae.d_in != source.d_in:
            raise SaejaxError(
                f"sae.d_in is {cfg.sae.d_in} but the data at {cfg.data.path} has d_in {source.d_in}"
            )
        held_out_note = _check_held_out(source, cfg)
        _check_run_dir(cfg, resume)
        changes = check_resume_config(load_run_config(cfg.run_dir), cfg, force) if resume else {}
    spec, tx, state, total_steps = prepare(cfg, source)
    shardings = SH.state_shardings(state, mesh)
    state = SH.place(state, shardings)
    info = {
        **checkpoint_info(cfg, source.d_in, target_width(source)),
        **data_identity(source, cfg.data),
    }
    ckpt_dir = created.add(os.path.join(cfg.run_dir, "checkpoints"))
    ckpt = Checkpointer(ckpt_dir, cfg.train.keep_checkpoints, mirror)
    loader = logger = None
    try:
        if resume and ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state, info, force_data=force)
        elif resume:
            pass  # stopped before its first checkpoint: start again from step 0, same config
        elif ckpt.latest_step() is not None:
            raise SaejaxError(f"{cfg.run_dir} already has checkpoints; use --resume")
        elif is_main:
            saved = cfg if mirror is None else dataclasses.replace(cfg, run_dir=mirror.url)
            io.write_text(created.add(os.path.join(cfg.run_dir, "config.yaml")), dump_yaml(saved))

        start_step = int(SH.to_host(state.step, mesh))
        if held_out_note and is_main:  # said once the run has passed its checks
            print(held_out_note, file=sys.stderr)
        if changes and is_main:
            record_config_change(cfg, changes, start_step)
            print(f"saejax: note: config.yaml updated ({', '.join(changes)})", file=sys.stderr)
        per_proc = n_slices // n_procs
        batch_on_mesh = SH.batch_sharding(mesh)
        resample_at = T.resample_steps(cfg.train, total_steps) if resample_enabled(cfg) else set()
        refill = refill_batches(resample_at, start_step, cfg.train.resample.pool_batches)
        loader = Loader(
            source,
            cfg.data,
            cfg.train.batch_size,
            start_batch=start_step - refill,  # the first `refill` batches refill the pool
            transform=lambda rows: SH.put_batch(rows, batch_on_mesh, cfg.train.batch_size),
            n_slices=n_slices,
            slices=list(range(proc * per_proc, (proc + 1) * per_proc)),
        )
        everywhere = SH.replicated(mesh)
        logger = _logger(cfg, total_steps, start_step, created, source.d_in) if is_main else None
        step_fn = jax.jit(
            T.make_train_step(spec, cfg.sae, tx, total_steps),
            donate_argnums=0,
            out_shardings=(shardings, everywhere),
        )
        member = Member(
            "run",
            cfg,
            spec,
            state,
            summarize=jax.jit(
                T.summarize,
                static_argnames="dead_tokens",
                donate_argnums=0,
                out_shardings=(everywhere, shardings),
            ),
            ckpt=ckpt,
            info=info,
            resample_at=resample_at,
            logger=logger,
            shardings=shardings,
        )
        end_step = total_steps if max_steps is None else min(total_steps, start_step + max_steps)
        with _watchdog(cfg, n_procs) as watchdog:
            loop = run_loop(
                [member],
                lambda states, batch: [step_fn(states[0], batch)[0]],
                loader,
                start_step,
                end_step,
                cfg.train.resample.pool_batches,
                mesh=mesh,
                refill=refill,
                watchdog=watchdog,
            )
    except BaseException:
        if logger is not None:
            logger.close()
        raise
    finally:
        if loader is not None:
            loader.close()
        ckpt.close()
    step, state = loop.step, member.state
    tokens_per_s = (step - start_step) * cfg.train.batch_size / max(loop.seconds, 1e-9)
    if step == start_step:  # only finished in this call: keep the rate it was trained at
        tokens_per_s = _previous_rate(cfg.run_dir)
    steady = 0.0
    if loop.steady_seconds is not None:
        steady = (step - start_step - 1) * cfg.train.batch_size / max(loop.steady_seconds, 1e-9)
    if loop.stopped:
        if logger is not None:
            logger.close()
        print(
            f"\nstopped at step {step}/{total_steps}; checkpoint saved. Resume with "
            f"`saejax train --resume {cfg.run_dir if mirror is None else mirror.url}`",
            file=sys.stderr,
        )
        return TrainResult(cfg.run_dir, state, spec, {}, True, tokens_per_s, steady)

    final = {}
    if step == total_steps:
        params, scale = SH.to_host((state.params, state.input_scale), mesh)  # collective
        if is_main:
            final = finish(
                cfg,
                spec,
                params,
                scale_value(scale),
                source,
                {"tokens_per_s": tokens_per_s, "steps": step},
            )
    if logger is not None:
        if final:
            logger.log_final(final)  # the held-out evaluation reaches TensorBoard/wandb too
        logger.close()
    return TrainResult(cfg.run_dir, state, spec, final, False, tokens_per_s, steady)


def scale_value(scale) -> float | tuple[float, float]:
    """The state's input scale as plain numbers: a float, or a transcoder's (x's, y's)."""
    values = [float(v) for v in np.ravel(scale)]
    return values[0] if np.ndim(scale) == 0 else tuple(values)


def last_checkpoint(run_dir: str) -> int | None:
    """The newest completed checkpoint's step (orbax names them by their step), or None."""
    folder = os.path.join(run_dir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def _watchdog(cfg: RunConfig, n_procs: int):
    """A step watchdog for multi-process runs (train.watchdog); nothing on one process."""
    if n_procs == 1:
        return contextlib.nullcontext()
    return StepWatchdog(
        cfg.run_dir,
        lambda: last_checkpoint(cfg.run_dir),
        cfg.mesh.step_timeout_factor,
        cfg.mesh.step_timeout_min_seconds,
    )


def _logger(cfg: RunConfig, total_steps: int, start_step: int, created: Created, d_in: int):
    created.add(os.path.join(cfg.run_dir, "metrics.jsonl"))
    for name in ("tensorboard", "wandb"):
        created.add(os.path.join(cfg.run_dir, name))
    return MetricsLogger(cfg, total_steps, start_step, d_in=d_in)


def _check_held_out(source: ArraySource, cfg: RunConfig) -> str | None:
    """Read the held-out rows before training: a NaN there fails now, not after the run.
    Returns a note when fewer rows are held out than data.validation_tokens asks."""
    split = split_rows(source.n_rows, cfg.data.validation_tokens, source.store)
    validation_rows(source, cfg.data)  # raises with the row number of a NaN/Inf row
    if split.validation_rows >= cfg.data.validation_tokens:
        return None
    return (
        f"saejax: note: data.validation_tokens is {cfg.data.validation_tokens:,} but "
        f"{source.path} has {source.n_rows:,} rows: holding out {split.validation_rows:,} "
        "(at most a fifth, ending on a sequence boundary) for the final evaluation"
    )
