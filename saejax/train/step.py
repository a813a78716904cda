"""The compiled training step, its on-device metric accumulators, and the resampler.

`train_step(state, batch) -> (state, metrics)` is one pure function: forward, loss,
gradient, optax update, decoder-norm projection, dead-latent counters and metric
sums. Nothing in it leaves the device; the host fetches `metric_sums` every N
steps with `summarize` (one transfer) and calls `resample` at scheduled steps.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax.config import SAEConfig, TrainConfig
from saejax.core import sae as S
from saejax.core.architectures import batch_selects, has_l1_penalty, revived_vectors

TSF_CAP = 2**30  # tokens-since-fired saturates here (int32)
DENSITY_EDGES = tuple(float(e) for e in np.linspace(-8.0, 0.0, 17))  # log10 firing frequency
# fvu_without_outliers: the FVU over the batch's rows with norm <= 10× the batch's median row
# norm (core.sae.fvu_without_outliers), eval.json's outlier rule applied per batch
METRIC_NAMES = (
    "loss",
    "mse",
    "fvu",
    "fvu_without_outliers",
    "l0",
    "aux_loss",
    "sparsity_loss",
    "grad_norm",
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken = batches consumed
    params: dict
    opt_state: Any
    rng: jax.Array  # uint32[2]
    tokens_since_fired: jax.Array  # int32 [d_sae]
    fire_count: jax.Array  # int32 [d_sae], since the last summary
    window_tokens: jax.Array  # int32 scalar, since the last summary
    metric_sums: dict  # float32 scalars, since the last summary
    resampled: jax.Array  # int32: latents resampled since the last summary
    resampled_total: jax.Array  # int32: over the whole run
    # float32 scalar: inputs are multiplied by it before the SAE; a transcoder's is [2], the
    # scales of its input x and its target y (each to its own mean norm sqrt(width))
    input_scale: jax.Array


# train.lr = 0 picks lr = AUTO_LR_BASE[architecture] * (d_sae / 2**14) ** -0.5: Gao et al.
# (2024) found the best lr falls as 1/sqrt(d_sae). The base (the lr at 2**14 latents) comes from
# benchmarks/recovery.py's tuning toys: for topk 2.5e-4, 5e-4 and 1e-3 were tried (5e-4 and 1e-3
# tie; the lower is kept, nearer the field's values for large dictionaries); relu uses the same
# base with its L1 coefficient tuned on it; batchtopk and jumprelu share it untuned.
AUTO_LR_BASE = {"topk": 5e-4, "batchtopk": 5e-4, "relu": 5e-4, "jumprelu": 5e-4}
AUTO_LR_BASE["matryoshka_batchtopk"] = 5e-4  # batchtopk's, untuned
AUTO_LR_BASE["gated"] = 5e-4  # relu's base, kept on gated's tuning toy (tests/core/test_gated.py)


def auto_lr(sae_cfg: SAEConfig) -> float:
    """The default learning rate of a dictionary of sae_cfg.d_sae latents (train.lr = 0)."""
    return AUTO_LR_BASE[sae_cfg.architecture] * (sae_cfg.d_sae / 2**14) ** -0.5


def resolve_lr(cfg: TrainConfig, sae_cfg: SAEConfig | None = None) -> float:
    """train.lr when set (> 0), else auto_lr (of the default SAEConfig when none is given)."""
    return cfg.lr if cfg.lr > 0 else auto_lr(sae_cfg or SAEConfig())


def make_schedule(cfg: TrainConfig, total_steps: int, lr: float | None = None):
    """Linear warm-up from 0, then cfg.lr_schedule. `wsd` holds the lr, then decays it linearly
    to 0 over the last lr_decay_fraction of the steps (Anthropic, April 2024 update)."""
    lr = cfg.lr if lr is None else lr
    warmup = min(cfg.lr_warmup_steps, max(0, total_steps - 1))
    rest = max(1, total_steps - warmup)
    if cfg.lr_schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest)
    elif cfg.lr_schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, rest)
    else:  # wsd
        decay = min(rest, max(1, round(cfg.lr_decay_fraction * total_steps)))
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [rest - decay]
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
    cfg: TrainConfig, total_steps: int, sae_cfg: SAEConfig | None = None
) -> optax.GradientTransformation:
    """Clipping and Adam on the schedule; `sae_cfg` sizes the automatic lr (train.lr = 0)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    schedule = make_schedule(cfg, total_steps, resolve_lr(cfg, sae_cfg))
    parts.append(optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2))
    return optax.chain(*parts)


def init_state(params: dict, tx, seed: int, input_scale) -> TrainState:
    d_sae = params["W_enc"].shape[1]
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        tokens_since_fired=jnp.zeros(d_sae, jnp.int32),
        fire_count=jnp.zeros(d_sae, jnp.int32),
        window_tokens=jnp.int32(0),
        metric_sums={name: jnp.float32(0.0) for name in METRIC_NAMES} | {"steps": jnp.float32(0.0)},
        resampled=jnp.int32(0),
        resampled_total=jnp.int32(0),
        input_scale=jnp.asarray(input_scale, jnp.float32),
    )


def scaled_rows(batch, input_scale, spec: S.SAESpec):
    """(x, y) in training units from a batch of raw rows: an SAE's rows are x (y is None); a
    transcoder's are [x | y] side by side (data.ArraySource reads both hooks at the same
    rows), each scaled by its own factor."""
    rows = batch.astype(jnp.float32)
    if not spec.transcoder:
        return rows * input_scale, None
    return rows[:, : spec.d_in] * input_scale[0], rows[:, spec.d_in :] * input_scale[1]


def remove_parallel_grad(grads: dict, W_dec) -> dict:
    """Drop the gradient component along each (unit) decoder row: it would only change its norm."""
    g = grads["W_dec"]
    parallel = jnp.sum(g * W_dec, axis=-1, keepdims=True) * W_dec
    return {**grads, "W_dec": g - parallel}


def project_params(params: dict, spec: S.SAESpec, normalize_decoder: bool) -> dict:
    if normalize_decoder:
        W = params["W_dec"]
        params = {
            **params,
            "W_dec": W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-8),
        }
    if spec.architecture == "jumprelu":
        params = {**params, "threshold": jnp.maximum(params["threshold"], 1e-6)}
    return params


def make_train_step(spec: S.SAESpec, sae_cfg: SAEConfig, tx, total_steps: int):
    """Build the pure step function for one configuration (jit it at the call site)."""
    aux_coefficient = sae_cfg.aux_coefficient
    normalize = sae_cfg.normalize_decoder

    def sparsity_coefficient(step):
        """The L1 weight (relu, gated) or L0 weight (jumprelu), warmed up linearly (0 steps:
        the first 5%)."""
        if has_l1_penalty(spec.architecture):
            coefficient, warmup = sae_cfg.l1_coefficient, sae_cfg.l1_warmup_steps
        elif spec.architecture == "jumprelu":
            coefficient, warmup = sae_cfg.l0_coefficient, sae_cfg.l0_warmup_steps
        else:
            return jnp.float32(0.0)
        warm = max(1, warmup or round(0.05 * total_steps))
        return jnp.float32(coefficient) * jnp.minimum(1.0, (step + 1) / warm)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        x, y = scaled_rows(batch, state.input_scale, spec)
        dead = state.tokens_since_fired >= sae_cfg.dead_tokens
        parts, fires, smallest, grads = S.loss_and_grads(
            state.params, x, spec, dead, sparsity_coefficient(state.step), aux_coefficient, y
        )
        if batch_selects(spec.architecture):  # the threshold is a running statistic
            grads = {**grads, "threshold": jnp.zeros_like(grads["threshold"])}
        if normalize:
            grads = remove_parallel_grad(grads, state.params["W_dec"])
        parts["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = project_params(optax.apply_updates(state.params, updates), spec, normalize)
        if batch_selects(spec.architecture):
            params = {**params, "threshold": _batchtopk_threshold(state, smallest)}
        fired = fires > 0
        n = jnp.int32(x.shape[0])
        tsf = jnp.where(fired, 0, jnp.minimum(state.tokens_since_fired + n, TSF_CAP))
        sums = {k: state.metric_sums[k] + parts[k].astype(jnp.float32) for k in METRIC_NAMES}
        sums["steps"] = state.metric_sums["steps"] + 1.0
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            tokens_since_fired=tsf,
            fire_count=state.fire_count + fires,
            window_tokens=state.window_tokens + n,
            metric_sums=sums,
        )
        return new_state, parts

    return train_step


def _batchtopk_threshold(state: TrainState, smallest):
    """Running mean of the smallest kept activation: the inference threshold of BatchTopK."""
    smallest = jnp.where(jnp.isfinite(smallest), smallest, state.params["threshold"][0])
    old = state.params["threshold"]
    value = jnp.where(state.step == 0, smallest, 0.99 * old + 0.01 * smallest)
    return jnp.broadcast_to(value, old.shape).astype(jnp.float32)


def summarize(state: TrainState, dead_tokens: int) -> tuple[dict, TrainState]:
    """Means of the metric sums, dead fraction, density histogram; then reset the window."""
    steps = jnp.maximum(state.metric_sums["steps"], 1.0)
    out = {k: state.metric_sums[k] / steps for k in METRIC_NAMES}
    freq = state.fire_count / jnp.maximum(state.window_tokens, 1)
    log_freq = jnp.log10(jnp.maximum(freq, 1e-10))
    out["density_hist"] = jnp.histogram(log_freq, bins=jnp.asarray(DENSITY_EDGES))[0]
    out["never_fired_in_window"] = jnp.sum(state.fire_count == 0)
    out["dead_fraction"] = jnp.mean(state.tokens_since_fired >= dead_tokens)
    out["resampled"] = state.resampled
    out["resampled_total"] = state.resampled_total
    out["step"] = state.step
    d_sae = state.fire_count.shape[0]
    reset = state.replace(
        fire_count=jnp.zeros(d_sae, jnp.int32),
        window_tokens=jnp.int32(0),
        resampled=jnp.int32(0),
        metric_sums=jax.tree_util.tree_map(jnp.zeros_like, state.metric_sums),
    )
    return out, reset


# ---- Anthropic's resampling of dead latents, on device ------------------------------
def _reset_adam_moments(opt_state, dead, vectors=("b_enc",)):
    """Zero Adam's first and second moments for exactly the dead latents' rows/columns
    (`vectors`: the [d_sae] parameters revived with them, `revived_vectors`)."""

    def mask_moments(moments: dict) -> dict:
        return {
            **moments,
            "W_enc": jnp.where(dead[None, :], 0.0, moments["W_enc"]),
            "W_dec": jnp.where(dead[:, None], 0.0, moments["W_dec"]),
        } | {name: jnp.where(dead, 0.0, moments[name]) for name in vectors}

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=mask_moments(node.mu), nu=mask_moments(node.nu))
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(visit(n) for n in node)
        return node

    return visit(opt_state)


@partial(jax.jit, static_argnames=("spec", "dead_tokens", "encoder_scale"), donate_argnums=0)
def resample(
    state: TrainState, pool, spec: S.SAESpec, dead_tokens: int, encoder_scale: float = 0.2
):
    """Revive dead latents from inputs sampled with probability proportional to squared loss.

    Dead latent i: W_dec[i] = unit(x), W_enc[:, i] = unit(x) * encoder_scale * mean live
    encoder norm, b_enc[i] = 0 (gated: b_gate, r_mag and b_mag), and its Adam moments zeroed.
    A transcoder's decoder row is the sampled row's unit residual y − ŷ (what the decoder
    fails to produce, in the output space) and its encoder column that row's unit x.
    `pool` is raw rows, as the step receives them.
    """
    x, y = scaled_rows(pool, state.input_scale, spec)
    params = state.params
    x_hat, _, _ = S.forward(params, x, spec, training=True)
    residual = (x if y is None else y) - x_hat
    loss = jnp.sum(jnp.square(residual), axis=-1)
    weights = jnp.square(loss)
    rng, key = jax.random.split(state.rng)
    logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    logits = jnp.where(jnp.any(weights > 0), logits, 0.0)  # all perfect: sample uniformly
    chosen = jax.random.categorical(key, logits, shape=(spec.d_sae,))
    directions = _unit(x[chosen])
    dec_directions = directions if y is None else _unit(residual[chosen])
    dead = state.tokens_since_fired >= dead_tokens
    enc_norms = jnp.linalg.norm(params["W_enc"], axis=0)
    n_live = jnp.sum(~dead)
    live_norm = jnp.where(
        n_live > 0, jnp.sum(jnp.where(dead, 0.0, enc_norms)) / jnp.maximum(n_live, 1), 1.0
    )
    new_params = {
        **params,
        "W_dec": jnp.where(dead[:, None], dec_directions, params["W_dec"]),
        "W_enc": jnp.where(
            dead[None, :], directions.T * (encoder_scale * live_norm), params["W_enc"]
        ),
    }
    vectors = revived_vectors(spec.architecture)
    new_params |= {name: jnp.where(dead, 0.0, params[name]) for name in vectors}
    n_dead = jnp.sum(dead, dtype=jnp.int32)
    return state.replace(
        params=new_params,
        opt_state=_reset_adam_moments(state.opt_state, dead, vectors),
        rng=rng,
        tokens_since_fired=jnp.where(dead, 0, state.tokens_since_fired),
        resampled=state.resampled + n_dead,
        resampled_total=state.resampled_total + n_dead,
    )


def _unit(rows):
    return rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-8)


def resample_steps(cfg: TrainConfig, total_steps: int) -> set[int]:
    """Steps (counted after the update) at which resampling runs: the explicit `steps`, else
    the multiples of `every_steps`, else `at_fractions` of the run (which fire in a run of any
    length; a fixed step count never fires in a short run), none after stop_after_fraction."""
    r = cfg.resample
    last = int(total_steps * r.stop_after_fraction)
    if r.steps:
        steps = set(r.steps)
    elif r.every_steps:
        steps = set(range(r.every_steps, last + 1, r.every_steps))
    else:
        steps = {round(f * total_steps) for f in r.at_fractions}
    return {s for s in steps if 0 < s <= last}
