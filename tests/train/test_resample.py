"""The on-device resampler and the transfer-free training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax.config import SAEConfig, TrainConfig, load_config
from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.setup import spec_from_config


def _setup(arch="relu", d_in=16, d_sae=32):
    cfg = SAEConfig(architecture=arch, d_sae=d_sae, k=4, dead_tokens=100, l1_warmup_steps=1)
    spec = spec_from_config(cfg, d_in)
    tx = T.make_optimizer(TrainConfig(lr=1e-2, lr_warmup_steps=0), 100)
    state = T.init_state(S.init_params(spec, jax.random.PRNGKey(0)), tx, 0, 1.0)
    step = jax.jit(T.make_train_step(spec, cfg, tx, 100))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, d_in))
    for _ in range(3):  # non-zero Adam moments everywhere
        state, _ = step(state, x)
    return cfg, spec, state, x


def _adam(opt_state):
    return next(
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    )


def test_forced_dead_latents_are_revived_as_specified():
    cfg, spec, state, x = _setup()
    dead = np.zeros(spec.d_sae, bool)
    dead[[2, 5, 30]] = True
    state = state.replace(
        tokens_since_fired=jnp.where(jnp.asarray(dead), 10**6, 0).astype(jnp.int32)
    )
    before = jax.tree_util.tree_map(np.asarray, state)
    after = T.resample(state, x, spec, cfg.dead_tokens, 0.2)
    p0, p1 = before.params, jax.tree_util.tree_map(np.asarray, after.params)

    x_np = np.asarray(x)
    units = x_np / np.linalg.norm(x_np, axis=1, keepdims=True)
    live_norm = np.linalg.norm(p0["W_enc"], axis=0)[~dead].mean()
    for i in np.flatnonzero(dead):
        row = p1["W_dec"][i]
        assert np.isclose(np.linalg.norm(row), 1, atol=1e-5)
        assert np.isclose(np.abs(units @ row).max(), 1, atol=1e-5), "a unit-normalised input"
        np.testing.assert_allclose(p1["W_enc"][:, i], row * 0.2 * live_norm, rtol=1e-5, atol=1e-6)
        assert p1["b_enc"][i] == 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # live latents untouched
        axis_live = {
            "W_enc": (slice(None), ~dead),
            "b_enc": (~dead,),
            "W_dec": (~dead,),
            "b_dec": (slice(None),),
        }[name]
        np.testing.assert_array_equal(p1[name][axis_live], p0[name][axis_live])

    adam0, adam1 = _adam(before.opt_state), _adam(after.opt_state)
    for moments0, moments1 in ((adam0.mu, adam1.mu), (adam0.nu, adam1.nu)):
        m0 = jax.tree_util.tree_map(np.asarray, moments0)
        m1 = jax.tree_util.tree_map(np.asarray, moments1)
        assert (m1["W_dec"][dead] == 0).all() and (m1["W_enc"][:, dead] == 0).all()
        assert (m1["b_enc"][dead] == 0).all()
        np.testing.assert_array_equal(m1["W_dec"][~dead], m0["W_dec"][~dead])
        np.testing.assert_array_equal(m1["W_enc"][:, ~dead], m0["W_enc"][:, ~dead])
        np.testing.assert_array_equal(m1["b_dec"], m0["b_dec"])
        assert (m0["W_dec"][dead] != 0).any(), "the moments were non-zero before"
    assert int(after.resampled) == 3
    assert (np.asarray(after.tokens_since_fired)[dead] == 0).all()


def test_step_and_resampler_make_no_device_to_host_transfer():
    cfg, spec, state, x = _setup("topk")
    step = jax.jit(T.make_train_step(spec, cfg, T.make_optimizer(TrainConfig(), 100), 100))
    state = jax.device_put(state)
    x = jax.device_put(x)
    state, _ = step(state, x)  # compile outside the guard
    resample = T.resample
    state = resample(state, x, spec, cfg.dead_tokens, 0.2)
    with (
        jax.transfer_guard_device_to_host("disallow"),
        jax.transfer_guard_host_to_device("disallow"),
    ):
        for _ in range(3):
            state, metrics = step(state, x)
        state = resample(state, x, spec, cfg.dead_tokens, 0.2)
    assert np.isfinite(float(metrics["loss"]))


def test_decoder_rows_stay_unit_norm_and_gradient_is_orthogonal():
    cfg, spec, state, x = _setup("topk")
    norms = np.linalg.norm(np.asarray(state.params["W_dec"]), axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-5)
    g = {"W_dec": jnp.ones_like(state.params["W_dec"])}
    g2 = T.remove_parallel_grad(g, state.params["W_dec"])
    dots = np.sum(np.asarray(g2["W_dec"]) * np.asarray(state.params["W_dec"]), axis=1)
    np.testing.assert_allclose(dots, 0, atol=1e-5)


def test_jumprelu_threshold_gets_straight_through_gradient():
    spec = S.SAESpec("jumprelu", 4, 3, jumprelu_bandwidth=0.5)
    z = jnp.array([[0.9, 1.1, 3.0]])
    theta = jnp.array([1.0, 1.0, 1.0])
    g = jax.grad(lambda t: S.step_fn(z, t, 0.5).sum())(theta)
    # Inside the window |z - theta| < bandwidth / 2 the gradient is -1/bandwidth; outside 0.
    np.testing.assert_allclose(np.asarray(g), [-2.0, -2.0, 0.0])
    assert spec.has_threshold


def test_default_schedule_resamples_at_fractions_of_any_run_length():
    # A 6M-token run at batch 4096 has 1464 steps: the old default (every 2500 steps) never fired.
    assert T.resample_steps(TrainConfig(), 1464) == {366, 732, 1098}
    assert T.resample_steps(TrainConfig(), 100_000) == {25_000, 50_000, 75_000}


def test_older_every_steps_and_explicit_steps_still_choose_the_schedule():
    every = TrainConfig()
    every.resample.every_steps = 2500  # what configs written before at_fractions hold
    assert T.resample_steps(every, 10_000) == {2500, 5000, 7500}  # none after 80%
    explicit = TrainConfig()
    explicit.resample.every_steps = 2500
    explicit.resample.steps = [10, 9000]
    assert T.resample_steps(explicit, 10_000) == {10}


def test_a_fraction_outside_the_run_is_one_line_naming_the_key():
    with pytest.raises(SaejaxError, match=r"train.resample.at_fractions must all be in \(0, 1\)"):
        load_config(None, ["data.path=x.npy", "train.resample.at_fractions=[0.5, 1.0]"])
