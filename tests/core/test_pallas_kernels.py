"""The Pallas kernels (saejax/core/pallas_kernels.py), in interpret mode on the CPU, against
lax and NumPy: inside jax.jit, and under jax.shard_map on a mesh of fake CPU devices."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_fake_devices

from saejax.core import pallas_kernels as K


def assert_same_top_k(got, ref):
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    # bit for bit: NaN payloads and the sign of zero included
    np.testing.assert_array_equal(
        np.asarray(got[0]).view(np.int32), np.asarray(ref[0]).view(np.int32)
    )


@pytest.mark.parametrize(
    "rows,width,k,block_cols",
    [
        (7, 1000, 16, 128),  # width not a multiple of the block, rows not a multiple of 8
        (5, 17, 17, 8),  # k = N, over several blocks
        (4, 300, 1, 64),  # k = 1
        (3, 700, 288, 128),  # k larger than a block: each block sorted whole
        (9, 64, 5, 512),  # one block wider than the row
    ],
)
def test_top_k_equals_lax_top_k_bit_for_bit(rows, width, k, block_cols):
    rng = np.random.default_rng(width + k)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    x[0, 5:40] = 2.5  # ties: the lower index first, across blocks
    x[1, :] = -np.inf  # a row of -inf, one finite entry
    x[1, width // 2] = 0.0
    x[2, ::3] = x[2, 1]  # many ties in one row
    x[3 % rows, : min(width, 12)] = 0.0
    x[3 % rows, 1 : min(width, 12) : 2] = -0.0  # signed zeros: +0 ranks above -0, as in lax.top_k
    if rows > 4:
        x[4, :] = -np.inf  # all -inf: indices 0..k-1
    run = jax.jit(lambda a: K.top_k(a, k, block_cols=block_cols))
    assert_same_top_k(run(x), jax.lax.top_k(x, k))
    bias = rng.normal(size=width).astype(np.float32)
    run = jax.jit(lambda a, b: K.top_k(a, k, b, block_cols=block_cols))
    assert_same_top_k(run(x, bias), jax.lax.top_k(x + bias, k))


def test_top_k_orders_nan_and_infinities_as_lax_does():
    x = np.array([[0.0, -0.0, 1.0, np.nan, -np.inf, -np.nan, np.inf, 1.0, np.nan]], np.float32)
    for k in (1, 4, 9):
        assert_same_top_k(K.top_k(x, k, block_cols=4), jax.lax.top_k(x, k))


def test_top_k_rejects_bad_k_and_blocks():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="k"):
        K.top_k(x, 6)
    with pytest.raises(ValueError, match="power of two"):
        K.top_k(x, 2, block_cols=24)


def _case(rows=37, k=8, n=300, d=48, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(rows, k)).astype(np.int32)
    idx[:, 0] = 7  # one latent chosen by every row
    idx[0, 3] = idx[0, 1]  # a latent repeated within a row
    weights = rng.normal(size=(rows, k)).astype(np.float32)
    data = rng.normal(size=(rows, d)).astype(np.float32)
    table = rng.normal(size=(n, d)).astype(np.float32)
    return weights, idx, data, table


@pytest.mark.parametrize("d,block_cols", [(48, 16), (48, 128), (40, 32)])  # 40: padded columns
def test_gather_rows_and_row_dots(d, block_cols):
    weights, idx, g, table = _case(d=d)
    got = jax.jit(lambda w, i, t: K.gather_rows(w, i, t, block_rows=8, block_cols=block_cols))(
        weights, idx, table
    )
    assert got.shape == (37, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got), np.einsum("bk,bkd->bd", weights, table[idx]), rtol=1e-5, atol=1e-5
    )
    dots = jax.jit(lambda a, i, t: K.row_dots(a, i, t, block_rows=8, chunk=block_cols))(
        g, idx, table
    )
    assert dots.shape == (37, 8) and dots.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(dots), np.einsum("bd,bkd->bk", g, table[idx]), rtol=1e-5, atol=1e-5
    )


def _scatter_reference(weights, idx, data, n):
    ref = np.zeros((n, data.shape[1]), np.float32)
    np.add.at(
        ref, idx.reshape(-1), (weights[:, :, None] * data[:, None, :]).reshape(-1, data.shape[1])
    )
    ref_sum = np.zeros(n, np.float32)
    np.add.at(ref_sum, idx.reshape(-1), weights.reshape(-1))
    return ref, ref_sum


@pytest.mark.parametrize("n,d", [(300, 48), (256, 64), (20, 40)])
def test_scatter_rows_sums_repeated_latents_and_zeroes_the_rest(n, d):
    weights, idx, data, _ = _case(n=n, d=d)
    out, wsum = jax.jit(lambda w, i, r: K.scatter_rows(w, i, r, n))(weights, idx, data)
    assert out.shape == (n, d) and wsum.shape == (n,)
    ref, ref_sum = _scatter_reference(weights, idx, data, n)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(wsum), ref_sum, rtol=1e-5, atol=1e-5)
    unused = np.setdiff1d(np.arange(n), idx)
    if n > 100:
        assert unused.size
    assert not np.asarray(out)[unused].any() and not np.asarray(wsum)[unused].any()
    transposed = jax.jit(lambda w, i, r: K.scatter_rows(w, i, r, n, transposed=True))
    out_t, wsum_t = transposed(weights, idx, data)
    assert out_t.shape == (d, n)
    np.testing.assert_array_equal(np.asarray(out_t), np.asarray(out).T)
    np.testing.assert_array_equal(np.asarray(wsum_t), np.asarray(wsum))


def test_scatter_rows_does_not_depend_on_the_block_sizes():
    """Each output element is summed by one program in the sorted entries' order."""
    weights, idx, data, _ = _case(rows=64, k=16, n=200, d=64, seed=3)
    results = [
        K.scatter_rows(weights, idx, data, 200, block_latents=bn, block_cols=bd)
        for bn, bd in ((32, 128), (8, 16), (256, 32))
    ]
    for out, wsum in results[1:]:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(results[0][0]))
        np.testing.assert_array_equal(np.asarray(wsum), np.asarray(results[0][1]))


def test_out_of_range_indices_follow_xla():
    """Gathers clamp an index outside [0, N), as table[idx] does; the scatter drops it."""
    weights, idx, data, table = _case(n=300)
    idx[3, 2], idx[4, 5] = 300, -1
    clamped = np.clip(idx, 0, 299)
    np.testing.assert_allclose(
        np.asarray(K.gather_rows(weights, idx, table)),
        np.einsum("bk,bkd->bd", weights, table[clamped]),
        rtol=1e-5,
        atol=1e-5,
    )
    out, wsum = K.scatter_rows(weights, idx, data, 300)
    keep = (idx >= 0) & (idx < 300)
    ref, ref_sum = _scatter_reference(np.where(keep, weights, 0), np.where(keep, idx, 0), data, 300)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(wsum), ref_sum, rtol=1e-5, atol=1e-5)


def test_available_and_drop_in_signatures():
    import inspect

    from saejax.core import cpu_kernels

    assert K.available("cpu")
    assert not K.available("tpu")
    for name in ("top_k", "gather_rows", "row_dots", "scatter_rows"):
        ours = list(inspect.signature(getattr(K, name)).parameters.values())
        theirs = list(inspect.signature(getattr(cpu_kernels, name)).parameters.values())
        assert [(p.name, p.default) for p in ours[: len(theirs)]] == [
            (p.name, p.default) for p in theirs
        ], name
        assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs) :]), name


MESH_CHECK = textwrap.dedent("""
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from saejax.core import pallas_kernels as K

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    B, N, D, k = 32, 96, 24, 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    table = rng.normal(size=(N, D)).astype(np.float32)
    g = rng.normal(size=(B, D)).astype(np.float32)

    def local(x, bias, table, g, interpret=None):
        # x [B/4, N/2], bias [N/2], table [N/2, D], g [B/4, D]
        values, idx = K.top_k(x, k, bias, interpret=interpret)
        acts = jax.nn.relu(values)
        decoded = K.gather_rows(acts, idx, table, interpret=interpret)
        dots = K.row_dots(g, idx, table, interpret=interpret)
        dW, wsum = K.scatter_rows(acts, idx, g, table.shape[0], interpret=interpret)
        dW_t, _ = K.scatter_rows(acts, idx, g, table.shape[0], transposed=True, interpret=interpret)
        return (values, idx, decoded, dots, jax.lax.psum(dW, "data"), jax.lax.psum(wsum, "data"),
                jax.lax.psum(dW_t, "data"))

    def sharded(check_vma, interpret=None):
        return jax.jit(jax.shard_map(
            partial(local, interpret=interpret), mesh=mesh,
            in_specs=(P("data", "model"), P("model"), P("model", None), P("data", None)),
            out_specs=(P("data", "model"),) * 4 + (P("model", None), P("model"), P(None, "model")),
            check_vma=check_vma))

    # interpret mode cannot type-check varying blocks: a clear error, not a wrong result
    try:
        sharded(True)(x, bias, table, g)
        raise AssertionError("check_vma=True ran in interpret mode")
    except NotImplementedError as err:
        assert "check_vma" in str(err), err
    # compiled (GPU) mode types its results under check_vma=True: it traces (no lowering here)
    sharded(True, interpret=False).trace(x, bias, table, g)
    values, idx, decoded, dots, dW, wsum, dW_t = map(np.asarray, sharded(False)(x, bias, table, g))
    half = N // 2
    for m in range(2):
        cols = slice(m * half, (m + 1) * half)
        ref_v, ref_i = jax.lax.top_k(x[:, cols] + bias[cols], k)
        np.testing.assert_array_equal(values[:, m * k:(m + 1) * k], ref_v)
        np.testing.assert_array_equal(idx[:, m * k:(m + 1) * k], ref_i)
        acts, sel = np.maximum(np.asarray(ref_v), 0), np.asarray(ref_i)
        t = table[cols]
        np.testing.assert_allclose(decoded[:, m * D:(m + 1) * D],
                                   np.einsum("bk,bkd->bd", acts, t[sel]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dots[:, m * k:(m + 1) * k], np.einsum("bd,bkd->bk", g, t[sel]),
                                   rtol=1e-5, atol=1e-5)
        ref = np.zeros((half, D), np.float32)
        np.add.at(ref, sel.reshape(-1), (acts[:, :, None] * g[:, None, :]).reshape(-1, D))
        ref_sum = np.zeros(half, np.float32)
        np.add.at(ref_sum, sel.reshape(-1), acts.reshape(-1))
        np.testing.assert_allclose(dW[cols], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dW_t[:, cols], ref.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(wsum[cols], ref_sum, rtol=1e-5, atol=1e-5)
    print("mesh ok")
""")


def test_kernels_under_shard_map_on_fake_devices():
    """On a (4 data, 2 model) mesh of fake CPU devices, as _select_and_decode_sharded uses
    them: each shard's top k, gathers and scatter-adds of its own latents, with weights
    replicated over "data" next to rows split over it. Interpret mode runs only with
    check_vma=False (see pallas_kernels._call); with check_vma=True it says so."""
    result = run_on_fake_devices(["-c", MESH_CHECK], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh ok" in result.stdout


def test_wired_into_the_training_loss_as_topk_kernel_pallas():
    """`topk_kernel="pallas"` puts these kernels behind sae.py's four dispatch points: the
    dense reference's loss, fire counts and gradients, AuxK included (tests/core/
    test_sparse_topk.py checks more cases, test_topk_kernels_mesh.py the sharded step)."""
    import dataclasses

    from saejax.core import sae as S

    sparse = S.SAESpec("topk", d_in=16, d_sae=96, k=4, aux_k=12, topk_kernel="pallas")
    assert sparse.kernels == "pallas"
    dense = dataclasses.replace(sparse, topk_kernel="dense")
    rng = np.random.default_rng(0)
    params = S.init_params(sparse, jax.random.PRNGKey(0))
    params = {
        **params,
        "W_enc": params["W_enc"] + jnp.asarray(rng.normal(0, 0.05, (16, 96)), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(0, 0.1, 96), jnp.float32),
        "b_dec": jnp.asarray(rng.normal(0, 0.1, 16), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
    dead = jnp.zeros(96, bool).at[jnp.arange(7) * 13].set(True)
    fn = jax.jit(S.loss_and_grads, static_argnums=2)
    got, ref = fn(params, x, sparse, dead, 0.0, 1 / 32), fn(params, x, dense, dead, 0.0, 1 / 32)
    traced = str(
        jax.make_jaxpr(S.loss_and_grads, static_argnums=2)(params, x, sparse, dead, 0.0, 0.1)
    )
    for name in ("saejax_top_k", "saejax_gather_rows", "saejax_row_dots", "saejax_scatter_rows"):
        assert name in traced, name  # each dispatch point called its Pallas kernel
    assert float(ref[0]["aux_loss"]) > 0
    for key in ("loss", "aux_loss", "fvu"):
        np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(got[1], ref[1])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(got[3][name], ref[3][name], rtol=2e-4, atol=2e-6, err_msg=name)
