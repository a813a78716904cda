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

Lost peers. A peer that dies surfaces in a survivor as whatever the call waiting on it raises:
JaxRuntimeError from a step, ValueError from a host-side all-gather (orbax's barrier before a
checkpoint, `process_allgather`), TimeoutError from orbax's background commit, and so on. So
the type does not decide; the peers do (`end_if_peer_lost`): every process of a multi-process
run keeps a beacon in JAX's coordination key-value store (a counter bumped every
`BEACON_SECONDS`, `start_beacon`), and when training fails with any exception but a
SaejaxError (a user error), the survivor reads the beacons until every peer's counter has
moved, for at most `PROBE_SECONDS`. A peer whose counter did not move, or a store that does not
answer (process 0, which hosts it, is gone), is a lost peer: one line with the last checkpoint
and the resume command, exit 75. Peers all beating is a plain bug: the exception goes on (a
traceback, exit 1). Without a beacon (no JAX client to keep it in) a JaxRuntimeError or
CollectiveFailed anywhere in the exception's chain counts as a lost peer, as before. The
probe stops as soon as every peer's counter has moved (about one beat when all are alive) and
takes `PROBE_SECONDS` only for a lost peer; a healthy peer's beacon thread would have to stall
that long to be taken for a lost one.

A peer's failure. A process that fails with an error its peers were not told of (its peers
all beating, or a user error raised on this process alone, e.g. a chunk its host cannot
read) writes `saejax/failed/<train() call>/<its index>` (its one-line summary) into the store before
it starts shutting down (`tell_peers`). Every peer's beacon thread reads those keys at each
beat and ends its own process (`end_for_failed_peer`), whatever its main thread is blocked
in: one line naming the failed process and its message, the last checkpoint and the resume
command. It leaves JAX's coordination service first (bounded; the failed process's
exit-time shutdown barrier waits for every process) and releases the run lock, then
`os._exit`s like `exit_now`. The failed process itself goes on as usual: its traceback and
exit 1 (a user error: its line and exit 2). Exit status on the peers: `PEER_FAILED_EXIT`
(3) for a bug on another process, 2 when that process failed with a user error; never 75,
because restarting does not fix a bug (fix it, then resume). A JAX abort while a failed
process ends is silent and keeps its status (1 or 2): its traceback already said why.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
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

from saejax.errors import SaejaxError

RESTART_EXIT = 75  # EX_TEMPFAIL: try again (resume); what an orchestrator restarts on
_ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
PEER_FAILED_EXIT = 3  # another process failed with a bug: see its log; not restartable
_abort = {"line": None, "handler": None, "ending": False, "process": 0, "code": RESTART_EXIT}


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


def exit_now(line: str, code: int = RESTART_EXIT, then=None) -> None:
    """Print one line and end the process at once: a thread stuck in a collective cannot be
    unwound, and JAX's shutdown barrier would wait for the lost peer (then abort). `then()`
    runs between the line and the end (a peer's failure: JAX's shutdown, the lock). Under
    `_ending`, held until the end: a second caller (another thread) never adds its line."""
    _ending.acquire()  # never released: the process ends below
    _abort["ending"] = True  # a JAX abort while this process ends adds no second line
    _abort["code"] = code  # ... and keeps this status
    sys.stderr.flush()
    os.write(2, f"\nsaejax: error: {line}\n".encode(errors="replace"))  # one write: JAX's
    # C++ threads log to the same stream and must not split the line
    if then is not None:
        then()
    os._exit(code)  # process 0 need not wait for its peers to speak first: losing it, they
    # say their own line (catch_jax_abort)


def peer_lost(run_dir: str, last_checkpoint, error: Exception, gone=None) -> None:
    """A collective failed in a multi-process run: one line and the resume command, then exit
    at once (waiting on the lost peer would hang until JAX's heartbeat timeout aborts).
    `gone`: the processes found silent, when known."""
    text = str(error).strip()
    first = " ".join(text.splitlines()[0].split())[:200] if text else type(error).__name__
    who = "a process has died or was stopped"
    if gone:
        who = f"process(es) {', '.join(str(i) for i in gone)} died or were stopped"
    exit_now(
        f"process {jax.process_index()} lost contact with its peers ({first}): {who}; "
        f"{_kept(last_checkpoint)}; {resume_hint(run_dir)}"
    )


BEACON_SECONDS = 1.0  # how often each process bumps its beacon
PROBE_SECONDS = 10.0  # a beacon that does not move in this long belongs to a lost peer
BEACON_KEY = "saejax/alive/"
DONE_BEAT = "done"  # a beacon's last value: this process finished its part and is exiting
_beacon = {"client": None}


def start_beacon(client) -> None:
    """Bump this process's counter in the coordination service's key-value store every
    BEACON_SECONDS from a daemon thread, for `peers_gone` on the other processes.

    Stopped at exit before JAX's own exit handler shuts the client down (atexit runs the
    later registration first): a beat into a client being torn down crashed the process
    (SIGSEGV after "terminate called recursively", in 2 of 4 runs under load). Its last
    value is DONE_BEAT: a process that has finished its part and waits in JAX's exit barrier
    is not a lost peer. A store that does not answer is retried for PROBE_SECONDS before the
    beacon gives up (a live process whose beacon stopped would look lost)."""
    if _beacon["client"] is not None or client is None:
        return
    _beacon["client"] = client
    key = f"{BEACON_KEY}{jax.process_index()}"
    stop = threading.Event()

    def beat():
        count, unanswered_since = 0, None
        while not stop.is_set():
            try:
                client.key_value_set(key, str(count), allow_overwrite=True)
                failed = failed_peer(client)
            except Exception:  # noqa: BLE001 - a slow or gone service: retry, then give up
                unanswered_since = unanswered_since or time.monotonic()
                if time.monotonic() - unanswered_since >= PROBE_SECONDS:
                    return  # the service is gone: peers_gone says so
                stop.wait(BEACON_SECONDS)
                continue
            unanswered_since = None
            if failed is not None:
                end_for_failed_peer(*failed)
            count += 1
            stop.wait(BEACON_SECONDS)

    thread = threading.Thread(target=beat, name="saejax-beacon", daemon=True)
    thread.start()

    def stop_beacon():
        stop.set()
        thread.join(BEACON_SECONDS + 5)
        _within(STORE_SECONDS, lambda: client.key_value_set(key, DONE_BEAT, allow_overwrite=True))

    atexit.register(stop_beacon)


_NO_ANSWER = object()


def _within(timeout: float, call):
    """`call()`'s result, or _NO_ANSWER when it raises or takes longer than `timeout` (a call
    into a store whose host has died may wait far longer)."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except Exception:  # noqa: BLE001 - no answer is the answer
            pass

    caller = threading.Thread(target=run, name="saejax-store", daemon=True)
    caller.start()
    caller.join(timeout)
    return box.get("value", _NO_ANSWER)


def _read_beacons(client, timeout: float) -> dict | None:
    """{process: counter}, or None when the store does not answer within `timeout`."""
    rows = _within(timeout, lambda: client.key_value_dir_get(BEACON_KEY))
    if rows is _NO_ANSWER:
        return None
    return {int(k.rstrip("/").rpartition("/")[2]): v for k, v in rows}


def peers_gone(wait: float | None = None) -> list[int] | None:
    """The peers whose beacon did not move in `wait` seconds (PROBE_SECONDS; [0] when the
    store in process 0 does not answer); None without a beacon (cannot tell)."""
    client = _beacon["client"]
    if client is None:
        return None
    wait = PROBE_SECONDS if wait is None else wait
    me, count = jax.process_index(), jax.process_count()
    deadline = time.monotonic() + wait
    before = _read_beacons(client, STORE_SECONDS)
    if before is None:
        return [0]
    # a peer that finished its part (DONE_BEAT) or whose counter moves is alive: the probe
    # ends after about one beat when every peer is
    silent = [i for i in range(count) if i != me and before.get(i) != DONE_BEAT]
    while silent:
        time.sleep(max(0.0, min(BEACON_SECONDS / 2, deadline - time.monotonic())))
        after = _read_beacons(client, STORE_SECONDS)
        if after is None:
            return [0]
        silent = [i for i in silent if after.get(i, before.get(i)) == before.get(i)]
        if time.monotonic() >= deadline:
            break
    return silent


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def end_if_peer_lost(error: BaseException, run_dir: str, last_checkpoint) -> None:
    """The one rule for a failure in a multi-process run (see the module doc): when a peer
    said it failed, end this process with that peer's line (`end_for_failed_peer`); when a
    peer is gone, end it with one line and exit 75; otherwise tell the peers of this failure
    (`tell_peers`) and return (the caller raises). SaejaxErrors (user errors), Ctrl-C and
    errors whose peers are known to be alive (they were told of it, `launch.started_together`,
    or already probed) are never a lost peer."""
    if jax.process_count() == 1 or not isinstance(error, Exception):
        return
    if getattr(error, PEERS_ALIVE, False):  # the peers know of it: it ends this process
        ends_on_its_own()
        return
    _end_if_a_peer_failed()  # this error is likely that failure's echo (a broken collective)
    if isinstance(error, SaejaxError):
        tell_peers(error)
        mark_peers_alive(error)
        return
    try:
        gone = peers_gone()
    except Exception:  # noqa: BLE001 - the caller's error must not be masked
        gone = None
    if gone is None:  # no beacon: judge by the type, as JAX reports a failed collective
        if any(
            isinstance(e, (jax.errors.JaxRuntimeError, CollectiveFailed)) for e in _chain(error)
        ):
            peer_lost(run_dir, last_checkpoint, error)
        return
    if gone:
        peer_lost(run_dir, last_checkpoint, error, gone)
    _end_if_a_peer_failed()  # one may have said so during the probe
    tell_peers(error)
    mark_peers_alive(error)  # a second look (train() after the watchdog) need not wait again


FAILED_KEY = "saejax/failed/"
SHUTDOWN_SECONDS = 20.0  # a peer waits this long for the failed process's shutdown barrier
STORE_SECONDS = 5.0  # for one read or write of the store from the main thread
_run = {"dir": None, "kept": None, "release": None, "attempt": 0}
_ending = threading.RLock()  # one way out: this process's own failure, or a peer's
_own = {"end": False}  # this process ends by its own path (its train() failed or returned)


def watch_run(run_dir: str, last_checkpoint, release=None) -> None:
    """The run a peer's failure line points to (`last_checkpoint()` names the step), and what
    to release before ending this process for it (the run lock)."""
    _run.update(dir=run_dir, kept=last_checkpoint, release=release, attempt=_run["attempt"] + 1)
    _own["end"] = False  # a new train() call in this process
    _abort.update(ending=False, code=RESTART_EXIT)  # an earlier call's failure is not this one's


def failed_key_prefix() -> str:
    """Where the processes' failures are written: one folder per train() call in these
    processes (every process makes the same calls), so that a failure of an earlier call in
    the same processes (a library caller that tries again) never ends a later one."""
    return f"{FAILED_KEY}{_run['attempt']}/"


def ends_on_its_own() -> None:
    """From now on a peer's failure no longer ends this process: its training failed (it
    says so itself) or returned (its work is done; a failure after it is the failed
    process's to report)."""
    with _ending:
        _own["end"] = True


def summary(error: BaseException) -> str:
    """One line: a user error's text, else the exception's type and first line."""
    text = str(error).strip()
    first = " ".join(text.splitlines()[0].split())[:300] if text else ""
    if isinstance(error, SaejaxError):
        return first or type(error).__name__
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def tell_peers(error: BaseException) -> None:
    """Write this process's failure into the coordination store, for every peer's beacon
    thread to end its process with (see the module doc). From then on this process ends by
    its own error, never by a peer's, and a JAX abort while it ends keeps its status."""
    user = isinstance(error, SaejaxError)
    ends_on_its_own()
    _abort["code"], _abort["ending"] = (2 if user else 1), True
    client = _beacon["client"]
    if client is None:
        return
    key, value = (
        f"{failed_key_prefix()}{jax.process_index()}",
        json.dumps({"user_error": user, "line": summary(error)}),
    )
    _within(STORE_SECONDS, lambda: client.key_value_set(key, value, allow_overwrite=True))


def failed_peer(client) -> tuple[int, dict] | None:
    """(index, {"user_error", "line"}) of the first other process that said it failed."""
    me = jax.process_index()
    rows = [
        (int(k.rstrip("/").rpartition("/")[2]), v)
        for k, v in client.key_value_dir_get(failed_key_prefix())
    ]
    for index, value in sorted(rows):
        if index != me:
            try:
                return index, dict(json.loads(value))
            except (ValueError, TypeError):
                return index, {"user_error": False, "line": str(value)}
    return None


def _end_if_a_peer_failed() -> None:
    client = _beacon["client"]
    if client is None:
        return
    failed = _within(STORE_SECONDS, lambda: failed_peer(client))
    if failed is not _NO_ANSWER and failed is not None:  # no answer: the probe decides
        end_for_failed_peer(*failed)


def peer_failed_line(index: int, failure: dict) -> str:
    me, line = jax.process_index(), failure.get("line") or "an error"
    if failure.get("user_error"):
        text = f"process {me} stopped because process {index} failed: {line}"
    else:
        text = (
            f"process {me} stopped because process {index} failed with {line} (a bug, not a "
            f"lost process: its traceback is in process {index}'s output)"
        )
    if _run["dir"] is None:
        return text
    kept = _kept(_run["kept"])
    if kept == NO_CHECKPOINT:  # process 0, failing, may have removed the run it created
        return f"{text}; {kept}; fix the cause, then start the run again"
    return f"{text}; {kept}; fix the cause, then {resume_hint(_run['dir'])}"


def end_for_failed_peer(index: int, failure: dict) -> None:
    """End this process for a peer's failure (module doc): one line, the run lock released,
    JAX's coordination service left (bounded) so the failed process's exit barrier passes,
    then `os._exit`. Returns when this process has failed (or is ending) on its own."""
    with _ending:  # held until the end: nothing else here may end the process meanwhile
        if _own["end"] or _abort["ending"]:
            return
        code = 2 if failure.get("user_error") else PEER_FAILED_EXIT
        exit_now(peer_failed_line(index, failure), code, then=_before_ending)


def _before_ending() -> None:
    """JAX's shutdown first (bounded), the run lock last: until the process ends, its main
    thread may still write into the run."""
    _leave_jax(SHUTDOWN_SECONDS)
    if _run["release"] is not None:
        with contextlib.suppress(Exception):
            _run["release"]()


def _leave_jax(timeout: float) -> None:
    """JAX's own shutdown (its barrier meets the failed process's exit-time one), from a
    thread given `timeout` seconds: the main thread may be blocked in a collective."""
    from jax._src import distributed as jax_distributed  # JAX's process-wide state

    state = jax_distributed.global_state

    def leave():  # the client only: process 0's service ends with it (the failed one is done)
        with contextlib.suppress(Exception):
            if state.preemption_sync_manager is not None:
                state.preemption_sync_manager.shutdown()
            if state.client is not None:
                state.client.shutdown()

    leaver = threading.Thread(target=leave, name="saejax-leave", daemon=True)
    leaver.start()
    leaver.join(timeout)


@contextlib.contextmanager
def ending_on_lost_peer(run_dir: str, last_checkpoint):
    """`end_if_peer_lost` for whatever fails inside (then the error goes on)."""
    try:
        yield
    except BaseException as e:
        end_if_peer_lost(e, run_dir, last_checkpoint)
        raise


PEERS_ALIVE = "saejax_peers_alive"


def mark_peers_alive(error: BaseException) -> None:
    """Record on `error` that the peers were alive after it: not a lost peer."""
    with contextlib.suppress(AttributeError):  # an exception type without a __dict__
        setattr(error, PEERS_ALIVE, True)


def _kept(last_checkpoint) -> str:
    try:
        step = last_checkpoint()
    except Exception:  # noqa: BLE001 - the message must not fail on a listing
        step = None
    return f"the last checkpoint is step {step}" if step is not None else NO_CHECKPOINT


NO_CHECKPOINT = "no checkpoint yet"


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
        os._exit(_abort["code"])


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
        if exc is not None:  # decided before anything (a checkpoint's close) waits on peers
            end_if_peer_lost(exc, self.run_dir, self.last_checkpoint)
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
