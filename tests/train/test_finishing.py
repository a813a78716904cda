"""Runs always finish: a run killed after its final checkpoint, run again when finished, or
whose final evaluation failed, finishes on --resume without retraining; a sweep killed while
it saves its members, or run again, finishes too. A resume trains what config.yaml says
unless forced; a diverging run stops (exit 2) keeping its last healthy checkpoint; a failed
start leaves the run directory as it was."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from helpers import small_config, superposition_data
from safetensors.numpy import load_file

from saejax.cli import main
from saejax.config import dump_yaml
from saejax.errors import SaejaxError
from saejax.train import run as run_module
from saejax.train import sweep as sweep_module
from saejax.train.checkpoint import Checkpointer
from saejax.train.run import load_run_config, train


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1, seed=2)
    path = tmp_path_factory.mktemp("finishing") / "rows.npy"
    np.save(path, rows)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(rows_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    train(small_config(rows_path, str(run)))
    return run


def weights(run) -> dict:
    return load_file(os.path.join(run, "sae", "sae_weights.safetensors"))


def assert_same_sae(a, b):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=1e-6, atol=1e-7, err_msg=key)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saejax: error:"), err
    return err[0]


KILL_AT_FINISH = textwrap.dedent(
    """
    import os, signal, sys
    from saejax.cli import main
    from saejax.train import run

    def killed(*args, **kwargs):  # kill -9 right after the final checkpoint
        os.kill(os.getpid(), signal.SIGKILL)

    run.finish = killed
    sys.exit(main(["train", sys.argv[1]]))
    """
)


def test_killed_after_the_final_checkpoint_finishes_on_resume(
    rows_path, uninterrupted, tmp_path, capsys
):
    run = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(dump_yaml(small_config(rows_path, str(run))))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_FINISH, str(tmp_path / "cfg.yaml")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert Checkpointer(str(run / "checkpoints")).latest_step() == 64
    assert not (run / "sae").exists()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err  # the killed process left its lock file
    assert_same_sae(run, uninterrupted)
    assert json.loads((run / "eval.json").read_text())["steps"] == 64


def test_a_finished_run_resumed_finishes_again(rows_path, tmp_path):
    run = tmp_path / "run"
    train(small_config(rows_path, str(run)))
    before = weights(run)
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    again = train(load_run_config(str(run)), resume=True)
    assert int(again.state.step) == 64 and again.final_metrics["fvu"] < 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == lines  # nothing retrained
    for key, value in weights(run).items():
        np.testing.assert_array_equal(value, before[key])


def test_a_failed_final_evaluation_finishes_on_resume(
    rows_path, uninterrupted, tmp_path, monkeypatch
):
    run = tmp_path / "run"

    def failing(*args, **kwargs):
        raise SaejaxError("validation rows unreadable")

    monkeypatch.setattr(run_module, "finish", failing)
    with pytest.raises(SaejaxError, match="unreadable"):
        train(small_config(rows_path, str(run)))
    monkeypatch.undo()
    assert (run / "config.yaml").exists()  # the run is kept: it has its checkpoints
    train(load_run_config(str(run)), resume=True)
    assert_same_sae(run, uninterrupted)


def test_saving_a_step_again_is_a_no_op(rows_path, tmp_path):
    """A stop (SIGTERM) landing on a checkpoint step saves that step twice."""
    run = tmp_path / "run"
    result = train(small_config(rows_path, str(run)), max_steps=16)  # checkpoint_every=16
    ckpt = Checkpointer(str(run / "checkpoints"))
    assert ckpt.saved_steps() == [16]
    ckpt.save(16, result.state, {})
    ckpt.close()
    resumed = train(load_run_config(str(run)), resume=True)
    assert int(resumed.state.step) == 64


SWEEP = [
    "train.tokens=8192",
    "train.batch_size=256",
    "sae.k=4",
    "data.validation_tokens=1024",
    "train.log_every=8",
    "train.checkpoint_every=16",
    "log.progress=false",
    "data.block_rows=512",
]


def sweep_args(rows_path, out, *extra):
    sets = [f"data.path={rows_path}", *SWEEP]
    return [
        "sweep",
        *sum((["--set", s] for s in sets), []),
        "--d-sae",
        "32,64",
        "--out",
        str(out),
        "--quiet",
        "--no-time-alone",
        *extra,
    ]


def test_a_sweep_killed_while_saving_its_members_finishes_when_run_again(
    rows_path, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    real, calls = sweep_module.finish, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a hard stop while the members are being saved
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "finish", dies_on_the_second)
    assert main(sweep_args(rows_path, out)) == 130
    monkeypatch.undo()
    assert (out / "d32" / "sae").exists() and not (out / "d64" / "sae").exists()
    assert main(sweep_args(rows_path, out)) == 0
    first = weights(out / "d64")
    table = json.loads((out / "sweep.json").read_text())["members"]
    assert [m["d_sae"] for m in table] == [32, 64]
    assert main(sweep_args(rows_path, out)) == 0  # a finished sweep, run again
    for key, value in weights(out / "d64").items():
        np.testing.assert_array_equal(value, first[key])
    capsys.readouterr()
    assert main(sweep_args(rows_path, out, "--set", "train.lr=0.001")) == 2  # not what it trained
    assert "train.lr" in one_line(capsys)


def test_a_resume_that_changes_the_lr_needs_force(rows_path, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_config(rows_path, str(run)), max_steps=16)
    code = main(["train", "--resume", str(run), "--set", "train.lr=0.001", "--max-steps", "8"])
    assert code == 2
    line = one_line(capsys)
    assert "train.lr" in line and "--force" in line
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.0  # automatic
    safe = ["--set", "train.log_every=4", "--max-steps", "8"]  # how it is logged: allowed
    assert main(["train", "--resume", str(run), *safe]) == 0
    forced = ["--set=train.lr=0.001", "--max-steps=8", "--force"]
    assert main(["train", "--resume", str(run), *forced]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.001
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    changes = [r for r in records if "config_change" in r]
    assert changes == [
        {
            "step": 24,
            "tokens": 24 * 256,
            "config_change": {"train.lr": {"old": 0.0, "new": 0.001}},
        }
    ]


def test_a_resume_on_changed_data_needs_force(rows_path, tmp_path, capsys):
    rows = np.load(rows_path)
    data = tmp_path / "rows.npy"
    np.save(data, rows)
    run = tmp_path / "run"
    train(small_config(str(data), str(run)), max_steps=16)
    np.save(data, rows[:5000])  # the store was re-extracted with fewer rows
    assert main(["train", "--resume", str(run)]) == 2
    line = one_line(capsys)
    assert "data has changed" in line and "data_rows 6000 → 5000" in line
    assert main(["train", "--resume", str(run), "--force"]) == 0


def test_a_diverging_run_stops_and_keeps_its_last_healthy_checkpoint(rows_path, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_config(rows_path, str(run)), max_steps=32)
    code = main(["train", "--resume", str(run), "--set=train.lr=1e6", "--force"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged at step 40" in line or "training diverged at step 48" in line, line
    assert "kept the checkpoint at step 32" in line
    assert Checkpointer(str(run / "checkpoints")).saved_steps() == [16, 32]
    assert not (run / "sae").exists()


def test_a_wide_relu_sae_starting_far_above_the_divergence_line_is_not_stopped(tmp_path):
    """At 64× expansion a tied ReLU SAE starts with half its latents firing: its output is
    ~32× the input (FVU ~1000). That falls as it trains; only a high FVU that does not fall
    is divergence (this run used to be stopped at its second fetch)."""
    rows, _ = superposition_data(20_000, d=16, m=64)
    data = tmp_path / "rows.npy"
    np.save(data, rows)
    run = tmp_path / "run"
    cfg = small_config(
        str(data),
        str(run),
        "sae.architecture=relu",
        "sae.d_sae=1024",
        "train.log_every=4",
        "train.lr_warmup_steps=8",  # down sooner (the rule is under test, not the recipe)
    )
    train(cfg, max_steps=48)
    fvus = [r["fvu"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert fvus[0] > 100 and fvus[1] > 100  # two fetches above the line ...
    assert fvus[-1] < fvus[0] / 2  # ... on the way down


def test_keep_checkpoints_zero_is_refused(rows_path, tmp_path):
    with pytest.raises(SaejaxError, match="keep_checkpoints"):
        train(small_config(rows_path, str(tmp_path / "run"), "train.keep_checkpoints=0"))
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_the_run_directory_as_it_was(rows_path, tmp_path, capsys):
    few = tmp_path / "few.npy"
    np.save(few, np.load(rows_path)[:300])  # 240 training rows: fewer than one batch
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    cfg = small_config(str(few), str(run))
    with pytest.raises(SaejaxError, match="fewer than one batch"):
        train(cfg)
    assert sorted(os.listdir(run)) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    with pytest.raises(SaejaxError, match="fewer than one batch"):
        train(small_config(str(few), str(fresh)))
    assert not fresh.exists()
    train(small_config(rows_path, str(run)))  # the corrected command is not refused
    assert (run / "sae").exists() and (run / "notes.txt").read_text() == "mine\n"
