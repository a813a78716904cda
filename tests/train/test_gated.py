"""The gated SAE (Rajamanoharan et al. 2024): its maths, ground truth with the shipped
defaults, meshes, resume, and the SAELens `gated` export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOY_RUN,
    TRAINING_MESHES,
    mean_max_cosine,
    small_config,
    superposition_data,
    train_on_meshes,
)

from saejax.cli import main
from saejax.core import sae as S
from saejax.train.run import load_run_config, train
from saejax.train.sae_files import load_sae, read_native

GATED_KEYS = {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}


def random_gated(d_in=6, d_sae=10, seed=0):
    rng = np.random.default_rng(seed)
    spec = S.SAESpec("gated", d_in, d_sae)
    params = {k: jnp.asarray(v) for k, v in S.init_params(spec, jax.random.PRNGKey(seed)).items()}
    for name in ("b_gate", "r_mag", "b_mag"):
        params[name] = jnp.asarray(rng.normal(0, 0.5, d_sae), jnp.float32)
    params["b_dec"] = jnp.asarray(rng.normal(0, 0.1, d_in), jnp.float32)
    x = jnp.asarray(rng.normal(size=(32, d_in)), jnp.float32)
    return spec, params, x


def saelens_gated_encode(w, x):
    """SAELens's GatedSAE.encode, written out in NumPy from its weights."""
    xc = x - w["b_dec"]
    gate = (xc @ w["W_enc"] + w["b_gate"]) > 0
    magnitude = np.maximum(xc @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    return gate * magnitude


def test_gate_and_magnitude_paths_share_the_encoder_directions():
    spec, params, x = random_gated()
    assert set(params) == GATED_KEYS  # no b_enc: the two biases and r_mag replace it
    f = np.asarray(S.encode(params, x, spec))
    np.testing.assert_allclose(
        f, saelens_gated_encode({k: np.asarray(v) for k, v in params.items()}, x), atol=1e-5
    )
    assert 0 < (f > 0).mean() < 1


def test_gated_loss_trains_the_gate_only_through_the_frozen_decoder():
    spec, params, x = random_gated()
    # no penalty, and a decoder the main reconstruction cannot move: only the auxiliary loss
    # is left to move W_dec, and it must not (its decoder is a stop-gradient copy)
    aux_only = lambda p: S.gated_loss_fn(p, x, spec, 0.0)[1][0]["aux_loss"]  # noqa: E731
    grads = jax.grad(aux_only)(params)
    assert not np.asarray(grads["W_dec"]).any()
    assert not np.asarray(grads["r_mag"]).any() and not np.asarray(grads["b_mag"]).any()
    assert np.asarray(grads["b_gate"]).any() and np.asarray(grads["W_enc"]).any()
    # the main reconstruction reaches the magnitude path, never the gate's bias (a Heaviside)
    main_only = lambda p: S.gated_loss_fn(p, x, spec, 0.0)[1][0]["mse"]  # noqa: E731
    grads = jax.grad(main_only)(params)
    assert not np.asarray(grads["b_gate"]).any()
    assert np.asarray(grads["b_mag"]).any() and np.asarray(grads["r_mag"]).any()
    loss, (parts, *_) = S.gated_loss_fn(params, x, spec, 2.0)
    expected = parts["mse"] + 2.0 * parts["sparsity_loss"] + parts["aux_loss"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_gated_recovers_features_with_its_defaults(tmp_path):
    """Towards Monosemanticity's toy (512 directions in 64 dimensions, tests/helpers): only
    the shape, the data and the budget are set, as for relu in test_ground_truth.py."""
    rows, directions = superposition_data(300_000)
    np.save(tmp_path / "rows.npy", rows)
    cfg = small_config(
        str(tmp_path / "rows.npy"),
        str(tmp_path / "gated"),
        "sae.architecture=gated",
        "sae.d_sae=1024",
        "train.tokens=1536000",
        *TOY_RUN,
        "train.resample.every_steps=200",
        "train.resample.stop_after_fraction=0.6",
    )
    result = train(cfg)
    assert int(result.state.resampled_total) > 0, "gated resamples by default, as relu does"
    score = mean_max_cosine(directions, result.state.params["W_dec"])
    print(f"gated mean max cosine {score:.3f}, l0 {result.final_metrics['l0']:.2f}")
    assert score >= 0.9


def test_gated_on_meshes_matches_one_device(tmp_path):
    """(8,1), (4,2) and (1,8) against one device, across a resampling event, in one process
    with 8 fake devices."""
    out = train_on_meshes(tmp_path, "gated")  # each run's state split over its mesh's devices
    ref = out["m1x1"]
    assert ref["resampled"].sum() > 0
    for name, mesh in TRAINING_MESHES.items():
        np.testing.assert_allclose(out[name]["loss"], ref["loss"], rtol=2e-4, err_msg=mesh)
        for key in sorted(GATED_KEYS):
            np.testing.assert_allclose(
                out[name][key], ref[key], rtol=2e-3, atol=2e-5, err_msg=f"{mesh}: {key}"
            )


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    rows, _ = superposition_data(20_000, d=32, m=128, p=0.03, seed=3)
    path = tmp_path_factory.mktemp("gated") / "rows.npy"
    np.save(path, rows * 40 + 3)  # far from norm sqrt(d_in): the input scale matters
    return str(path)


def test_stop_and_resume_equals_uninterrupted(rows_path, tmp_path):
    extra = ["sae.architecture=gated", "train.resample.every_steps=20", "sae.dead_tokens=512"]
    full = train(small_config(rows_path, str(tmp_path / "full"), *extra))
    stopped = train(small_config(rows_path, str(tmp_path / "part"), *extra), max_steps=27)
    resumed = train(load_run_config(str(tmp_path / "part")), resume=True)
    assert int(stopped.state.step) == 27 and int(resumed.state.step) == 64
    assert int(full.state.resampled_total) == int(resumed.state.resampled_total)
    for key in GATED_KEYS:
        np.testing.assert_allclose(
            np.asarray(full.state.params[key]),
            np.asarray(resumed.state.params[key]),
            rtol=1e-6,
            atol=1e-7,
            err_msg=key,
        )


def test_saelens_export_has_the_gated_layout_and_round_trips(rows_path, tmp_path):
    run = str(tmp_path / "run")
    train(small_config(rows_path, run, "sae.architecture=gated", "train.tokens=4096"))
    out = str(tmp_path / "saelens")
    assert main(["export", run, "--format", "saelens", "--out", out]) == 0
    cfg = json.load(open(os.path.join(out, "cfg.json")))
    assert cfg["architecture"] == "gated" and cfg["apply_b_dec_to_input"] is True
    assert (cfg["d_in"], cfg["d_sae"]) == (32, 64)
    from safetensors.numpy import load_file

    w = load_file(os.path.join(out, "sae_weights.safetensors"))
    shapes = {k: v.shape for k, v in w.items()}
    assert shapes == {
        "W_enc": (32, 64),
        "b_gate": (64,),
        "r_mag": (64,),
        "b_mag": (64,),
        "W_dec": (64, 32),
        "b_dec": (32,),
    }
    np.testing.assert_allclose(np.linalg.norm(w["W_dec"], axis=1), 1, atol=1e-5)

    x = np.load(rows_path)[:500]
    native = read_native(run)
    scale = native["info"]["input_scale"]
    params = {k: jnp.asarray(v) for k, v in native["params"].items()}
    x_hat_train, f_train, _ = S.forward(params, jnp.asarray(x) * scale, native["spec"])
    x_hat_train = np.asarray(x_hat_train) / scale
    tol = 1e-3 * np.abs(x).max()
    # SAELens's own encode and decode on the exported weights, in model units
    f_saelens = saelens_gated_encode(w, x)
    assert ((f_saelens > 0) == (np.asarray(f_train) > 0)).all()
    np.testing.assert_allclose(f_saelens @ w["W_dec"] + w["b_dec"], x_hat_train, atol=tol)
    # load_sae reads the export, and the run itself, to the same outputs
    exported, own = load_sae(out), load_sae(run)
    assert exported.spec.architecture == own.spec.architecture == "gated"
    np.testing.assert_allclose(np.asarray(exported.encode(x)), f_saelens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(exported.reconstruct(x)), x_hat_train, atol=tol)
    np.testing.assert_allclose(np.asarray(own.reconstruct(x)), x_hat_train, atol=tol)


def test_saelens_gated_without_b_dec_on_the_input(tmp_path):
    """SAELens folders with apply_b_dec_to_input false encode x itself: the shift moves into
    both paths' biases (b_mag scaled by exp(r_mag)), so load_sae gives the same latents."""
    spec, params, x = random_gated()
    w = {k: np.asarray(v) for k, v in params.items()}
    f_expected = saelens_gated_encode({**w, "b_dec": np.zeros_like(w["b_dec"])}, np.asarray(x))
    from safetensors.numpy import save_file

    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "gated", "d_in": 6, "d_sae": 10, "apply_b_dec_to_input": False}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(str(tmp_path))
    np.testing.assert_allclose(np.asarray(loaded.encode(x)), f_expected, rtol=1e-5, atol=1e-5)
