"""How the processes of a multi-process run find each other, and the checks made at start.

Coordinator, process count and process id are launch settings, not run settings: they come
from the command line (`--coordinator`, `--num-processes`, `--process-id`), else from the
environment (SAEJAX_COORDINATOR / SAEJAX_NUM_PROCESSES / SAEJAX_PROCESS_ID, or torchrun's
MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK), else from JAX's own cluster detection (SLURM,
TPU pod metadata) with `mesh.distributed: auto`. They are read at every start and never
written to config.yaml, so a run resumes on another launch (another port, process count or
mesh) as long as its data slices divide as before.

Checks at start, each one line on every process that sees it:
- a launch that names a coordinator but no count or id, or an id outside 0..count-1;
- process 0's coordinator port already taken (checked before binding: JAX's server shares
  ports, so it would otherwise take over a running job's port and kill that job);
- saejax's roll call, before JAX's own rendezvous (`roll_call`): process 0 listens on the
  coordinator port and every other process reports its id and count, so two processes with
  one id, a count that differs, or processes missing after `init_timeout` seconds end every
  process that came with one line naming them (JAX would abort the duplicates with its own
  C++ message, or wait out its timeout);
- processes whose resolved configs differ (`check_same_config`): the differing keys, exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass

import jax
import numpy as np

from saejax.errors import SaejaxError
from saejax.train.watchdog import catch_jax_abort, mark_peers_alive, start_beacon

ENV_PREFIX = "SAEJAX_"
DEFAULT_INIT_TIMEOUT = 300  # seconds for every process to arrive (JAX's own default)
HEARTBEAT_TIMEOUT = 60  # seconds of silence after which a process counts as dead


@dataclass(frozen=True)
class Launch:
    """Where this process stands in its launch; `coordinator` "" is a single-process run
    (or one that JAX detects itself with mesh.distributed auto)."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    init_timeout: int = DEFAULT_INIT_TIMEOUT
    source: str = ""  # where the settings came from, for messages


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SaejaxError(f"{name} must be a whole number, got {value!r}") from None


def resolve_launch(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    init_timeout: int | None = None,
    environ=None,
) -> Launch:
    """The launch settings of this process: the flags, else SAEJAX_* variables, else torchrun's
    variables. Raises one line for an incomplete or inconsistent launch."""
    env = os.environ if environ is None else environ
    timeout = init_timeout
    if timeout is None:
        timeout = _int(env.get(f"{ENV_PREFIX}INIT_TIMEOUT"), f"{ENV_PREFIX}INIT_TIMEOUT")
    timeout = DEFAULT_INIT_TIMEOUT if timeout is None else timeout
    if timeout < 1:
        raise SaejaxError(f"the initialization timeout must be at least 1 s, got {timeout}")
    ours = (
        env.get(f"{ENV_PREFIX}COORDINATOR") or "",
        _int(env.get(f"{ENV_PREFIX}NUM_PROCESSES"), f"{ENV_PREFIX}NUM_PROCESSES"),
        _int(env.get(f"{ENV_PREFIX}PROCESS_ID"), f"{ENV_PREFIX}PROCESS_ID"),
    )
    flags = (coordinator or "", num_processes, process_id)
    if any(v not in ("", None) for v in flags) or ours[0]:
        # each flag, else its SAEJAX_ variable (a launcher may export the shared ones)
        source = "--coordinator/--num-processes/--process-id or SAEJAX_* variables"
        found = tuple(f if f not in ("", None) else o for f, o in zip(flags, ours))
    elif env.get("MASTER_ADDR") and env.get("WORLD_SIZE"):
        source = "torchrun's MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK"
        port = _int(env.get("MASTER_PORT"), "MASTER_PORT") or 29500
        found = (
            f"{env['MASTER_ADDR']}:{port}",
            _int(env.get("WORLD_SIZE"), "WORLD_SIZE"),
            _int(env.get("RANK"), "RANK"),
        )
    else:
        return Launch(init_timeout=timeout)
    address, count, index = found
    if not address or count is None or index is None:
        raise SaejaxError(
            f"a multi-process launch needs a coordinator (host:port of process 0), the number "
            f"of processes and this process's id; {source} gave "
            f"coordinator {address or '(none)'}, count {count}, id {index}"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SaejaxError(f"the coordinator must be host:port, got {address!r} (from {source})")
    if count < 1:
        raise SaejaxError(f"the number of processes must be at least 1, got {count}")
    if not 0 <= index < count:
        raise SaejaxError(
            f"the process id must be in 0..{count - 1} for {count} processes, got {index}"
        )
    return Launch(address, count, index, timeout, source)


def check_port_free(address: str) -> None:
    """Process 0's coordinator port must be free: JAX's server would share it with a running
    job (taking over, and killing, that job) or fail without a message."""
    port = int(address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            s.bind((host, port))
            return
        except OSError as e:
            if e.errno == 98 or "in use" in str(e).lower():  # EADDRINUSE
                raise SaejaxError(
                    f"the coordinator port {port} is already in use on this host (another "
                    "job?); choose a free port for --coordinator / SAEJAX_COORDINATOR"
                ) from None
        finally:
            s.close()


def init_distributed(launch: Launch, mode: str = "off") -> None:
    """jax.distributed.initialize() for this launch (JAX's detection with mode "auto"), with
    one line instead of a hang, a crash or a traceback when the processes do not meet."""
    if jax.distributed.is_initialized():
        return
    if launch.coordinator and launch.num_processes > 1:
        if launch.process_id == 0:
            check_port_free(launch.coordinator)
        # CPU processes talk over gloo; accelerators use their own collectives regardless
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        roll_call(launch)
        started = time.monotonic()
        try:
            _initialize(launch)
        except Exception as e:  # noqa: BLE001 - JAX raises several types here
            _forget_client()  # nothing for JAX's exit handler to shut down (or complain about)
            timed_out = time.monotonic() - started >= launch.init_timeout - 1
            raise SaejaxError(_init_failure(launch, e, timed_out)) from None
        catch_jax_abort()  # JAX's later aborts (a lost coordinator or peer): one line
        start_beacon(_client())  # how the others tell a lost peer from a bug (watchdog)
    elif mode == "auto":
        try:
            jax.distributed.initialize(initialization_timeout=launch.init_timeout)
        except Exception as e:  # noqa: BLE001
            raise SaejaxError(
                f"mesh.distributed auto: JAX could not set up the processes ({_first(e)})"
            ) from None
        if jax.process_count() > 1:
            # a lost peer that fails a collective is one line here too; JAX's own client
            # (no callback of ours) still ends a lost heartbeat with its own message
            start_beacon(_client())


ROLL_CALL = b"saejax-roll-call"


def roll_call(launch: Launch) -> None:
    """Every process of the launch reports to process 0 on the coordinator port before JAX
    binds it; process 0 answers "ok" once ids 1..n-1 have each come once with its count, or
    names the problem to all of them. Raises that problem as one line on every process."""
    if launch.process_id == 0:
        _call_the_roll(launch)
    else:
        _answer_the_roll(launch)


def _who() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def _listen(port: int) -> socket.socket:
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _read_line(conn: socket.socket, deadline: float) -> bytes:
    """One line (at most 4 KiB) from `conn` before `deadline`; b"" when it closes first."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[0]


def _call_the_roll(launch: Launch) -> None:
    n, deadline = launch.num_processes, time.monotonic() + launch.init_timeout
    present, answered, problem = {0: _who()}, [], None
    server = _listen(int(launch.coordinator.rpartition(":")[2]))
    try:
        while problem is None and len(present) < n:
            if time.monotonic() >= deadline:
                missing = ", ".join(str(i) for i in range(n) if i not in present)
                problem = (
                    f"process(es) {missing} of {n} did not report within "
                    f"{launch.init_timeout} s (not started, or started with another "
                    "--coordinator)"
                )
                break
            server.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                hello = json.loads(
                    _read_line(conn, min(deadline, time.monotonic() + 10)).removeprefix(ROLL_CALL)
                )
                index, count, who = int(hello["id"]), int(hello["count"]), str(hello["who"])
            except (OSError, ValueError, KeyError, TypeError):
                conn.close()  # not one of ours (a port scan, a health check)
                continue
            answered.append(conn)
            if count != n:
                problem = (
                    f"process {index} ({who}) was started with --num-processes {count}, "
                    f"process 0 with {n}"
                )
            elif index in present:
                problem = (
                    f"two processes were started with --process-id {index} "
                    f"({present[index]} and {who})"
                )
            else:
                present[index] = who
        verdict = b" ok" if problem is None else b" error " + problem.encode()
        for conn in answered:
            _answer(conn, ROLL_CALL + verdict + b"\n")
    finally:
        server.close()
    if problem is not None:
        raise SaejaxError(_roll_call_failure(launch, problem))


def _answer(conn: socket.socket, verdict: bytes) -> None:
    """Send the verdict, then wait (briefly) for the other side to close first: the closed
    connection's TIME_WAIT stays on its host, not on the coordinator port."""
    try:
        conn.settimeout(2.0)
        conn.sendall(verdict)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _answer_the_roll(launch: Launch) -> None:
    host, _, port = launch.coordinator.rpartition(":")
    deadline = time.monotonic() + launch.init_timeout
    hello = json.dumps({"id": launch.process_id, "count": launch.num_processes, "who": _who()})
    while True:
        try:
            conn = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise SaejaxError(_init_failure(launch, e, timed_out=False)) from None
            time.sleep(0.25)
    with conn:
        try:
            conn.sendall(ROLL_CALL + hello.encode() + b"\n")
            reply = _read_line(conn, deadline + 5)
        except OSError:
            reply = b""
    if reply == ROLL_CALL + b" ok":
        return
    if reply.startswith(ROLL_CALL + b" error "):
        problem = reply.removeprefix(ROLL_CALL + b" error ").decode(errors="replace")
    elif reply:
        problem = (
            "the coordinator is already running a run with all its processes (was this "
            f"--process-id {launch.process_id} given twice, or this process started again?)"
        )
    else:
        problem = (
            "process 0 closed the connection without an answer (it ended, or its run started "
            f"without this process: was --process-id {launch.process_id} given twice?)"
        )
    raise SaejaxError(_roll_call_failure(launch, problem))


def _roll_call_failure(launch: Launch, problem: str) -> str:
    return (
        f"process {launch.process_id} of {launch.num_processes} could not join the run at "
        f"{launch.coordinator}: {problem}; start every process with the same coordinator and "
        f"count and ids 0..{launch.num_processes - 1}"
    )


def _on_service_error(status) -> None:
    """Given to JAX's coordination client as its fatal-error callback. JAX 0.10 cannot pass it
    the status (nanobind has no caster: std::bad_cast), but having one makes a failed start
    (connect) raise, which `init_distributed` turns into one line, where JAX's own handler
    aborts with a C++ stack trace. Later fatal errors (a lost heartbeat) still abort."""


def _initialize(launch: Launch) -> None:
    """jax.distributed.initialize(), but with a client that has a fatal-error callback
    (`_on_service_error`; initialize() offers no way to pass one) and a 60 s heartbeat
    timeout. Falls back to initialize() when this JAX lacks the pieces."""
    from jax._src import distributed as jax_distributed  # JAX's process-wide state

    state, native = jax_distributed.global_state, getattr(jax_distributed, "_jax", None)
    if native is None or not hasattr(native, "get_distributed_runtime_client"):
        jax.distributed.initialize(
            launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            initialization_timeout=launch.init_timeout,
        )
        return
    port = launch.coordinator.rpartition(":")[2]
    state.coordinator_address, state.process_id = launch.coordinator, launch.process_id
    state.num_processes = launch.num_processes
    if launch.process_id == 0:
        state.service = native.get_distributed_runtime_service(
            f"[::]:{port}", launch.num_processes, heartbeat_timeout=HEARTBEAT_TIMEOUT
        )
    state.client = native.get_distributed_runtime_client(
        launch.coordinator,
        launch.process_id,
        init_timeout=launch.init_timeout,
        use_compression=True,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        missed_heartbeat_callback=_on_service_error,
    )
    state.client.connect()
    state.initialize_preemption_sync_manager()


def _first(error: Exception) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(error).__name__


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _forget_client() -> None:
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client = None
    jax_distributed.global_state.service = None


def _init_failure(launch: Launch, error: Exception, timed_out: bool = False) -> str:
    text = str(error)
    me = f"process {launch.process_id} of {launch.num_processes}"
    if timed_out:
        text = "DEADLINE_EXCEEDED"
    if "uplicate" in text or "already registered" in text or "restarted" in text:
        why = f"another process already registered as id {launch.process_id} (a duplicated id?)"
    elif "DEADLINE_EXCEEDED" in text or "timed out" in text.lower() or "Timeout" in text:
        why = (
            f"not every process arrived within {launch.init_timeout} s (a process that did not "
            "start, a duplicated --process-id, or a --num-processes that differs between "
            "processes)"
        )
    elif "UNAVAILABLE" in text or "onnect" in text:
        why = f"the coordinator {launch.coordinator} could not be reached (is process 0 running?)"
    else:
        why = _first(error)
    return (
        f"{me} could not join the run at {launch.coordinator}: {why}; start every process "
        f"with the same coordinator and count and ids 0..{launch.num_processes - 1}"
    )


FAILURE_BYTES = 1024  # of each process's line in the start agreement


@contextlib.contextmanager
def started_together():
    """Every process runs the checks inside, then all of them agree (one all-gather of each
    one's failure line, empty for none): a process that failed raises its own error, and its
    peers raise its line (exit 2) instead of waiting for it in the next collective."""
    try:
        yield
    except Exception as e:
        # raises this process's line (or an earlier process's), marked as known to every peer
        _agree(_first(e) if isinstance(e, SaejaxError) else f"{type(e).__name__}: {_first(e)}")
        raise
    _agree("")


def _agree(failure: str) -> None:
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.zeros(FAILURE_BYTES, np.uint8)
    text = failure.encode(errors="replace")[:FAILURE_BYTES]
    mine[: len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine, tiled=False))
    if failure:
        return  # the caller raises its own error
    for index, row in enumerate(every.reshape(jax.process_count(), FAILURE_BYTES)):
        line = row.tobytes().rstrip(b"\0").decode(errors="replace")
        if line:
            error = SaejaxError(f"process {index} could not start the run: {line}")
            mark_peers_alive(error)  # every process knows of it: not told again (watchdog)
            raise error


def config_fingerprint(flat: dict) -> np.ndarray:
    """Per key (in sorted order), 8 bytes of a hash of its value, as uint32 pairs."""
    rows = []
    for key in sorted(flat):
        digest = hashlib.blake2b(json.dumps(flat[key], sort_keys=True).encode(), digest_size=8)
        rows.append(np.frombuffer(digest.digest(), dtype=np.uint32))
    return np.stack(rows)


def differing_keys(flat: dict, fingerprints: np.ndarray) -> list[str]:
    """The keys whose hash differs between any two processes ([processes, keys, 2])."""
    keys = sorted(flat)
    same = (fingerprints == fingerprints[:1]).all(axis=(0, 2))
    return [k for k, ok in zip(keys, same) if not ok]


def check_same_config(flat: dict) -> None:
    """Every process must train the same config: compare the flattened resolved config's
    per-key hashes across processes; one line naming the differing keys (exit 2 on every
    process, since every process sees the same difference)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = config_fingerprint(flat)
    every = np.asarray(multihost_utils.process_allgather(mine, tiled=False))
    keys = differing_keys(flat, every.reshape(jax.process_count(), *mine.shape))
    if keys:
        shown = ", ".join(f"{k} (here {flat[k]!r})" for k in keys[:8])
        raise SaejaxError(
            f"the {jax.process_count()} processes were started with different settings: "
            f"{shown}; start every process with the same config and --set values"
        )


def flat_config(cfg) -> dict:
    """{"train.lr": 0.01, ...}: the config as one level of dotted keys (JSON values)."""
    from saejax import io

    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(io.jsonable(dataclasses.asdict(cfg)), "")
    return out
