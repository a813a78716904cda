"""A damaged checkpoint is reported in one line and the one before it is used: the resumed
run still ends where an uninterrupted run ends."""

import os

import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.cli import main
from saejax.train.run import train


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(16384, d=16, m=64, p=0.05, seed=3)
    path = tmp_path_factory.mktemp("damaged") / "acts.npy"
    np.save(path, rows)
    return str(path)


def damage(folder: str) -> None:
    """Overwrite every file of a checkpoint's state with garbage, as a bad disk would."""
    rng = np.random.default_rng(0)
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(rng.bytes(64))


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(rows_path, tmp_path, capsys):
    whole = train(small_config(rows_path, str(tmp_path / "whole")))
    run = tmp_path / "run"
    train(small_config(rows_path, str(run)), max_steps=48)
    assert sorted(os.listdir(run / "checkpoints")) == ["32", "48"]
    damage(str(run / "checkpoints" / "48" / "state"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "checkpoint at step 48 is damaged" in err and "resuming from step 32" in err
    assert "Traceback" not in err
    from safetensors.numpy import load_file

    resumed = load_file(str(run / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            resumed[name], np.asarray(whole.state.params[name]), rtol=1e-6, atol=1e-7
        )


def test_every_checkpoint_damaged_is_one_line(rows_path, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_config(rows_path, str(run)), max_steps=32)
    for step in os.listdir(run / "checkpoints"):
        damage(str(run / "checkpoints" / step))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and err[-1].startswith("saejax: error: ") and "damaged" in err[-1]
