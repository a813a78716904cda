"""Feature splitting: nearest decoder directions of a larger SAE, against brute force."""

import numpy as np

from saejax.interp.splitting import closest_latents


def test_closest_latents_equal_brute_force():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(50, 16))
    large = rng.normal(size=(200, 16))
    large[7] = small[3] * 2.0  # latent 3 kept (same direction, another norm)
    idx, cos = closest_latents(small, large, n=3, chunk=17)
    a = small / np.linalg.norm(small, axis=1, keepdims=True)
    b = large / np.linalg.norm(large, axis=1, keepdims=True)
    sims = a @ b.T
    for i in range(50):
        expected = np.argsort(-sims[i])[:3]
        assert list(idx[i]) == list(expected)
        np.testing.assert_allclose(cos[i], sims[i, expected], rtol=1e-5)
    assert idx[3, 0] == 7 and cos[3, 0] > 0.9999
