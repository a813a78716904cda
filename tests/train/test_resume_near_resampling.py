"""A run stopped or killed a few steps before a resampling step resumes exactly: the pool of
recent batches the resampler draws from is refilled from the data stream, so the resumed run
ends with the uninterrupted run's parameters. After a kill -9, metrics.jsonl holds each step
once (the steps logged after the last checkpoint are dropped, then logged again)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.config import dump_yaml
from saejax.train.loop import refill_batches
from saejax.train.metrics import drop_records_after
from saejax.train.run import load_run_config, train

# resampling at step 20 from the last 8 batches; checkpoints at 18, 36, 54. A wide
# TopK without AuxK leaves latents dead within a batch (256 tokens), so resampling revives some.
NEAR = [
    "sae.architecture=topk",
    "sae.d_sae=512",
    "sae.aux_coefficient=0",
    "sae.dead_tokens=256",
    "train.resample.enabled=true",
    "train.resample.steps=[20]",
    "train.resample.pool_batches=8",
    "train.checkpoint_every=18",
]


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(12_000, d=32, m=128, p=0.03, seed=5)
    path = tmp_path_factory.mktemp("near") / "rows.npy"
    np.save(path, rows)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(rows_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    result = train(small_config(rows_path, str(run), *NEAR))
    assert int(result.state.resampled_total) > 0, "the test needs dead latents to revive"
    return run, result


def params(state) -> dict:
    return jax.tree_util.tree_map(np.asarray, state.params)


def assert_same(a: dict, b: dict):
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


def records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_stopped_two_steps_before_resampling_resumes_exactly(rows_path, uninterrupted, tmp_path):
    full_run, full = uninterrupted
    run = tmp_path / "run"
    stopped = train(small_config(rows_path, str(run), *NEAR), max_steps=18)
    assert int(stopped.state.step) == 18  # the resampler at 20 wants batches 12..19
    resumed = train(load_run_config(str(run)), resume=True)
    assert int(resumed.state.resampled_total) == int(full.state.resampled_total)
    assert_same(params(full.state), params(resumed.state))


KILL_AFTER_LOGGING = textwrap.dedent(
    """
    import os, signal, sys
    from saejax.cli import main
    from saejax.train.checkpoint import Checkpointer
    from saejax.train.metrics import MetricsLogger

    save, log = Checkpointer.save, MetricsLogger.log
    KILL_AFTER = int(sys.argv[2])

    def save_and_wait(self, *args):  # the checkpoint is on disk before the kill
        save(self, *args)
        self.wait()

    def log_then_die(self, step, metrics):  # kill -9 right after this step's line is written
        record = log(self, step, metrics)
        if step == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    Checkpointer.save, MetricsLogger.log = save_and_wait, log_then_die
    sys.exit(main(["train", sys.argv[1]]))
    """
)


def test_killed_after_logging_past_the_checkpoint_resumes_exactly_and_logs_once(
    rows_path, uninterrupted, tmp_path
):
    full_run, full = uninterrupted
    run = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(dump_yaml(small_config(rows_path, str(run), *NEAR)))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_LOGGING, str(tmp_path / "cfg.yaml"), "24"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["step"] for r in records(run)] == [8, 16, 24]  # 24 is past the checkpoint at 18
    resumed = train(load_run_config(str(run)), resume=True)
    assert_same(params(full.state), params(resumed.state))
    got, want = records(run), records(full_run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(8, 65, 8))
    for a, b in zip(got, want):
        for key in ("loss", "fvu", "l0", "resampled", "dead_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_the_pool_is_refilled_only_when_a_resampling_step_is_near():
    assert refill_batches({20, 40}, start_step=18, pool_batches=8) == 8  # batches 10..17
    assert refill_batches({5}, start_step=3, pool_batches=8) == 3  # only 3 batches before it
    assert refill_batches({20}, start_step=12, pool_batches=8) == 0  # fills up by itself
    assert refill_batches({20}, start_step=20, pool_batches=8) == 0  # already resampled
    assert refill_batches(set(), start_step=18, pool_batches=8) == 0


def test_a_resume_drops_the_lines_logged_after_its_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 8, "loss": 1.0},
        {"step": 16, "tokens": 4096, "config_change": {"train.lr": {"old": 0.0, "new": 1e-3}}},
        {"step": 16, "loss": 0.9},
        {"step": 24, "loss": 0.8},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 32, "lo')
    assert drop_records_after(str(path), 16) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    assert drop_records_after(str(path), 16) == 0  # nothing more to drop: left as it is
