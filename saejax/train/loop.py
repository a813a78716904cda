"""The one training loop, shared by `saejax train` (one member) and `saejax sweep` (several
members in lockstep on the same batches).

The loop only dispatches work: it takes the next prefetched batch, runs the compiled step
of every member (`advance`), and at each member's cadence resamples dead latents on a pool
of recent batches already on the device (`pool_batches` of them; a resumed run refills it
from the data stream, see `refill_batches`, so it resamples exactly as an uninterrupted run
would), fetches the metric sums (one transfer) and writes
a checkpoint. SIGINT/SIGTERM set a flag; the loop then stops after the current step and
writes a checkpoint, so running the same command again resumes. `finish` evaluates a
member on its held-out rows and writes its SAE and eval.json.

Divergence is caught from the metrics the host fetches anyway: a non-finite loss or FVU, or
an FVU above `DIVERGED_FVU` and twice the best so far at two fetches in a row, stops the run
(`Diverged`, exit 2) without saving that state; checkpoints written after the last healthy
fetch are deleted, so a resume starts from a state that was seen to be healthy.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from saejax.config import RunConfig
from saejax.core import sae as S
from saejax.core.sharding import local_values
from saejax.errors import SaejaxError
from saejax.io import write_json
from saejax.train import step as T
from saejax.train.checkpoint import Checkpointer
from saejax.train.evaluate import evaluate
from saejax.train.metrics import MetricsLogger
from saejax.train.sae_files import save_sae
from saejax.train.watchdog import must_pace, stop_agreed

DIVERGED_FVU = 100.0  # an SAE that reconstructs 100× worse than the mean has diverged ...
RISEN = 2.0  # ... and more than this many times its best FVU so far


class Diverged(SaejaxError):
    """Training blew up; the message names the run, the step and the checkpoint kept."""

    def __init__(self, message: str, member: Member | None = None):
        super().__init__(message)
        self.member = member


class StopFlag:
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


@dataclass
class Member:
    """One SAE being trained: its configuration, its state and where its outputs go."""

    name: str
    cfg: RunConfig
    spec: S.SAESpec
    state: T.TrainState
    summarize: Callable  # jitted T.summarize
    ckpt: Checkpointer
    info: dict  # what its checkpoints must agree on
    resample_at: set = field(default_factory=set)
    logger: MetricsLogger | None = None  # None on processes other than 0
    shardings: Any = None  # where the state lives on a mesh (re-placed after resampling)
    step_fn: Callable | None = None  # the pure step (the sweep compiles all members in one)
    last_good: int = 0  # the last step whose fetched metrics were healthy (or resumed from)
    suspect: bool = False  # the last fetch had FVU > DIVERGED_FVU: no checkpoint until healthy
    best_fvu: float = math.inf  # the lowest FVU fetched in this call


@dataclass
class LoopResult:
    step: int  # the step reached (every member's checkpoint is at it)
    stopped: bool  # by SIGINT/SIGTERM
    seconds: float  # the whole loop, first (compiling) step and final checkpoint included
    steady_seconds: float | None  # from the end of the first step to the last step's end
    last_batch: Any  # the last batch trained on (None when no step ran)


def refill_batches(resample_at: Iterable[int], start_step: int, pool_batches: int) -> int:
    """How many batches before `start_step` a run must read again to resample as an
    uninterrupted run does: the pool at resampling step r holds batches r - pool_batches ..
    r - 1, so a run (re)started less than `pool_batches` steps before r lacks some of them.
    0 when no resampling step is that near (the pool fills up on its own first)."""
    pool_batches = max(1, pool_batches)
    if not any(start_step < r < start_step + pool_batches for r in resample_at):
        return 0
    return min(start_step, pool_batches)


def run_loop(
    members: list[Member],
    advance: Callable,
    loader,
    start_step: int,
    end_step: int,
    pool_batches: int,
    mesh=None,
    bar=None,
    refill: int = 0,
    watchdog=None,
) -> LoopResult:
    """Train every member from `start_step` to `end_step`; `advance(states, batch)` returns the
    members' next states. Ends with a checkpoint of every member at the step reached.

    `loader` starts at batch `start_step - refill`: those first `refill` batches (see
    `refill_batches`) only refill the resampling pool, they are not trained on.
    `watchdog` (train.watchdog.StepWatchdog) hears a beat after each step; where
    `must_pace()`, each step is waited for before the next is dispatched (no deadlock)."""
    pace = must_pace()
    pool = collections.deque(maxlen=max(1, pool_batches))
    keep_pool = any(m.resample_at for m in members)
    for _ in range(refill):
        pool.append(next(loader))
    step, stopped, last_batch = start_step, False, None
    t_start, t_steady = time.perf_counter(), None
    # the SAE's shard_map kernels read the mesh from jax.set_mesh
    for m in members:
        m.last_good, m.suspect = start_step, False
        # a fresh run may start far above the line; a resumed one was healthy when saved
        m.best_fvu = math.inf if start_step == 0 else DIVERGED_FVU / RISEN
    with (
        StopFlag() as stop,
        jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
        _keeping_healthy_checkpoints(),
    ):
        while step < end_step:
            batch = next(loader)
            for m, state in zip(members, advance([m.state for m in members], batch)):
                m.state = state
            step += 1
            last_batch = batch
            if t_steady is None:  # one sync, after the compiling step, for the steady rate
                jax.block_until_ready([m.state.step for m in members])
                t_steady = time.perf_counter()
            if keep_pool:
                pool.append(batch)
            for m in members:
                _member_cadence(m, step, end_step, pool)
            if pace:
                jax.block_until_ready([m.state.step for m in members])
            if watchdog is not None:
                watchdog.beat(step)
            if bar is not None:
                bar.update(1)
            if stop_agreed(stop.signum is not None, step, members[0].cfg.train.log_every):
                stopped = True
                break
    jax.block_until_ready([m.state.step for m in members])
    t_end = time.perf_counter()
    for m in members:
        if not (stopped and m.suspect):  # a stop right after an FVU spike keeps the one before
            m.ckpt.save(step, m.state, m.info)
        m.ckpt.wait()
    steady = t_end - t_steady if t_steady is not None and step - start_step > 1 else None
    return LoopResult(step, stopped, time.perf_counter() - t_start, steady, last_batch)


def _member_cadence(m: Member, step: int, end_step: int, pool) -> None:
    """Resampling, the metrics fetch and the checkpoint that fall due at `step`."""
    train = m.cfg.train
    if step in m.resample_at:
        m.state = T.resample(
            m.state,
            jnp.concatenate(list(pool)),
            m.spec,
            m.cfg.sae.dead_tokens,
            train.resample.encoder_scale,
        )
        if m.shardings is not None:
            m.state = jax.device_put(m.state, m.shardings)  # no-op when already there
    if step % train.log_every == 0 or step == end_step:
        metrics, m.state = m.summarize(m.state, dead_tokens=m.cfg.sae.dead_tokens)
        values = local_values(metrics)  # replicated: every process sees the same values
        if m.logger is not None:
            m.logger.log(step, values)
        _check_health(m, step, values)
    if step % train.checkpoint_every == 0 and step < end_step and not m.suspect:
        m.ckpt.save(step, m.state, m.info)


def _check_health(m: Member, step: int, values: dict) -> None:
    """Raise Diverged on a non-finite loss or FVU, or on a second FVU > DIVERGED_FVU that is
    also more than RISEN× the best FVU fetched so far: a wide ReLU SAE can start far above the
    line (its tied initial encoder lets half of d_sae latents fire, ~d_sae/(2 d_in) times the
    input: FVU ≈ 1000 at 64× expansion) and come down slowly through the lr warm-up, which is
    training, not divergence."""
    loss, fvu = float(values["loss"]), float(values["fvu"])
    where = f"{m.cfg.run_dir}: training diverged at step {step}"
    if not (math.isfinite(loss) and math.isfinite(fvu)):
        raise Diverged(f"{where} (loss {loss:g}, FVU {fvu:g})", m)
    high = fvu > DIVERGED_FVU and fvu > RISEN * m.best_fvu
    if high and m.suspect:
        raise Diverged(
            f"{where} (FVU {fvu:.3g} at two fetches in a row, {fvu / m.best_fvu:.3g}× its best "
            f"{m.best_fvu:.3g})",
            m,
        )
    m.suspect, m.best_fvu = high, min(m.best_fvu, fvu)
    if not m.suspect:
        m.last_good = step


@contextlib.contextmanager
def _keeping_healthy_checkpoints():
    """On Diverged: delete the checkpoints nobody saw healthy and say which one is kept."""
    try:
        yield
    except Diverged as e:
        kept = e.member.ckpt.delete_after(e.member.last_good) if e.member else None
        tail = (
            f"kept the checkpoint at step {kept}; lower train.lr and resume with --force"
            if kept is not None
            else "no healthy checkpoint to keep; lower train.lr and start again"
        )
        raise Diverged(f"{e}; {tail}", e.member) from None


def finish(cfg: RunConfig, spec: S.SAESpec, params, input_scale, source, extra: dict) -> dict:
    """Evaluate on the held-out rows, then write RUN/sae/ and RUN/eval.json (host params).
    `input_scale`: a float, or a transcoder's (x's, y's)."""
    final = evaluate(
        jax.tree_util.tree_map(jnp.asarray, params), spec, input_scale, source, cfg.data
    )
    final.update(extra)
    save_sae(
        os.path.join(cfg.run_dir, "sae"), params, spec, input_scale, cfg, source.meta, source.hook
    )
    write_json(os.path.join(cfg.run_dir, "eval.json"), final)
    return final
