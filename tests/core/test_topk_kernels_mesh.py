"""The sparse TopK kernels (C++, XLA, Pallas) under the model-sharded shard_map on a (4 data,
2 model) mesh of 8 fake CPU devices: loss, fire counts and gradients equal the dense
reference on one device, with 0, 7 and 200 dead latents (AuxK included)."""

import textwrap

from helpers import run_on_fake_devices

MESH_CHECK = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from saejax.core import cpu_kernels, sae as S
    from saejax.core.sharding import LATENT_SPECS

    cpp_enabled = cpu_kernels.enabled
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    d_in, d_sae = 48, 256
    spec = S.SAESpec("topk", d_in, d_sae, k=8, aux_k=24, topk_kernel="dense")
    params = S.init_params(spec, jax.random.PRNGKey(0))
    params = {
        **params,
        "W_enc": params["W_enc"] + jnp.asarray(rng.normal(0, 0.05, (d_in, d_sae)), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32),
        "b_dec": jnp.asarray(rng.normal(0, 0.1, d_in), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(64, d_in)), jnp.float32)
    fn = jax.jit(S.loss_and_grads, static_argnums=2)
    paths = {"cpp": "sparse", "xla": "sparse", "pallas": "pallas"}
    for n_dead in (0, 7, 200):
        dead = jnp.zeros(d_sae, bool).at[jnp.arange(n_dead) * (d_sae // max(n_dead, 1))].set(True)
        ref = fn(params, x, spec, dead, 0.0, 1 / 32)
        for path, name in paths.items():
            if path == "cpp" and not cpu_kernels.enabled():
                continue
            cpu_kernels.enabled = (lambda: False) if path == "xla" else cpp_enabled
            jax.clear_caches()
            sparse = dataclasses.replace(spec, topk_kernel=name)
            with jax.set_mesh(mesh):
                p = {k: jax.device_put(v, NamedSharding(mesh, LATENT_SPECS[k]))
                     for k, v in params.items()}
                xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                got = fn(p, xs, sparse, dead, 0.0, 1 / 32)
            what = f"{path}, {n_dead} dead"
            assert (float(got[0]["aux_loss"]) > 0) == (n_dead > 0), what
            for key in ("loss", "aux_loss", "fvu", "l0"):
                np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{what}: {key}")
            np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{what}: fires")
            for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
                np.testing.assert_allclose(got[3][key], ref[3][key], rtol=2e-4, atol=2e-6,
                                           err_msg=f"{what}: {key}")
            print("ok", what)
""")


def test_sparse_kernels_under_model_sharding_equal_dense_reference():
    result = run_on_fake_devices(["-c", MESH_CHECK], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok pallas") == 3, result.stdout
    assert result.stdout.count("ok xla") == 3, result.stdout
