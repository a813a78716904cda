"""What keeps a multi-process run from hanging: step pacing, a step watchdog, and one line
(with the resume command) when a peer process is lost.

Pacing. XLA's CPU client lets at most 32 computations per device be in flight; with several
devices in one process it dispatches each device's part on its worker pool, whose size is
about the device count on a small host. A host that runs more than ~32 programs ahead
therefore blocks every worker on that limit while the queued programs, whose cross-process
collectives the peers are already waiting in, need those same workers: a deadlock at 0%
CPU (2 processes x 4 CPU devices hung in a 30-line JAX loop that never waits; waiting for
each step, or every 30, never hung). `must_pace` says when the loop waits for each step
before dispatching the next: several processes, several devices in each, on the CPU.

Watchdog. A hung collective has no timeout in JAX and SIGTERM cannot reach a main thread
blocked in C++, so a thread watches instead: a step that takes far longer than the recent
median (`factor` x median, at least `min_seconds`), or a SIGTERM the run does not act on
within `min_seconds`, ends the process with one line naming the step, the last checkpoint
and the resume command, and exit status `RESTART_EXIT` (75, EX_TEMPFAIL) that an
orchestrator can restart on. Every process runs its own watchdog, so all of them end.

JAX's aborts. When JAX's coordination service reports a fatal error (process 0, which hosts
it, has died; a peer missed its heartbeats, e.g. while waiting in a checkpoint's barrier; a
second process connected with a taken id), its client calls the error callback from a C++
thread, which cannot hand the status to Python (std::bad_cast) and aborts the process.
`catch_jax_abort` puts a SIGABRT handler in front of that abort: one line naming what is known
(`when_jax_aborts` sets it: before training, after a checkpoint) and exit 75 instead of a core
dump. JAX's own error lines and the C++ runtime's "terminate called" line come first.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import statistics
import sys
import threading
import time
from collections import deque

import jax
import numpy as np

RESTART_EXIT = 75  # EX_TEMPFAIL: try again (resume); what an orchestrator restarts on
_ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_abort = {"line": None, "handler": None, "ending": False, "process": 0}


def must_pace() -> bool:
    """Whether the loop must wait for each step (see the module doc): several processes,
    several local devices each, on the CPU backend."""
    return (
        jax.process_count() > 1 and jax.local_device_count() > 1 and jax.default_backend() == "cpu"
    )


class CollectiveFailed(RuntimeError):
    """A host-side collective of the loop failed (a peer died during it): handled as a lost
    peer, like a failed step (JAX raises those as JaxRuntimeError, these as ValueError)."""


def stop_agreed(requested: bool, step: int, every: int) -> bool:
    """Whether to stop after `step` for a SIGINT/SIGTERM. One process stops at once; several
    agree at every `every`-th step (one small all-gather of the flags), so that all of them
    stop at the same step and write the same checkpoint (a signal reaches them at different
    steps, and a checkpoint written at different steps would wait forever)."""
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    from jax.experimental import multihost_utils

    try:
        flags = multihost_utils.process_allgather(np.int32(requested))
    except Exception as e:  # noqa: BLE001 - any failure here is a lost peer
        raise CollectiveFailed(str(e)) from e
    return bool(np.asarray(flags).any())


def resume_hint(run_dir: str) -> str:
    return f"restart every process with `saejax train --resume {run_dir}` (and the same launch)"


def exit_now(line: str, code: int = RESTART_EXIT) -> None:
    """Print one line and end the process at once: a thread stuck in a collective cannot be
    unwound, and JAX's shutdown barrier would wait for the lost peer (then abort)."""
    _abort["ending"] = True  # a JAX abort while this process ends adds no second line
    sys.stderr.flush()
    os.write(2, f"\nsaejax: error: {line}\n".encode(errors="replace"))  # one write: JAX's
    # C++ threads log to the same stream and must not split the line
    os._exit(code)  # process 0 need not wait for its peers to speak first: losing it, they
    # say their own line (catch_jax_abort)


def peer_lost(run_dir: str, last_checkpoint, error: Exception) -> None:
    """A collective failed in a multi-process run: one line and the resume command, then exit
    at once (waiting on the lost peer would hang until JAX's heartbeat timeout aborts)."""
    text = str(error).strip()
    first = " ".join(text.splitlines()[0].split())[:200] if text else type(error).__name__
    exit_now(
        f"process {jax.process_index()} lost contact with its peers ({first}): a process has "
        f"died or was stopped; {_kept(last_checkpoint)}; {resume_hint(run_dir)}"
    )


def _kept(last_checkpoint) -> str:
    try:
        step = last_checkpoint()
    except Exception:  # noqa: BLE001 - the message must not fail on a listing
        step = None
    return f"the last checkpoint is step {step}" if step is not None else "no checkpoint yet"


def when_jax_aborts(line) -> None:
    """What `catch_jax_abort`'s handler says: `line()` is called when JAX aborts."""
    _abort["line"] = line


def before_training_line() -> str:
    return (
        f"process {_abort['process']}: JAX's coordination service ended the run before "
        "training began (a process died or was stopped, or a second process connected with "
        "a taken --process-id); start every process again"
    )


def catch_jax_abort() -> None:
    """Turn JAX's abort on a fatal coordination error into one line and exit 75 (see the
    module doc). Installed once per process, after jax.distributed is initialized."""
    if _abort["handler"] is not None:
        return
    _abort["process"] = jax.process_index()  # read now: the handler must not call into JAX
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, _ABORT_HANDLER)
    _abort["handler"] = _ABORT_HANDLER(_on_abort)  # kept: the C side holds only a pointer
    if _abort["line"] is None:
        when_jax_aborts(before_training_line)
    libc.signal(signal.SIGABRT, _abort["handler"])


def _on_abort(signum) -> None:
    """Runs in the aborting C++ thread. Nothing here may raise: the process ends either way."""
    try:
        if not _abort["ending"]:
            _abort["ending"] = True
            text = f"\nsaejax: error: {_abort['line']()}\n"
            os.write(2, text.encode(errors="replace"))
    finally:
        os._exit(RESTART_EXIT)


def lost_peer_line(run_dir: str, last_checkpoint) -> str:
    return (
        f"process {_abort['process']}: JAX's coordination service ended the run (process 0 "
        f"died, or a peer stopped answering): {_kept(last_checkpoint)}; {resume_hint(run_dir)}"
    )


class StepWatchdog:
    """`beat(step)` after each step; a background thread ends the process when the next
    beat is overdue, or when a SIGINT/SIGTERM is not acted on in time.

    `last_checkpoint()` names the checkpoint a restart resumes from (read when firing)."""

    def __init__(self, run_dir: str, last_checkpoint, factor: float, min_seconds: float):
        self.run_dir, self.last_checkpoint = run_dir, last_checkpoint
        self.factor, self.min_seconds = factor, min_seconds
        self.durations: deque[float] = deque(maxlen=50)
        self.step, self.beat_at = None, time.monotonic()
        self.signalled_at: float | None = None
        self._stop = threading.Event()
        self._thread = None
        self._pipe = None
        self._previous_fd = None

    def __enter__(self):
        when_jax_aborts(lambda: lost_peer_line(self.run_dir, self.last_checkpoint))
        self._watch_signals()
        self._thread = threading.Thread(target=self._run, name="saejax-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, jax.errors.JaxRuntimeError):  # before anything waits on the peers
            peer_lost(self.run_dir, self.last_checkpoint, exc)
        self._stop.set()
        self._thread.join()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for fd in self._pipe:
                os.close(fd)
        return False

    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self.step is not None:
            self.durations.append(now - self.beat_at)
        self.step, self.beat_at = step, now

    def limit(self) -> float | None:
        """Seconds the next step may take; None before two steps have been timed (the first
        steps compile)."""
        if len(self.durations) < 2:
            return None
        return max(self.min_seconds, self.factor * statistics.median(self.durations))

    def _watch_signals(self) -> None:
        """The C signal handler writes to the wakeup fd even while the main thread is blocked
        in C++ (where Python handlers cannot run), so this thread sees SIGTERM at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._pipe is not None:
                ready, _, _ = select.select([self._pipe[0]], [], [], 0.25)
                if ready:
                    data = os.read(self._pipe[0], 64)
                    if any(b in (signal.SIGINT, signal.SIGTERM) for b in data):
                        self.signalled_at = self.signalled_at or time.monotonic()
            else:
                self._stop.wait(0.25)
            if self._stop.is_set():
                return
            self._check(time.monotonic())

    def _check(self, now: float) -> None:
        where = f"step {self.step + 1}" if self.step is not None else "the first step"
        if self.signalled_at is not None and now - self.signalled_at > self.min_seconds:
            exit_now(
                f"stopped by a signal, but {where} did not end within {self.min_seconds:g} s "
                f"(a peer process may not have stopped); {self._tail()}"
            )
        limit = self.limit()
        if limit is not None and now - self.beat_at > limit:
            exit_now(
                f"{where} has not finished after {now - self.beat_at:.0f} s (the recent median "
                f"is {statistics.median(self.durations):.2g} s): a process has died or hung; "
                f"{self._tail()}"
            )

    def _tail(self) -> str:
        return f"{_kept(self.last_checkpoint)}; {resume_hint(self.run_dir)}"
