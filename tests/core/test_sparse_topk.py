"""The sparse TopK kernels against the dense reference: same loss, parts and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.core import sae as S


def random_params(spec, seed=0):
    rng = np.random.default_rng(seed)
    params = S.init_params(spec, jax.random.PRNGKey(seed))
    return {
        **params,
        "W_enc": params["W_enc"]
        + jnp.asarray(rng.normal(0, 0.05, params["W_enc"].shape), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(0, 0.1, spec.d_sae), jnp.float32),
        "b_dec": jnp.asarray(rng.normal(0, 0.1, spec.d_in), jnp.float32),
    }


def loss_and_grads(spec, params, x, dead):
    fn = jax.jit(S.loss_and_grads, static_argnums=2)
    parts, fires, smallest, grads = fn(params, x, spec, dead, 0.0, 1 / 32)
    return parts["loss"], parts, fires, smallest, grads


@pytest.fixture(params=["cpp", "xla", "pallas"])
def kernels(request, monkeypatch):
    """Every implementation of the sparse kernels: the C++ CPU kernels, XLA's primitives and
    the Pallas kernels (interpret mode here); yields the SAESpec.topk_kernel that picks it."""
    from saejax.core import cpu_kernels

    if request.param == "cpp" and not cpu_kernels.enabled():
        pytest.skip("C++ CPU kernels unavailable")
    if request.param == "xla":
        monkeypatch.setattr(cpu_kernels, "enabled", lambda: False)
    jax.clear_caches()
    yield "pallas" if request.param == "pallas" else "sparse"
    jax.clear_caches()


@pytest.mark.parametrize("n_dead", [0, 7, 200])
def test_sparse_topk_equals_dense_reference(n_dead, kernels):
    sparse = S.SAESpec("topk", d_in=48, d_sae=256, k=8, aux_k=24, topk_kernel=kernels)
    dense = dataclasses.replace(sparse, topk_kernel="dense")
    params = random_params(sparse)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 48)), jnp.float32)
    dead = jnp.zeros(256, bool).at[jnp.arange(n_dead) * (256 // max(n_dead, 1))].set(True)

    got = loss_and_grads(sparse, params, x, dead)
    ref = loss_and_grads(dense, params, x, dead)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for key in ref[1]:
        np.testing.assert_allclose(got[1][key], ref[1][key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert (float(got[1]["aux_loss"]) > 0) == (n_dead > 0)
    np.testing.assert_array_equal(got[2], ref[2])  # fire counts
    np.testing.assert_allclose(got[3], ref[3], rtol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(got[4][name], ref[4][name], rtol=2e-4, atol=2e-6, err_msg=name)
        assert float(jnp.abs(ref[4][name]).max()) > 0


def test_sparse_encoder_gradient_touches_only_selected_latents(kernels):
    spec = S.SAESpec("topk", d_in=16, d_sae=128, k=2, aux_k=8, topk_kernel=kernels)
    params = random_params(spec, seed=3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16)), jnp.float32)
    *_, grads = loss_and_grads(spec, params, x, jnp.zeros(128, bool))
    selected = jax.lax.top_k(S.pre_activations(params, x, spec), 2)[1]
    touched = np.flatnonzero(np.abs(np.asarray(grads["W_enc"])).sum(0))
    assert set(touched) <= set(np.asarray(selected).reshape(-1).tolist())


def test_training_with_sparse_kernels_matches_dense(tmp_path):
    from saejax.train.run import train

    data, _ = superposition_data(8192 + 1024, d=32, m=128, p=0.03)
    path = tmp_path / "acts.npy"
    np.save(path, data)
    finals = {}
    for kernel in ("sparse", "dense"):
        cfg = small_config(
            str(path),
            str(tmp_path / kernel),
            f"sae.topk_kernel={kernel}",
            "train.tokens=4096",
            "sae.dead_tokens=512",
        )
        finals[kernel] = train(cfg).state.params
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            finals["sparse"][name], finals["dense"][name], rtol=1e-3, atol=1e-5, err_msg=name
        )
