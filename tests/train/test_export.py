"""Export round trips: SAELens and sparsify layouts give the same latents and reconstructions."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.cli import main
from saejax.core import sae as S
from saejax.train.run import train
from saejax.train.sae_files import load_sae, read_native


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    x, _ = superposition_data(8000, d=32, m=64, p=0.05, seed=5)
    x = x * 40 + 3  # model units far from norm sqrt(d_in): the input scale matters
    path = tmp_path_factory.mktemp("export") / "rows.npy"
    np.save(path, x)
    return str(path), x


def _training_units_forward(run_dir, x):
    """The trained SAE exactly as the trainer runs it: scale, encode, decode, unscale."""
    native = read_native(run_dir)
    spec, scale = native["spec"], native["info"]["input_scale"]
    params = {k: jnp.asarray(v) for k, v in native["params"].items()}
    x_hat, f, _ = S.forward(params, jnp.asarray(x) * scale, spec, training=False)
    return np.asarray(f), np.asarray(x_hat) / scale


@pytest.mark.parametrize(
    "arch, fmt",
    [
        ("topk", "saelens"),
        ("relu", "saelens"),
        ("jumprelu", "saelens"),
        ("batchtopk", "saelens"),
        ("topk", "sparsify"),
    ],
)
def test_export_round_trip(rows, tmp_path, capsys, arch, fmt):
    path, x = rows
    run = str(tmp_path / "run")
    train(
        small_config(
            path,
            run,
            f"sae.architecture={arch}",
            "train.tokens=4096",
            "sae.jumprelu_init_threshold=0.05",
        )
    )
    out = str(tmp_path / fmt)
    assert main(["export", run, "--format", fmt, "--out", out]) == 0
    loaded = load_sae(out)
    f_train, x_hat_train = _training_units_forward(run, x[:500])
    f_export = np.asarray(loaded.encode(x[:500]))
    x_hat_export = np.asarray(loaded.reconstruct(x[:500]))
    np.testing.assert_allclose(x_hat_export, x_hat_train, rtol=1e-4, atol=1e-3 * np.abs(x).max())
    # Same latents up to each latent's fixed positive factor (its folded decoder norm).
    assert ((f_export > 0) == (f_train > 0)).all()
    W_dec = np.asarray(loaded.params["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(W_dec, axis=1), 1, atol=1e-5)
    if fmt == "saelens":
        cfg = json.load(open(os.path.join(out, "cfg.json")))
        assert cfg["metadata"]["sae_lens_version"] >= "6"
        assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
        assert cfg["d_in"] == 32 and cfg["d_sae"] == 64
        assert (cfg.get("k") == 4) == (arch == "topk")
        assert (
            cfg["architecture"]
            == {
                "topk": "topk",
                "relu": "standard",
                "jumprelu": "jumprelu",
                "batchtopk": "jumprelu",
            }[arch]
        )
    # The native run folder loads too, with identical behaviour.
    native = load_sae(run)
    np.testing.assert_allclose(
        np.asarray(native.reconstruct(x[:500])),
        x_hat_export,
        rtol=1e-4,
        atol=1e-3 * np.abs(x).max(),
    )


def test_sparsify_refuses_non_topk(rows, tmp_path, capsys):
    path, _ = rows
    run = str(tmp_path / "run")
    train(small_config(path, run, "sae.architecture=relu", "train.tokens=2048"))
    assert main(["export", run, "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 2
    assert "TopK SAEs only" in capsys.readouterr().err
    assert not (tmp_path / "sp").exists()
