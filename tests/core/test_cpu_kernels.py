"""The C++ CPU kernels (saejax/cpu_kernels.cc) against their definitions in NumPy and lax."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.core import cpu_kernels as K

if os.environ.get("SAEJAX_REQUIRE_CPU_KERNELS") == "1":  # CI: a missing compiler is a failure
    assert K.enabled(), f"C++ kernels unavailable: {K._state.get('why')}"
pytestmark = pytest.mark.skipif(
    not K.enabled(), reason=f"C++ kernels unavailable: {K._state.get('why')}"
)


@pytest.mark.parametrize(
    "rows,width,k", [(7, 1000, 16), (33, 4608, 32), (5, 17, 17), (4, 300, 1), (3, 2048, 288)]
)
def test_top_k_equals_lax_top_k_exactly(rows, width, k):
    rng = np.random.default_rng(width + k)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    x[0, 5:40] = 2.5  # ties: the lower index first
    x[1, :] = -np.inf
    x[1, width // 2] = 0.0
    x[2 % rows, ::3] = x[2 % rows, 1]  # many ties in one row
    got = jax.jit(lambda a: K.top_k(a, k))(x)
    ref = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    bias = rng.normal(size=width).astype(np.float32)  # the encoder bias, added while scanning
    got = jax.jit(lambda a, b: K.top_k(a, k, b))(x, bias)
    ref = jax.lax.top_k(x + bias, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))


def _case(rows=64, k=8, n=300, d=48, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(rows, k)).astype(np.int32)
    idx[:, 0] = 7  # one latent chosen by every row
    weights = rng.normal(size=(rows, k)).astype(np.float32)
    data = rng.normal(size=(rows, d)).astype(np.float32)
    table = rng.normal(size=(n, d)).astype(np.float32)
    return weights, idx, data, table


def test_gather_rows_and_row_dots():
    weights, idx, g, table = _case()
    got = np.asarray(jax.jit(K.gather_rows)(weights, idx, table))
    np.testing.assert_allclose(
        got, np.einsum("bk,bkd->bd", weights, table[idx]), rtol=1e-5, atol=1e-5
    )
    dots = np.asarray(jax.jit(K.row_dots)(g, idx, table))
    np.testing.assert_allclose(dots, np.einsum("bd,bkd->bk", g, table[idx]), rtol=1e-5, atol=1e-5)


def test_scatter_rows_sums_repeated_latents_and_zeroes_the_rest():
    weights, idx, data, _ = _case(n=300)
    out, wsum = jax.jit(lambda w, i, r: K.scatter_rows(w, i, r, 300))(weights, idx, data)
    ref = np.zeros((300, data.shape[1]), np.float32)
    np.add.at(
        ref, idx.reshape(-1), (weights[:, :, None] * data[:, None, :]).reshape(-1, data.shape[1])
    )
    ref_sum = np.zeros(300, np.float32)
    np.add.at(ref_sum, idx.reshape(-1), weights.reshape(-1))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(wsum), ref_sum, rtol=1e-5, atol=1e-5)
    unused = np.setdiff1d(np.arange(300), idx)
    assert unused.size and not np.asarray(out)[unused].any()
    out_t, _ = jax.jit(lambda w, i, r: K.scatter_rows(w, i, r, 300, transposed=True))(
        weights, idx, data
    )
    assert out_t.shape == (data.shape[1], 300)
    np.testing.assert_array_equal(np.asarray(out_t), np.asarray(out).T)


def test_scatter_rows_does_not_depend_on_the_thread_count(monkeypatch):
    weights, idx, data, _ = _case(rows=256, k=16, n=1000, seed=3)
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(K, "_threads", lambda t=threads: t)
        results.append(
            np.asarray(
                K.scatter_rows(jnp.asarray(weights), jnp.asarray(idx), jnp.asarray(data), 1000)[0]
            )
        )
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_out_of_range_latent_is_an_error_not_a_write():
    weights, idx, data, _ = _case(n=300)
    idx[3, 2] = 300
    with pytest.raises(Exception, match="out of range"):
        np.asarray(
            K.scatter_rows(jnp.asarray(weights), jnp.asarray(idx), jnp.asarray(data), 300)[0]
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (4096 + 5, 31)])
def test_transpose_is_an_exact_copy(dtype, shape):
    x = jnp.asarray(np.random.default_rng(5).normal(size=shape), dtype)
    got = jax.jit(K.transpose)(x)
    assert got.dtype == dtype and got.shape == shape[::-1]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x, np.float32).T)
