"""A stopped run (also by kill -9 between checkpoints) resumes to where an uninterrupted run
ends."""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from helpers import small_config, superposition_data

from saejax.config import dump_yaml
from saejax.train.run import load_run_config, train


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(20_000, d=32, m=128, p=0.03, seed=3)
    path = tmp_path_factory.mktemp("resume") / "rows.npy"
    np.save(path, rows)
    return str(path)


def _params(state):
    return jax.tree_util.tree_map(np.asarray, state.params)


def _assert_same(a, b):
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_stop_and_resume_equals_uninterrupted(rows_path, tmp_path, arch):
    extra = [f"sae.architecture={arch}", "train.resample.every_steps=20", "sae.dead_tokens=512"]
    full = train(small_config(rows_path, str(tmp_path / "full"), *extra))
    stopped = train(small_config(rows_path, str(tmp_path / "part"), *extra), max_steps=27)
    assert int(stopped.state.step) == 27
    resumed = train(load_run_config(str(tmp_path / "part")), resume=True)
    assert int(resumed.state.step) == int(full.state.step) == 64
    _assert_same(_params(full.state), _params(resumed.state))
    assert int(full.state.resampled_total) == int(resumed.state.resampled_total)
    assert resumed.final_metrics["fvu"] == pytest.approx(full.final_metrics["fvu"], rel=1e-5)


def test_kill_9_between_checkpoints_then_resume(rows_path, tmp_path):
    cfg = small_config(
        rows_path, str(tmp_path / "killed"), "train.tokens=65536", "train.checkpoint_every=20"
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    cmd = [sys.executable, "-m", "saejax", "train", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once a checkpoint exists and training went past it
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            metrics = tmp_path / "killed" / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-m", "saejax", "train", "--resume", str(tmp_path / "killed")],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    full = train(
        small_config(
            rows_path, str(tmp_path / "full"), "train.tokens=65536", "train.checkpoint_every=20"
        )
    )
    from saejax.train.sae_files import read_native

    killed_params = read_native(str(tmp_path / "killed"))["params"]
    _assert_same(_params(full.state), killed_params)


def test_sigterm_checkpoints_and_exits(rows_path, tmp_path):
    cfg = small_config(
        rows_path, str(tmp_path / "term"), "train.tokens=2000000", "train.checkpoint_every=100000"
    )
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "saejax", "train", str(tmp_path / "cfg.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    steps = [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and 0 < max(steps) < 2000000 // 256
    saved = yaml.safe_load((tmp_path / "term" / "config.yaml").read_text())
    assert saved["train"]["tokens"] == 2000000


def test_resume_before_the_first_checkpoint_starts_over(rows_path, tmp_path):
    cfg = small_config(rows_path, str(tmp_path / "early"), "train.checkpoint_every=1000")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text(
        dump_yaml(cfg)
    )  # as a run killed at step 5 leaves it
    resumed = train(load_run_config(str(tmp_path / "early")), resume=True)
    full = train(small_config(rows_path, str(tmp_path / "full"), "train.checkpoint_every=1000"))
    _assert_same(_params(full.state), _params(resumed.state))
