"""SAE options from Gemma Scope and OpenAI: `sae.apply_b_dec_to_input` (does the encoder see
x − b_dec or x?) and `sae.aux_normalization` (what AuxK's squared error is divided by), each
checked against a NumPy reference, trained, and carried through the SAELens export."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_store, run_on_fake_devices, small_config, superposition_data

from saejax.cli import main
from saejax.config import load_config
from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.train.run import train
from saejax.train.sae_files import load_sae

D_IN, D_SAE = 6, 16


def random_params(spec, seed=0):
    """Every parameter random (b_dec large), so that each term of the encoder shows."""
    params = S.init_params(spec, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    out = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    out["b_dec"] = 3.0 * out["b_dec"]
    if "threshold" in out:
        out["threshold"] = jnp.abs(out["threshold"])
    return out


def numpy_encode(p, x, spec):
    """What SAELens (and Gemma Scope) compute, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x_in = x - p["b_dec"] if spec.apply_b_dec_to_input else x
    scores = x_in @ p["W_enc"]
    a = spec.architecture
    if a == "gated":
        gate = scores + p["b_gate"]
        mag = scores * np.exp(p["r_mag"]) + p["b_mag"]
        return np.where(gate > 0, np.maximum(mag, 0), 0.0)
    pre = scores + p["b_enc"]
    if a == "relu":
        return np.maximum(pre, 0)
    if a == "topk":
        kth = np.sort(pre, axis=1)[:, -spec.k][:, None]
        return np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    return np.where(pre > p["threshold"], pre, 0.0)  # jumprelu; batchtopk at inference


@pytest.mark.parametrize("apply", [True, False])
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk", "gated"])
def test_encode_matches_the_numpy_formula(arch, apply):
    spec = S.SAESpec(arch, D_IN, D_SAE, k=3, topk_kernel="dense", apply_b_dec_to_input=apply)
    params = random_params(spec)
    x = np.random.default_rng(1).normal(size=(9, D_IN)).astype(np.float32)
    got = np.asarray(S.encode(params, jnp.asarray(x), spec))
    np.testing.assert_allclose(got, numpy_encode(params, x, spec), rtol=1e-5, atol=1e-5)
    assert (got > 0).any()


def test_the_two_conventions_differ_by_b_dec_times_w_enc():
    """The same weights: the pre-activations differ by exactly b_dec·W_enc per latent."""
    with_b_dec = S.SAESpec("relu", D_IN, D_SAE)
    without = S.SAESpec("relu", D_IN, D_SAE, apply_b_dec_to_input=False)
    params = random_params(with_b_dec)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, D_IN)), jnp.float32)
    shift = params["b_dec"] @ params["W_enc"]
    np.testing.assert_allclose(
        S.pre_activations(params, x, without) - S.pre_activations(params, x, with_b_dec),
        np.broadcast_to(shift, (5, D_SAE)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("apply", [True, False])
def test_sparse_topk_gradients_equal_the_dense_ones(apply):
    """The sparse kernels' hand-written backward follows the option: without b_dec on the
    input, b_dec's only gradient is the decoder's."""
    dense = S.SAESpec("topk", D_IN, D_SAE, k=3, topk_kernel="dense", apply_b_dec_to_input=apply)
    sparse = S.SAESpec("topk", D_IN, D_SAE, k=3, topk_kernel="sparse", apply_b_dec_to_input=apply)
    params = random_params(dense)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(12, D_IN)), jnp.float32)
    grads = [jax.grad(lambda p, s=s: S.loss_fn(p, x, s, 0.0)[0])(params) for s in (dense, sparse)]
    for name in params:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)
    if not apply:  # the decoder's share alone: d/d b_dec of Σ‖x − x̂‖²/variance
        variance = np.sum((np.asarray(x) - np.asarray(x).mean(0)) ** 2)
        x_hat = S.forward(params, x, dense)[0]
        expected = -2 * np.sum(np.asarray(x - x_hat), axis=0) / variance
        np.testing.assert_allclose(grads[0]["b_dec"], expected, rtol=1e-4, atol=1e-6)


def numpy_auxk(params, x, dead, spec, normalization):
    """AuxK in float64: the top aux_k dead latents (ReLU'd) reconstruct the main residual;
    the squared error over the total variance of x or of the residual, times
    min(n_dead / aux_k, 1)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    kth = np.sort(pre, axis=1)[:, -spec.k][:, None]
    f = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    residual = x - (f @ p["W_dec"] + p["b_dec"])
    dead_pre = np.where(dead[None, :], pre, -np.inf)
    kth_dead = np.sort(dead_pre, axis=1)[:, -spec.aux_k][:, None]
    f_aux = np.where(dead_pre >= kth_dead, np.maximum(dead_pre, 0), 0.0)
    sq = np.sum((f_aux @ p["W_dec"] - residual) ** 2)
    target = residual if normalization == "residual" else x
    variance = np.sum((target - target.mean(0)) ** 2)
    return min(dead.sum() / spec.aux_k, 1.0) * sq / variance


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("normalization", ["input", "residual"])
def test_auxk_loss_matches_the_numpy_reference(normalization, kernel):
    spec = S.SAESpec(
        "topk", D_IN, D_SAE, k=3, aux_k=4, topk_kernel=kernel, aux_normalization=normalization
    )
    params = random_params(spec)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(10, D_IN)), jnp.float32)
    dead = np.zeros(D_SAE, bool)
    dead[[1, 4, 7, 9, 11, 12]] = True
    parts = S.loss_and_grads(params, x, spec, jnp.asarray(dead), 0.0, 1 / 32)[0]
    expected = numpy_auxk(params, x, dead, spec, normalization)
    np.testing.assert_allclose(float(parts["aux_loss"]), expected, rtol=1e-4)


def test_bad_aux_normalization_is_one_line():
    with pytest.raises(SaejaxError, match="sae.aux_normalization must be one of input, residual"):
        load_config(None, ["data.path=x.npy", "sae.aux_normalization=output"])


@pytest.mark.parametrize(
    "arch, apply",
    [("jumprelu", False), ("jumprelu", True), ("topk", False), ("gated", False)],
)
def test_trained_sae_exports_and_loads_with_its_convention(tmp_path, arch, apply):
    """Training works with either value; the SAELens export says which, and the exported
    folder, loaded back, gives the trained SAE's latents and reconstructions."""
    rows, _ = superposition_data(6000, d=16, m=48, p=0.05, seed=3)
    x = rows * 20 + 2  # a large offset, so that b_dec matters
    np.save(tmp_path / "rows.npy", x)
    run = str(tmp_path / "run")
    result = train(
        small_config(
            str(tmp_path / "rows.npy"),
            run,
            f"sae.architecture={arch}",
            "sae.d_sae=32",
            f"sae.apply_b_dec_to_input={str(apply).lower()}",
            "train.tokens=2048",
        )
    )
    assert np.isfinite(result.final_metrics["fvu"])
    own = load_sae(run)
    assert own.spec.apply_b_dec_to_input is apply
    out = str(tmp_path / "saelens")
    assert main(["export", run, "--format", "saelens", "--out", out]) == 0
    cfg = json.load(open(os.path.join(out, "cfg.json")))
    assert cfg["apply_b_dec_to_input"] is apply
    exported = load_sae(out)
    assert exported.spec.apply_b_dec_to_input is apply
    sample = jnp.asarray(x[:300])
    f_own, f_exported = np.asarray(own.encode(sample)), np.asarray(exported.encode(sample))
    np.testing.assert_allclose(f_exported, f_own, rtol=1e-4, atol=1e-4)
    assert (f_own > 0).any()
    np.testing.assert_allclose(
        np.asarray(exported.reconstruct(sample)),
        np.asarray(own.reconstruct(sample)),
        atol=1e-4 * np.abs(x).max(),
    )
    # and the exported weights encode as SAELens does
    np.testing.assert_allclose(
        f_exported, numpy_encode(exported.params, x[:300], exported.spec), rtol=1e-4, atol=1e-3
    )
    if arch == "topk":  # sparsify's layout has no such field: b_dec·W_enc goes into the bias
        sparsify = str(tmp_path / "sparsify")
        assert main(["export", run, "--format", "sparsify", "--out", sparsify]) == 0
        f_sparsify = np.asarray(load_sae(sparsify).encode(sample))
        np.testing.assert_allclose(f_sparsify, f_own, rtol=1e-4, atol=1e-3)


GEMMA_SCOPE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "jumprelu_gemma_scope.yaml",
)


def test_gemma_scope_preset_loads_and_trains_on_a_toy_store(tmp_path):
    """The preset holds the paper's settings in saejax's units (for d_in 2304) and trains as
    it is, with only the size, the budget and the warm-ups shrunk to a toy."""
    cfg = load_config(GEMMA_SCOPE, [], check=False)  # data.path is the user's to set
    assert cfg.sae.architecture == "jumprelu"
    assert (cfg.train.adam_b1, cfg.train.adam_b2, cfg.train.lr) == (0.0, 0.999, 7e-5)
    assert cfg.sae.jumprelu_bandwidth == cfg.sae.jumprelu_init_threshold == 0.001 * 48
    assert cfg.sae.l0_coefficient == pytest.approx(1e-3 * 2304)
    assert cfg.sae.l0_warmup_steps == 10000 and cfg.train.lr_warmup_steps == 1000

    rows, _ = superposition_data(4096, d=16, m=48, p=0.05, seed=7)
    make_store(str(tmp_path / "store"), rows * 5)
    toy = [
        f"data.path={tmp_path / 'store'}",
        f"run_dir={tmp_path / 'run'}",
        "sae.d_sae=32",
        "train.tokens=2048",
        "train.batch_size=256",
        "train.lr_warmup_steps=2",
        "sae.l0_warmup_steps=4",
        "data.validation_tokens=512",
        "data.block_rows=512",
        "data.shuffle_blocks=2",
        "train.log_every=4",
        "train.checkpoint_every=8",
        "log.progress=false",
    ]
    result = train(load_config(GEMMA_SCOPE, toy))
    assert int(result.state.step) == 8
    assert np.isfinite(result.final_metrics["fvu"]) and result.final_metrics["l0"] > 0


MESH_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from helpers import loss_and_grads_on_latent_mesh
    from saejax.core import sae as S

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)
    dead = jnp.zeros(48, bool).at[jnp.arange(16) * 3].set(True)
    for arch, kernel in (("topk", "sparse"), ("topk", "dense"), ("jumprelu", "dense")):
        spec = S.SAESpec(arch, 12, 48, k=4, aux_k=6, topk_kernel=kernel,
                         apply_b_dec_to_input=False, aux_normalization="residual")
        params = S.init_params(spec, jax.random.PRNGKey(1), init_threshold=0.3)
        params["b_dec"] = jnp.asarray(rng.normal(0, 1.0, 12), jnp.float32)
        ref, got = loss_and_grads_on_latent_mesh(params, x, spec, dead)  # a (4, 2) mesh
        for key in ("loss", "aux_loss", "fvu"):
            np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5, err_msg=arch)
        for key in params:
            np.testing.assert_allclose(got[3][key], ref[3][key], rtol=2e-4, atol=2e-6,
                                       err_msg=f"{arch} {kernel}: {key}")
        print("ok", arch, kernel)
""")


def test_both_options_on_a_latent_split_mesh_equal_one_device():
    """x without b_dec and AuxK over the residual's variance, on a (4 data, 2 model) mesh of
    fake CPU devices: loss and gradients as on one device (the sparse kernels included)."""
    result = run_on_fake_devices(["-c", MESH_CHECK], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == 3, result.stdout
