"""Multi-process runs on the CPU: local processes, each with its own fake CPU devices, meet
through a coordinator on a free port. Every process runs under a timeout and is killed at the
end of its test, so a hang fails the test instead of stalling CI.

benchmarks/multiprocess_repeat.py repeats the layout runs by hand (several times each)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO_ROOT, free_port, small_config, superposition_data
from safetensors.numpy import load_file

from saejax.train.run import train

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
TIMEOUT = 240  # seconds for one multi-process run on a loaded 2-core machine

# the run of tests/helpers.small_config, as --set values for `saejax train` (32 steps)
TINY = [
    "sae.d_sae=64",
    "sae.k=4",
    "train.tokens=8192",
    "train.batch_size=256",
    "train.lr=1e-2",
    "train.lr_warmup_steps=0",
    "train.log_every=8",
    "train.checkpoint_every=8",
    "data.validation_tokens=1024",
    "data.block_rows=256",
    "data.shuffle_blocks=2",
    "log.progress=false",
    "sae.dead_tokens=2048",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = superposition_data(8192 + 1024, d=32, m=128, p=0.03)
    path = str(tmp_path_factory.mktemp("mp") / "acts.npy")
    np.save(path, rows)
    return path


class Processes:
    """`saejax train` in N local processes with `devices` fake CPU devices each."""

    def __init__(self):
        self.procs = []

    def start(self, n, args, devices=1, ids=None, count=None, port=None, extra=None, cwd=None):
        port = port or free_port()
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            TF_CPP_MIN_LOG_LEVEL="2",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
        )
        started = []
        for i in ids if ids is not None else range(n):
            launch = [f"--coordinator=localhost:{port}", f"--num-processes={count or n}"]
            launch += [f"--process-id={i}", "--init-timeout=20"]
            more = (extra or {}).get(i, [])
            p = subprocess.Popen(
                [sys.executable, "-m", "saejax", "train", *args, *launch, *more],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                cwd=(cwd or {}).get(i),
            )
            self.procs.append(p)
            started.append(p)
        return started

    def wait(self, procs, timeout=TIMEOUT):
        """[(returncode, stderr)] of each process, killing all of them past `timeout`."""
        deadline = time.monotonic() + timeout
        out = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"a process did not end within {timeout} s (a hang)")
            out.append((p.returncode, err))
        return out

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.kill()


def run_args(data, run_dir, *sets):
    args = [f"--set=data.path={data}", f"--set=run_dir={run_dir}"]
    return args + [f"--set={s}" for s in (*TINY, *sets)]


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("saejax: error:")]


def wait_for_metrics(run_dir, process, lines):
    """Until process 0 has logged `lines` lines of metrics (the run is training)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + TIMEOUT
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= lines):
        assert time.monotonic() < deadline and process.poll() is None, "the run did not start"
        time.sleep(0.5)


def weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "sae", "sae_weights.safetensors"))


def assert_same_sae(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-4, atol=atol, err_msg=name)


def one_process(data, run_dir, *sets):
    """The reference: the same run in this (one-device) test process."""
    sets = [*TINY, *sets]
    return train(small_config(data, run_dir, *sets))


@pytest.mark.parametrize(
    "n, devices, mesh, arch, slices",
    [
        (2, 4, (4, 2), "topk", 2),
        (2, 4, (2, 4), "relu", 2),
        (4, 2, (2, 4), "batchtopk", 4),
    ],
)
def test_several_devices_per_process_train_what_one_process_trains(
    data, tmp_path, processes, n, devices, mesh, arch, slices
):
    # these layouts deadlocked before each step was waited for (issue 22): the host ran more
    # than 32 programs ahead (no metrics fetch nor checkpoint, which wait, in 64 steps here)
    sets = [f"sae.architecture={arch}", f"data.slices={slices}", "train.tokens=16384"]
    sets += ["train.log_every=100", "train.checkpoint_every=100"]
    on_mesh = [f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}"]
    run = str(tmp_path / "mp")
    results = processes.wait(processes.start(n, run_args(data, run, *sets, *on_mesh), devices))
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    one_process(data, str(tmp_path / "one"), *sets)
    assert_same_sae(str(tmp_path / "one"), run)


def two_script_processes(data, run, logs, *extra):
    """tests/scripts/multiprocess_run.py as processes 0 and 1 of a 2-process run (one CPU
    device each) on a free port; `extra` is the script's optional last arguments."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    port, script = free_port(), os.path.join(SCRIPTS, "multiprocess_run.py")
    return [
        subprocess.Popen(
            [sys.executable, script, data, run, logs[i], str(i), "2", str(port), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_read_only_their_own_slices(data, tmp_path):
    """The original one-device-per-process run (tests/scripts/multiprocess_run.py), which
    records every row range each process reads."""
    logs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = two_script_processes(data, str(tmp_path / "two"), logs)
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    train_rows = 8192
    half = train_rows // 2
    for i, log in enumerate(logs):
        blocks = [(a, b) for a, b in json.load(open(log)) if b - a == 256]
        assert blocks, "no training reads recorded"
        assert all(i * half <= a and b <= (i + 1) * half for a, b in blocks), (i, blocks[:5])
    assert os.path.exists(tmp_path / "two" / "eval.json")


def test_a_peer_killed_during_a_checkpoint_save_ends_the_survivor_with_one_line(data, tmp_path):
    """Process 1 dies as step 16's checkpoint starts: process 0, inside orbax's barrier
    before that save, sees a ValueError (Gloo's failed all-gather), not a JaxRuntimeError.
    It ended with a traceback (exit 1 in a CI rehearsal, issue 22); now the peers' beacons
    show process 1 is gone: one line, the resume command, exit 75, without waiting for JAX's
    60 s heartbeat timeout."""
    run = str(tmp_path / "run")
    procs = two_script_processes(data, run, [str(tmp_path / f"p{i}.json") for i in range(2)], "16")
    try:
        procs[1].wait(timeout=TIMEOUT)
        died = time.monotonic()
        assert procs[1].returncode == -signal.SIGKILL
        _, err = procs[0].communicate(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 75, err[:3000] + " ... " + err[-1500:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = errors(err)
    assert "lost contact with its peers" in line and "process(es) 1 died" in line, line
    assert f"--resume {run}" in line and "no checkpoint yet" in line, line
    assert time.monotonic() - died < 45  # the beacons, not JAX's heartbeat timeout


def test_a_killed_process_ends_its_peer_with_one_line_and_resume_finishes(
    data, tmp_path, processes
):
    run = str(tmp_path / "run")
    # a long run (the kill lands mid-training), mesh (2, 1): one device per process
    # a constant lr: the resume may shorten the run (--force) without changing any step
    sets = ["mesh.data=2", "train.log_every=4", "train.lr_schedule=constant"]
    args = run_args(data, run, *sets, "train.tokens=1000000", "mesh.step_timeout_min_seconds=30")
    p0, p1 = processes.start(2, args)
    wait_for_metrics(run, p0, 3)
    killed = time.monotonic()
    os.killpg(p1.pid, signal.SIGKILL)
    ((code, err),) = processes.wait([p0], timeout=150)
    assert code == 75, err[:3000] + " ... " + err[-1500:]  # EX_TEMPFAIL: restart on it
    (line,) = errors(err)
    assert "--resume" in line and "checkpoint" in line, line
    assert time.monotonic() - killed < 120

    # resume on both processes, with a shorter run (--force: train.tokens changes)
    resumed = processes.start(2, ["--resume", run, "--force", "--set=train.tokens=16384"])
    results = processes.wait(resumed)
    assert all(code == 0 for code, _ in results), [e[-2000:] for _, e in results]
    one_process(data, str(tmp_path / "one"), *sets[1:], "data.slices=2", "train.tokens=16384")
    assert_same_sae(str(tmp_path / "one"), run)


def test_a_killed_coordinator_ends_its_peer_with_one_line(data, tmp_path, processes):
    """Process 0 hosts JAX's coordination service: its death made JAX abort the others with
    a C++ std::bad_cast (issue 22); now one line with the resume command and exit 75."""
    run, port = str(tmp_path / "run"), free_port()
    args = run_args(data, run, "mesh.data=2", "train.tokens=1000000")
    p0, p1 = processes.start(2, args, port=port)
    wait_for_metrics(run, p0, 2)
    # a second process 1, started late: told so, and the run goes on
    ((code, err),) = processes.wait(processes.start(2, args, ids=[1], port=port), timeout=60)
    assert code == 2 and "--process-id 1 given twice" in errors(err)[0], err[-2000:]
    assert p0.poll() is None and p1.poll() is None
    os.killpg(p0.pid, signal.SIGKILL)
    ((code, err),) = processes.wait([p1], timeout=60)
    assert code == 75, err[-3000:]
    (line,) = errors(err)  # JAX's abort, or (when it comes first) the failed collective
    assert "process 0 died" in line or "lost contact" in line, line
    assert f"--resume {run}" in line, line


def test_a_run_written_by_two_processes_resumes_on_one_and_on_four(data, tmp_path, processes):
    sets = ["data.slices=4", "mesh.data=2"]
    two = str(tmp_path / "two")
    results = processes.wait(processes.start(2, [*run_args(data, two, *sets), "--max-steps=12"]))
    assert all(code == 130 or code == 0 for code, _ in results), [e[-2000:] for _, e in results]
    four = str(tmp_path / "four")
    os.system(f"cp -r {two} {four}")

    # on one process (this one, one device): the launch settings were never saved
    from saejax.train.run import load_run_config

    train(load_run_config(two, ["mesh.data=1"]), resume=True)
    one_process(data, str(tmp_path / "one"), "data.slices=4")
    assert_same_sae(str(tmp_path / "one"), two)

    # on four processes with one device each
    resumed = processes.start(4, ["--resume", four, "--set=mesh.data=4"])
    results = processes.wait(resumed)
    assert all(code == 0 for code, _ in results), [e[-2000:] for _, e in results]
    assert_same_sae(str(tmp_path / "one"), four)


def test_bad_launches_end_every_process_with_one_line(data, tmp_path, processes):
    """Each bad launch ends every process that came within the initialization timeout with
    one line and exit 2, never a hang. All cases run at once (their waits overlap)."""
    from saejax.train.rundir import RunLock

    def args(name, *sets, path=data):
        return run_args(path, str(tmp_path / name), "mesh.data=2", *sets)

    cases = {
        # a missing process (process 0 waits out its shorter timeout) and a wrong count
        "missing": processes.start(2, args("missing"), ids=[0], extra={0: ["--init-timeout=8"]}),
        "count": processes.start(2, args("count"), extra={0: ["--num-processes=3"]}),
        # saejax's roll call names the duplicated id on every process (JAX aborted them
        # with std::bad_cast, or they waited out the timeout: issue 22)
        "duplicate": processes.start(3, args("duplicate"), ids=[0, 1, 1]),
        # the config check names the key
        "settings": processes.start(2, args("settings"), extra={1: ["--set=train.lr=0.02"]}),
    }
    for name in "ab":
        os.makedirs(tmp_path / name)
    os.symlink(data, tmp_path / "a" / "acts.npy")  # "acts.npy" only where process 0 runs
    cwd = {0: str(tmp_path / "a"), 1: str(tmp_path / "b")}
    cases["store"] = processes.start(2, args("store", path="acts.npy"), cwd=cwd)
    with socket.socket() as taken, RunLock(str(tmp_path / "locked")):
        # process 0's run lock held by another job
        cases["lock"] = processes.start(2, args("locked"))
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases["port"] = processes.start(2, args("port"), ids=[0], port=port)
        results = {name: processes.wait(procs, timeout=150) for name, procs in cases.items()}
    lines = {}
    for name, procs in results.items():
        for code, err in procs:
            assert code == 2, (name, err[-2000:])
            assert len(errors(err)) == 1, (name, err[-2000:])
        lines[name] = [errors(err)[0].removeprefix("saejax: error: ") for _, err in procs]
    assert "1 of 2 did not report within 8 s" in lines["missing"][0]
    assert all("--num-processes 2, process 0 with 3" in line for line in lines["count"])
    assert all("two processes were started with --process-id 1" in x for x in lines["duplicate"])
    assert all("train.lr" in x and "different settings" in x for x in lines["settings"])
    assert not os.path.exists(tmp_path / "settings" / "config.yaml")
    assert "in use" in lines["port"][0]
    # a process that fails its own checks (a store it cannot read, the run lock taken) ends
    # its peers with its line: they waited in the next collective before (issue 22)
    assert lines["store"][0] == f"process 1 could not start the run: {lines['store'][1]}"
    assert "in use by another saejax process" in lines["lock"][0]
    assert lines["lock"][1] == f"process 0 could not start the run: {lines['lock'][0]}"


def test_sigterm_to_one_process_stops_every_process_at_one_checkpoint(data, tmp_path, processes):
    run = str(tmp_path / "run")
    args = run_args(data, run, "mesh.data=2", "train.tokens=1000000", "train.log_every=4")
    p0, p1 = processes.start(2, args)
    wait_for_metrics(run, p0, 2)
    os.kill(p1.pid, signal.SIGTERM)  # the other process hears nothing
    results = processes.wait([p0, p1], timeout=120)
    for code, err in results:
        assert code == 130, err[-2000:]
        assert "checkpoint saved" in err and f"--resume {run}" in err
    steps = [int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit()]
    assert max(steps) % 4 == 0  # agreed at a metrics step, written by both


@pytest.mark.parametrize("failing, step", [(0, 8), (1, 20)])
def test_a_bug_on_one_process_ends_every_process_within_seconds(data, tmp_path, failing, step):
    """A RuntimeError on one process of a healthy run (tests/scripts/multiprocess_run.py
    raises it at `step`): its peer, blocked in its next collective, waited for the 300 s step
    watchdog and the failing process for JAX's heartbeat abort (exit 75, "lost"). Now the
    failing process tells its peer through the coordination store: it exits 1 with its
    traceback, the peer exits 3 with one line naming it, both within seconds. Step 20 is
    after the checkpoint at 16: the line names it and the resume command."""
    run = str(tmp_path / "run")
    logs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = two_script_processes(data, run, logs, f"raise:{failing}:{step}")
    ended, errs = {}, {}
    try:
        for i, p in enumerate(procs):
            _, errs[i] = p.communicate(timeout=TIMEOUT)
            ended[i] = time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    raised = float(open(logs[failing] + ".raised").read())
    peer = 1 - failing
    err = errs[failing]
    assert procs[failing].returncode == 1, err[-3000:]
    assert "Traceback" in err and f"RuntimeError: a plain bug at step {step}" in err, err[-3000:]
    assert not errors(err), err[-3000:]
    err = errs[peer]
    assert procs[peer].returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = errors(err)
    assert f"process {peer} stopped because process {failing} failed with RuntimeError" in line
    assert f"a plain bug at step {step}" in line and f"process {failing}'s output" in line, line
    if step < 16:  # process 0, failing before a checkpoint, may remove the run it created
        assert "no checkpoint yet; fix the cause, then start the run again" in line, line
    else:  # process 0, ending for its peer, released the run lock
        assert "the last checkpoint is step 16; fix the cause" in line, line
        assert f"--resume {run}" in line, line
        assert not os.path.exists(os.path.join(run, ".saejax-lock"))
    # ended by the store's key, not by the 300 s step watchdog nor JAX's heartbeat abort
    assert max(ended.values()) - raised < 40, (ended, raised)
