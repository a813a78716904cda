"""Every bad training input: one clear line on stderr and exit status 2."""

import numpy as np
import pytest
from helpers import make_store, superposition_data

from saejax.cli import main


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1)
    path = tmp_path_factory.mktemp("errors") / "rows.npy"
    np.save(path, rows)
    return str(path)


def run_train(capsys, *args):
    code = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def base(rows_path, run_dir):
    return [
        f"--set=data.path={rows_path}",
        f"--set=run_dir={run_dir}",
        "--set=sae.d_sae=32",
        "--set=sae.k=4",
        "--set=train.tokens=2048",
        "--set=train.batch_size=256",
        "--set=data.validation_tokens=512",
        "--set=log.progress=false",
        "--set=data.block_rows=512",
    ]


def check(code, err, phrase):
    assert code == 2, err
    assert err.startswith("saejax: error:") and phrase in err, err


def test_unknown_config_key(capsys, rows_path, tmp_path):
    code, err = run_train(capsys, *base(rows_path, tmp_path / "r"), "--set=sae.d_sea=8")
    check(code, err, "unknown config key 'sae.d_sea'")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    code, err = run_train(capsys, str(cfg), *base(rows_path, tmp_path / "r"))
    check(code, err, "unknown config key 'train.learning_rate'")


def test_ill_typed_value(capsys, rows_path, tmp_path):
    code, err = run_train(capsys, *base(rows_path, tmp_path / "r"), "--set=sae.d_sae=many")
    check(code, err, "sae.d_sae")


def test_d_in_that_disagrees_with_the_data(capsys, rows_path, tmp_path):
    code, err = run_train(capsys, *base(rows_path, tmp_path / "r"), "--set=sae.d_in=576")
    check(code, err, "sae.d_in is 576 but the data")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_reported_with_its_row(capsys, tmp_path, bad):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1)
    rows[1234, 3] = bad
    path = tmp_path / "bad.npy"
    np.save(path, rows)
    code, err = run_train(
        capsys, *base(str(path), tmp_path / "r"), "--set=data.validation_tokens=1"
    )
    check(code, err, "row 1234")
    assert "NaN or Inf" in err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_nonfinite_rows_are_found_in_every_stored_dtype(dtype):
    """The loader's bit test agrees with np.isfinite: NaN, ±Inf flagged; the largest finite
    value, -0.0 and subnormals not."""
    import ml_dtypes

    from saejax.store import nonfinite_rows

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    info = ml_dtypes.finfo(dt) if dtype == "bfloat16" else np.finfo(dt)
    rows = np.random.default_rng(0).normal(size=(40, 8)).astype(dt)
    rows[3, 2], rows[7, 0], rows[9, 7] = np.nan, np.inf, -np.inf
    rows[11, 5], rows[12, 1], rows[13, 4] = info.max, -0.0, info.smallest_subnormal
    assert np.flatnonzero(nonfinite_rows(rows)).tolist() == [3, 7, 9]
    assert np.flatnonzero(nonfinite_rows(rows[:, ::2])).tolist() == [3, 7]  # a strided view


def test_k_larger_than_d_sae(capsys, rows_path, tmp_path):
    code, err = run_train(capsys, *base(rows_path, tmp_path / "r"), "--set=sae.k=64")
    check(code, err, "sae.k must be in 1..d_sae (32)")
    assert not (tmp_path / "r").exists()


def test_empty_store(capsys, tmp_path):
    make_store(str(tmp_path / "empty"), np.zeros((0, 16), np.float32))
    code, err = run_train(capsys, *base(str(tmp_path / "empty"), tmp_path / "r"))
    check(code, err, "holds no rows")


def test_missing_data(capsys, tmp_path):
    code, err = run_train(capsys, *base(str(tmp_path / "nowhere"), tmp_path / "r"))
    check(code, err, "no activation store")


def test_checkpoint_from_an_incompatible_config(capsys, rows_path, tmp_path):
    run = tmp_path / "r"
    assert main(["train", *base(rows_path, run), "--max-steps=3"]) == 0
    assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
    code, err = run_train(capsys, "--resume", str(run), "--set=sae.d_sae=64")
    check(code, err, "another configuration")
    assert "d_sae" in err


def test_existing_run_is_not_overwritten(capsys, rows_path, tmp_path):
    run = tmp_path / "r"
    assert main(["train", *base(rows_path, run)]) == 0
    before = (run / "sae" / "sae_weights.safetensors").read_bytes()
    code, err = run_train(capsys, *base(rows_path, run))
    check(code, err, "already holds a run")
    assert (run / "sae" / "sae_weights.safetensors").read_bytes() == before


def test_mesh_needs_the_devices_it_names(capsys, rows_path, tmp_path):
    code, err = run_train(capsys, *base(rows_path, tmp_path / "r"), "--set=mesh.data=2")
    check(code, err, "needs 2 devices but 1 are visible")
    code, err = run_train(
        capsys,
        *base(rows_path, tmp_path / "r2"),
        "--set=mesh.model=3",
        "--set=train.batch_size=384",
    )
    check(code, err, "not divisible by mesh.model 3")


def test_nan_in_the_held_out_rows_fails_before_training(capsys, tmp_path):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1)
    rows[5990, 2] = np.nan  # in the held-out rows at the end
    path = tmp_path / "bad.npy"
    np.save(path, rows)
    code, err = run_train(capsys, *base(str(path), tmp_path / "r"))
    check(code, err, "row 5990")
    assert not (tmp_path / "r" / "checkpoints").exists()  # found before any training


def test_a_capped_held_out_set_is_said(capsys, tmp_path):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1)
    path = tmp_path / "small.npy"
    np.save(path, rows)
    args = [*base(str(path), tmp_path / "r"), "--set=data.validation_tokens=4000"]
    assert main(["train", *args]) == 0
    assert "validation_tokens is 4,000 but" in capsys.readouterr().err
