"""One process per run directory: two `saejax train` on one run_dir started together, one
trains and the other exits 2 in one line; a sweep holds its members' directories too; a lock
left by a killed process is taken over with a note."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.cli import main
from saejax.config import dump_yaml
from saejax.train.rundir import LOCK_NAME, RunLock


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1, seed=4)
    path = tmp_path_factory.mktemp("lock") / "rows.npy"
    np.save(path, rows)
    return str(path)


def test_two_trains_started_together_one_runs_the_other_exits_2(rows_path, tmp_path):
    run = tmp_path / "run"
    cfg = small_config(rows_path, str(run), "train.tokens=65536")
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "saejax", "train", str(tmp_path / "cfg.yaml")]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    (ok, _), (refused, err) = results
    assert (ok, refused) == (0, 2), results
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert (
        "in use by another saejax process (pid" in lines[0] or "already holds a run" in lines[0]
    ), lines
    assert (run / "sae").exists() and not (run / LOCK_NAME).exists()


def test_a_held_run_directory_is_refused(rows_path, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = small_config(rows_path, str(run))
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    with RunLock(str(run)):
        assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and f"in use by another saejax process (pid {os.getpid()} on" in err[0]
        ), err
    assert os.listdir(run) == []  # nothing was written while it was held
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0


def test_a_sweep_holds_its_members(rows_path, tmp_path, capsys):
    out = tmp_path / "sweep"
    sets = [f"data.path={rows_path}", "train.tokens=4096", "train.batch_size=256", "sae.k=4"]
    args = [
        "sweep",
        *sum((["--set", s] for s in sets), []),
        "--d-sae",
        "32",
        "--quiet",
        "--no-time-alone",
    ]
    with RunLock(str(out / "d32")):
        assert os.listdir(out) == ["d32"]
        assert main([*args, "--out", str(out)]) == 2
        assert "in use by another saejax process" in capsys.readouterr().err
    assert os.listdir(out) == ["d32"] and os.listdir(out / "d32") == []  # only what was there


def test_a_stale_lock_is_taken_over_with_a_note(rows_path, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    cfg = small_config(rows_path, str(run), "train.tokens=2048")
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert f"taking over the lock of {run} left by pid {dead.pid}" in capsys.readouterr().err
    assert not (run / LOCK_NAME).exists()
