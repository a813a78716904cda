"""Launch settings come from the launch, never from config.yaml; the checks made at start;
the step watchdog. All in this process (the multi-process runs are in test_multiprocess.py)."""

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml
from helpers import REPO_ROOT, free_port

from saejax.cli import main
from saejax.config import load_config
from saejax.errors import SaejaxError
from saejax.train import watchdog as W
from saejax.train.launch import (
    Launch,
    check_port_free,
    config_fingerprint,
    differing_keys,
    flat_config,
    resolve_launch,
    roll_call,
)


def test_flags_then_saejax_variables_then_torchrun():
    env = {"SAEJAX_COORDINATOR": "h0:1234", "SAEJAX_NUM_PROCESSES": "4", "SAEJAX_PROCESS_ID": "3"}
    env.update(MASTER_ADDR="t0", MASTER_PORT="29400", WORLD_SIZE="2", RANK="1")
    flags = resolve_launch("f0:99", 2, 0, environ=env)
    assert (flags.coordinator, flags.num_processes, flags.process_id) == ("f0:99", 2, 0)
    ours = resolve_launch(environ=env)
    assert (ours.coordinator, ours.num_processes, ours.process_id) == ("h0:1234", 4, 3)
    torchrun = {k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    t = resolve_launch(environ=torchrun)
    assert (t.coordinator, t.num_processes, t.process_id) == ("t0:29400", 2, 1)
    assert resolve_launch(environ={}).coordinator == ""  # one process
    assert resolve_launch(environ={"SAEJAX_INIT_TIMEOUT": "7"}).init_timeout == 7


@pytest.mark.parametrize(
    "flags, words",
    [
        (("h:1", 2, None), "process's id"),
        (("h:1", 2, 2), "0..1"),
        (("h:1", 0, 0), "at least 1"),
        (("nohost", 2, 0), "host:port"),
        ((None, 2, 1), "coordinator"),
    ],
)
def test_an_incomplete_launch_is_one_line(flags, words):
    with pytest.raises(SaejaxError, match=words):
        resolve_launch(*flags, environ={})


def test_a_config_yaml_with_launch_settings_still_loads_without_them(tmp_path, capsys):
    """config.yaml of a run written before they were launch settings (issue 22): resuming on
    one process took process 0's coordinator and waited for the others forever."""
    path = tmp_path / "config.yaml"
    values = {
        "data": {"path": "acts.npy"},
        "mesh": {"data": 2, "coordinator": "h0:1234", "num_processes": 2, "process_id": 0},
    }
    path.write_text(yaml.safe_dump(values))
    cfg = load_config(str(path))
    assert cfg.mesh.data == 2 and not hasattr(cfg.mesh, "coordinator")
    assert "ignoring mesh.coordinator, mesh.num_processes, mesh.process_id" in (
        capsys.readouterr().err
    )
    assert "coordinator" not in yaml.safe_load(yaml.safe_dump(flat_config(cfg)))


def test_set_of_a_launch_setting_points_at_the_flag(capsys):
    code = main(["train", "--set", "data.path=x.npy", "--set", "mesh.process_id=1"])
    assert code == 2
    assert "--process-id" in capsys.readouterr().err


def test_fingerprints_name_the_keys_that_differ():
    a = {"train.lr": 0.01, "sae.k": 4, "run_dir": "r"}
    b = {**a, "train.lr": 0.02}
    prints = np.stack([config_fingerprint(a), config_fingerprint(a), config_fingerprint(b)])
    assert differing_keys(a, prints) == ["train.lr"]
    assert differing_keys(a, prints[:2]) == []


def test_a_taken_coordinator_port_is_found_before_binding():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        with pytest.raises(SaejaxError, match="already in use"):
            check_port_free(f"localhost:{s.getsockname()[1]}")


def test_one_process_is_never_paced():
    assert not W.must_pace()


class Fired(Exception):
    pass


def test_the_watchdog_fires_on_a_step_far_slower_than_the_median(monkeypatch):
    lines = []

    def fake_exit(line, code=W.RESTART_EXIT):
        lines.append((line, code))
        raise Fired

    monkeypatch.setattr(W, "exit_now", fake_exit)
    dog = W.StepWatchdog("RUN", lambda: 16, factor=10, min_seconds=1.0)
    assert dog.limit() is None  # the first steps compile: not armed yet
    dog.beat(0)
    dog.beat(1)
    dog.durations.clear()
    dog.durations.extend([0.1, 0.1, 0.1])  # three steps of 0.1 s after the compiling ones
    dog.step, dog.beat_at = 4, 50.0
    assert dog.limit() == 1.0  # 10 x 0.1 s, but at least min_seconds
    dog._check(50.9)  # within the limit: nothing
    with pytest.raises(Fired):
        dog._check(51.5)
    ((line, code),) = lines
    assert code == 75 and "step 5" in line and "step 16" in line and "--resume RUN" in line


def test_a_signal_that_is_not_acted_on_ends_the_process(monkeypatch):
    monkeypatch.setattr(W, "exit_now", lambda line, code=75: (_ for _ in ()).throw(Fired(line)))
    dog = W.StepWatchdog("RUN", lambda: None, factor=10, min_seconds=2.0)
    dog.signalled_at = 100.0
    dog._check(101.0)
    with pytest.raises(Fired, match="stopped by a signal.*no checkpoint yet"):
        dog._check(102.5)


class Beacons:
    """The coordination store's beacons as `peers_gone` reads them: `beating` processes bump
    their counter between reads, the others stay put; `answers=False` is a lost process 0.
    Other keys (a failed process's `saejax/failed/<call>/<i>`) are kept in `keys`."""

    def __init__(self, beating, count=3, answers=True, done=()):
        self.beating, self.count, self.answers, self.reads = beating, count, answers, 0
        self.done = set(done)  # processes that finished their part (their last beat)
        self.keys = {}

    def key_value_dir_get(self, prefix):
        if not self.answers:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        if prefix != W.BEACON_KEY:
            return [(k, v) for k, v in self.keys.items() if k.startswith(prefix)]
        self.reads += 1

        def value(i):
            return W.DONE_BEAT if i in self.done else str(self.reads if i in self.beating else 7)

        return [(f"{prefix}{i}", value(i)) for i in range(self.count)]

    def key_value_set(self, key, value, allow_overwrite=False):
        if not self.answers:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        self.keys[key] = value


def fired(line, code=W.RESTART_EXIT, then=None):
    """exit_now in these tests: raise Fired(line) (its .code the status) instead of exiting."""
    error = Fired(line)
    error.code = code
    raise error


@pytest.fixture
def three_processes(monkeypatch):
    """This process is process 0 of 3; exit_now raises Fired(line) instead of exiting."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(W, "PROBE_SECONDS", 0.01)
    monkeypatch.setattr(W, "exit_now", fired)
    # this process's own state: fresh for each test (a failure here marks it)
    monkeypatch.setattr(W, "_abort", dict(W._abort, ending=False, code=W.RESTART_EXIT))
    monkeypatch.setattr(W, "_own", {"end": False})
    monkeypatch.setattr(W, "_run", {"dir": None, "kept": None, "release": None, "attempt": 1})

    def beacons(store):
        monkeypatch.setattr(W, "_beacon", {"client": store})

    return beacons


def test_any_failure_is_a_lost_peer_when_a_peer_stopped_beating(three_processes):
    three_processes(Beacons(beating={0, 1}))
    assert W.peers_gone() == [2]
    # orbax's barrier before a save raises Gloo's failure as a ValueError (issue 22)
    with pytest.raises(Fired, match=r"lost contact.*Gloo AllGather.*process\(es\) 2 died"):
        W.end_if_peer_lost(ValueError("Gloo AllGather failed"), "RUN", lambda: 8)
    three_processes(Beacons(beating={0}, answers=False))  # process 0, the store's host, died
    assert W.peers_gone() == [0]
    with pytest.raises(Fired, match=r"the last checkpoint is step 8.*--resume RUN"):
        W.end_if_peer_lost(TimeoutError("barrier"), "RUN", lambda: 8)


def test_a_failure_while_every_peer_beats_is_not_a_lost_peer(three_processes):
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    assert W.peers_gone() == []
    bug = ValueError("a plain bug")
    W.end_if_peer_lost(bug, "RUN", lambda: 8)  # returns: the caller raises it
    W.end_if_peer_lost(bug, "RUN", lambda: 8)  # looked at once only (the watchdog, then train)
    assert store.reads == 4
    # user errors, Ctrl-C and a failure the peers were told of are never probed
    three_processes(Beacons(beating={0}, answers=False))
    W.end_if_peer_lost(SaejaxError("train.lr must be positive"), "RUN", lambda: 8)
    W.end_if_peer_lost(KeyboardInterrupt(), "RUN", lambda: 8)
    told = ValueError("cannot read the store")  # the peers were told (started_together)
    W.mark_peers_alive(told)
    W.end_if_peer_lost(told, "RUN", lambda: 8)


def test_a_peer_that_finished_its_part_is_not_a_lost_peer(three_processes):
    """Process 0 fails while writing the final SAE, after its peers returned from training and
    wait in JAX's exit barrier (their beacons stopped, last beat DONE_BEAT): a bug, not a lost
    peer (exit 75 would have an orchestrator restart a bug forever)."""
    three_processes(Beacons(beating={0}, done={1, 2}))
    assert W.peers_gone() == []
    W.end_if_peer_lost(OSError("No space left on device: eval.json"), "RUN", lambda: 8)


def test_the_first_failed_peer_is_the_lowest_index():
    store = Beacons(beating=set(), count=11)
    store.keys = {f"{W.failed_key_prefix()}{i}": '{"line": "x"}' for i in (10, 2)}
    assert W.failed_peer(store)[0] == 2  # not "10", which sorts first as text


def test_without_a_beacon_a_failed_collective_is_a_lost_peer(three_processes):
    import jax

    three_processes(None)
    assert W.peers_gone() is None
    W.end_if_peer_lost(ValueError("a plain bug"), "RUN", lambda: None)
    try:
        raise jax.errors.JaxRuntimeError("UNAVAILABLE: Gloo")
    except jax.errors.JaxRuntimeError as e:
        wrapped = TimeoutError("timed out at a barrier")
        wrapped.__cause__ = e
    with pytest.raises(Fired, match="no checkpoint yet"):
        W.end_if_peer_lost(wrapped, "RUN", lambda: None)


def test_a_flag_fills_in_what_the_environment_leaves_out():
    env = {"SAEJAX_COORDINATOR": "h0:1234", "SAEJAX_NUM_PROCESSES": "4"}
    launch = resolve_launch(process_id=2, environ=env)
    assert (launch.coordinator, launch.num_processes, launch.process_id) == ("h0:1234", 4, 2)


def test_a_jax_abort_becomes_one_line_and_exit_75():
    """JAX aborts (SIGABRT) from a C++ thread when its coordination service fails (process 0
    died, a missed heartbeat): the handler says one line and exits 75 instead."""
    script = (
        "import os, threading\n"
        "from saejax.train import watchdog as W\n"
        "W.catch_jax_abort()\n"
        "W.when_jax_aborts(lambda: 'lost the coordinator; resume RUN')\n"
        "t = threading.Thread(target=os.abort)\n"  # like JAX: not the main thread
        "t.start(); t.join()\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 75, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("saejax: error:")]
    assert lines == ["saejax: error: lost the coordinator; resume RUN"]


def roll(ids, counts):
    """What each process of a launch hears from the roll call: "ok" or its error line."""
    port, heard = free_port(), {}

    def one(slot, launch):
        try:
            roll_call(launch)
            heard[slot] = "ok"
        except SaejaxError as e:
            heard[slot] = str(e)

    threads = [
        threading.Thread(target=one, args=(slot, Launch(f"localhost:{port}", n, i, 10)))
        for slot, (i, n) in enumerate(zip(ids, counts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return [heard.get(slot, "hung") for slot in range(len(ids))]


def test_the_roll_call_lets_a_whole_launch_through_and_names_what_is_wrong():
    assert roll([0, 1, 2], [3, 3, 3]) == ["ok", "ok", "ok"]
    for line in roll([0, 1, 1], [3, 3, 3]):
        assert "two processes were started with --process-id 1" in line, line
    for line in roll([0, 1], [2, 3]):
        assert "process 1 (" in line and "--num-processes 3, process 0 with 2" in line, line


def test_a_bug_while_every_peer_beats_is_told_to_the_peers(three_processes):
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    W.end_if_peer_lost(ValueError("a plain bug\nmore"), "RUN", lambda: 8)  # the caller raises
    assert json.loads(store.keys[f"{W.failed_key_prefix()}0"]) == {
        "user_error": False,
        "line": "ValueError: a plain bug",
    }
    # from then on this process ends by its own error: a peer's failure does not end it
    store.keys[f"{W.failed_key_prefix()}2"] = json.dumps(
        {"user_error": False, "line": "KeyError: 'x'"}
    )
    W.end_if_peer_lost(RuntimeError("a second error"), "RUN", lambda: 8)


def test_a_user_error_on_one_process_is_told_without_a_probe(three_processes):
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    W.end_if_peer_lost(SaejaxError("chunk 3 of acts/x is missing"), "RUN", lambda: 8)
    assert store.reads == 0
    value = json.loads(store.keys[f"{W.failed_key_prefix()}0"])
    assert value == {"user_error": True, "line": "chunk 3 of acts/x is missing"}


def test_a_peer_that_failed_ends_this_process_with_its_line(three_processes):
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    released = []
    W.watch_run("RUN", lambda: 16, release=lambda: released.append(True))
    store.keys[f"{W.failed_key_prefix()}2"] = json.dumps(
        {"user_error": False, "line": "RuntimeError: boom"}
    )
    # this process's collective broke because process 2 went: its failure, not a lost peer
    with pytest.raises(Fired) as ended:
        W.end_if_peer_lost(ValueError("Gloo AllGather failed"), "RUN", lambda: 16)
    line = str(ended.value)
    assert ended.value.code == W.PEER_FAILED_EXIT == 3
    assert "process 0 stopped because process 2 failed with RuntimeError: boom" in line
    assert "process 2's output" in line and "the last checkpoint is step 16" in line
    assert "--resume RUN" in line
    assert store.reads == 0  # no probe: the store said what happened

    # the beacon thread's way: the same line; a user error there ends this one with exit 2
    W.watch_run("RUN", lambda: None)  # a second train() call: the first one's failure is past
    assert W.failed_peer(store) is None
    store.keys[f"{W.failed_key_prefix()}2"] = json.dumps(
        {"user_error": True, "line": "a missing chunk"}
    )
    with pytest.raises(Fired) as ended:
        W.end_for_failed_peer(*W.failed_peer(store))
    assert ended.value.code == 2
    assert str(ended.value) == (
        "process 0 stopped because process 2 failed: a missing chunk; no checkpoint yet; "
        "fix the cause, then start the run again"
    )


def test_a_process_whose_training_ended_is_not_ended_by_a_peer(three_processes):
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    W.watch_run("RUN", lambda: 32)
    W.ends_on_its_own()  # its train() returned (or failed and said so)
    store.keys[f"{W.failed_key_prefix()}1"] = json.dumps(
        {"user_error": False, "line": "OSError: full"}
    )
    W.end_for_failed_peer(*W.failed_peer(store))  # returns


def test_a_failure_the_peers_were_told_of_is_not_ended_by_their_line(three_processes):
    """A check that failed here (started_together told every peer): the peers' own
    "process 0 could not start the run" must not end this process before it says its line."""
    store = Beacons(beating={0, 1, 2})
    three_processes(store)
    told = SaejaxError("cannot read the store")
    W.mark_peers_alive(told)
    W.end_if_peer_lost(told, "RUN", lambda: None)
    store.keys[f"{W.failed_key_prefix()}1"] = json.dumps(
        {"user_error": True, "line": "process 0 ..."}
    )
    W.end_for_failed_peer(*W.failed_peer(store))  # returns
    assert f"{W.failed_key_prefix()}0" not in store.keys  # told once, by started_together
