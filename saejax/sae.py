"""Sparse autoencoders in Flax: relu, topk, batchtopk and jumprelu.

Parameters follow the ecosystem's layout: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in], and threshold [d_sae] (jumprelu; batchtopk
keeps its learned inference threshold there too, updated as a running statistic,
not by gradients). All maths is in pure functions of the parameter dict so that
training, evaluation and export share one definition; `SparseAutoencoder` is the
Flax module that declares and initialises the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saejax.config import SAEConfig


@dataclass(frozen=True)
class SAESpec:
    """What the pure functions need to know about an SAE (hashable: a jit static)."""
    architecture: str
    d_in: int
    d_sae: int
    k: int = 32
    aux_k: int = 256
    jumprelu_bandwidth: float = 1e-3
    compute_dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg: SAEConfig, d_in: int) -> "SAESpec":
        aux_k = cfg.aux_k or max(1, d_in // 2)
        return cls(cfg.architecture, d_in, cfg.d_sae, cfg.k, min(aux_k, cfg.d_sae),
                   cfg.jumprelu_bandwidth, cfg.dtype)

    @property
    def has_threshold(self) -> bool:
        return self.architecture in ("jumprelu", "batchtopk")


class SparseAutoencoder(nn.Module):
    """Declares the parameters; `init_params` below is the usual entry point."""
    spec: SAESpec
    init_threshold: float = 1e-3

    @nn.compact
    def __call__(self, x):
        s = self.spec

        def unit_rows(key, shape, dtype=jnp.float32):
            w = jax.random.normal(key, shape, dtype)
            return w / jnp.linalg.norm(w, axis=-1, keepdims=True)

        W_dec = self.param("W_dec", unit_rows, (s.d_sae, s.d_in))
        # Tied initialisation: each encoder column starts as its decoder row.
        W_enc = self.param("W_enc", lambda key: W_dec.T)
        b_enc = self.param("b_enc", nn.initializers.zeros, (s.d_sae,))
        b_dec = self.param("b_dec", nn.initializers.zeros, (s.d_in,))
        params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if s.has_threshold:
            params["threshold"] = self.param(
                "threshold", nn.initializers.constant(self.init_threshold), (s.d_sae,))
        return forward(params, x, s)[0]


def init_params(spec: SAESpec, key, b_dec: np.ndarray | None = None,
                init_threshold: float = 1e-3) -> dict:
    module = SparseAutoencoder(spec, init_threshold)
    params = dict(module.init(key, jnp.zeros((1, spec.d_in)))["params"])
    if b_dec is not None:
        params["b_dec"] = jnp.asarray(b_dec, jnp.float32)
    return params


# ---- JumpReLU with straight-through threshold gradients ---------------------------
def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, threshold, bandwidth):
    return z * (z > threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, residual, g):
    z, threshold = residual
    dz = g * (z > threshold)
    dthreshold = -(threshold / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return dz, dthreshold.reshape(-1, threshold.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_fn(z, threshold, bandwidth):
    """Heaviside H(z - threshold), with the straight-through gradient for threshold."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step_fn(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, residual, g):
    z, threshold = residual
    dthreshold = -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return jnp.zeros_like(z), dthreshold.reshape(-1, threshold.shape[-1]).sum(0)


step_fn.defvjp(_step_fwd, _step_bwd)


# ---- the forward pass -------------------------------------------------------------
def pre_activations(params, x, spec: SAESpec):
    dt = jnp.dtype(spec.compute_dtype)
    xc = (x - params["b_dec"]).astype(dt)
    return (xc @ params["W_enc"].astype(dt)).astype(jnp.float32) + params["b_enc"]


def topk_activation(pre, k: int):
    """Keep each row's k largest pre-activations (ReLU'd), zero the rest."""
    values, indices = jax.lax.top_k(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, indices].set(jax.nn.relu(values))


def batchtopk_activation(pre, k: int):
    """Keep the batch's k x batch largest ReLU'd pre-activations, wherever they fall."""
    flat = jax.nn.relu(pre).reshape(-1)
    n_keep = k * pre.shape[0]
    cutoff = jax.lax.top_k(flat, n_keep)[0][-1]
    return jnp.where((pre >= cutoff) & (pre > 0), pre, 0.0)


def activate(params, pre, spec: SAESpec, training: bool = True):
    a = spec.architecture
    if a == "relu":
        return jax.nn.relu(pre)
    if a == "topk":
        return topk_activation(pre, spec.k)
    if a == "batchtopk":
        if training:
            return batchtopk_activation(pre, spec.k)
        return jnp.where(pre > params["threshold"], pre, 0.0)  # inference: the learned threshold
    return jumprelu(pre, params["threshold"], spec.jumprelu_bandwidth)


def decode(params, f, spec: SAESpec):
    dt = jnp.dtype(spec.compute_dtype)
    return (f.astype(dt) @ params["W_dec"].astype(dt)).astype(jnp.float32) + params["b_dec"]


def encode(params, x, spec: SAESpec, training: bool = False):
    return activate(params, pre_activations(params, x, spec), spec, training)


def forward(params, x, spec: SAESpec, training: bool = False):
    """(reconstruction, latents, pre-activations)."""
    pre = pre_activations(params, x, spec)
    f = activate(params, pre, spec, training)
    return decode(params, f, spec), f, pre


# ---- losses -----------------------------------------------------------------------
def total_variance(x):
    return jnp.sum(jnp.square(x - x.mean(0)))


def auxk_loss(params, pre, residual, dead, spec: SAESpec, variance):
    """AuxK: reconstruct the main residual from the top aux_k dead latents."""
    dead_pre = jnp.where(dead[None, :], pre, -jnp.inf)
    f_aux = topk_activation(dead_pre, spec.aux_k)
    dt = jnp.dtype(spec.compute_dtype)
    residual_hat = (f_aux.astype(dt) @ params["W_dec"].astype(dt)).astype(jnp.float32)
    n_dead = dead.sum()
    scale = jnp.minimum(n_dead / spec.aux_k, 1.0)
    loss = jnp.sum(jnp.square(residual_hat - residual)) / variance
    return jnp.where(n_dead > 0, scale * loss, 0.0)


def loss_fn(params, x, spec: SAESpec, dead, sparsity_coefficient, aux_coefficient):
    """Training loss and its parts. `x` is already in training units (scaled)."""
    x_hat, f, pre = forward(params, x, spec, training=True)
    err = x - x_hat
    sq = jnp.sum(jnp.square(err))
    variance = jnp.maximum(total_variance(x), 1e-12)
    parts = {"mse": sq / x.shape[0], "fvu": sq / variance,
             "l0": jnp.mean(jnp.sum(f > 0, axis=-1)), "aux_loss": jnp.float32(0.0),
             "sparsity_loss": jnp.float32(0.0)}
    a = spec.architecture
    if a == "relu":
        dec_norms = jnp.linalg.norm(params["W_dec"], axis=-1)
        parts["sparsity_loss"] = jnp.mean(f @ dec_norms)
        loss = parts["mse"] + sparsity_coefficient * parts["sparsity_loss"]
    elif a == "jumprelu":
        l0 = step_fn(pre, params["threshold"], spec.jumprelu_bandwidth).sum(-1).mean()
        parts["sparsity_loss"] = l0
        loss = parts["mse"] + sparsity_coefficient * l0
    else:
        parts["aux_loss"] = auxk_loss(params, pre, jax.lax.stop_gradient(err), dead, spec, variance)
        loss = parts["fvu"] + aux_coefficient * parts["aux_loss"]
    parts["loss"] = loss
    return loss, (parts, f)


# ---- initialisation helpers ---------------------------------------------------------
def geometric_median(points: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm, in float64."""
    x = np.asarray(points, np.float64)
    median = x.mean(0)
    for _ in range(iters):
        dist = np.maximum(np.linalg.norm(x - median, axis=1), 1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(new - median) <= tol * max(1.0, np.linalg.norm(median)):
            return new
        median = new
    return median
