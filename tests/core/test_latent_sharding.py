"""Loss, fire counts and gradients of every dense architecture on a (4 data, 2 model) mesh of 8
fake CPU devices equal one device's, with and without dead latents (AuxK), now that the
[rows, d_sae] blocks are pinned split and TopK's k-th largest is found per shard."""

import textwrap

from helpers import run_on_fake_devices

MESH_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from helpers import loss_and_grads_on_latent_mesh
    from saejax.core import sae as S

    rng = np.random.default_rng(0)
    d_in, d_sae = 24, 96
    x = jnp.asarray(rng.normal(size=(128, d_in)), jnp.float32)
    for arch, kernel in (("relu", "dense"), ("jumprelu", "dense"), ("topk", "dense"),
                         ("batchtopk", "dense")):
        spec = S.SAESpec(arch, d_in, d_sae, k=6, aux_k=10, topk_kernel=kernel)
        params = S.init_params(spec, jax.random.PRNGKey(1), init_threshold=0.3)
        params = {
            **params,
            "W_enc": params["W_enc"] + jnp.asarray(rng.normal(0, 0.1, (d_in, d_sae)), jnp.float32),
            "b_enc": jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32),
            "b_dec": jnp.asarray(rng.normal(0, 0.1, d_in), jnp.float32),
        }
        for n_dead in (0, 30):
            dead = jnp.zeros(d_sae, bool).at[jnp.arange(n_dead) * 3].set(True)
            ref, got = loss_and_grads_on_latent_mesh(params, x, spec, dead)  # a (4, 2) mesh
            what = f"{arch}, {n_dead} dead"
            for key in ("loss", "aux_loss", "fvu", "l0", "sparsity_loss"):
                np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{what}: {key}")
            np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{what}: fires")
            for key in params:
                np.testing.assert_allclose(got[3][key], ref[3][key], rtol=2e-4, atol=2e-6,
                                           err_msg=f"{what}: {key}")
            print("ok", what, float(ref[0]["aux_loss"]) > 0)
""")


def test_dense_architectures_split_over_latents_equal_one_device():
    result = run_on_fake_devices(["-c", MESH_CHECK], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == 8, result.stdout
    # AuxK ran where latents were dead (TopK and BatchTopK)
    assert result.stdout.count("True") == 2, result.stdout
