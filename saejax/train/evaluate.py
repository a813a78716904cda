"""An SAE judged on held-out rows: MSE, FVU, L0, dead/dense fractions, density histogram."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.core import sae as S
from saejax.train.data import validation_rows
from saejax.train.step import DENSITY_EDGES


def evaluate_rows(
    params, spec: S.SAESpec, input_scale: float, rows: np.ndarray, batch_size: int = 4096
) -> dict:
    """MSE, FVU, L0, dead/dense fractions and the density histogram on `rows` (raw units)."""

    @jax.jit
    def stats(x):
        x = x.astype(jnp.float32) * input_scale
        x_hat, f, _ = S.forward(params, x, spec, training=False)
        err = jnp.sum(jnp.square(x - x_hat))
        return err, jnp.sum(x, 0), jnp.sum(jnp.square(x)), jnp.sum(f > 0, 0), jnp.sum(f > 0)

    n = len(rows)
    err = sq = l0 = 0.0
    total = np.zeros(spec.d_in)
    fires = np.zeros(spec.d_sae)
    for i in range(0, n, batch_size):
        e, s, q, fc, nz = jax.device_get(stats(jnp.asarray(rows[i : i + batch_size])))
        err, sq, l0 = err + float(e), sq + float(q), l0 + float(nz)
        total += s
        fires += fc
    variance = sq - float(np.sum(total**2)) / n
    freq = fires / n
    hist = np.histogram(np.log10(np.maximum(freq, 1e-10)), bins=np.asarray(DENSITY_EDGES))[0]
    return {
        "tokens": n,
        "mse": err / n,
        "fvu": err / max(variance, 1e-12),
        "l0": l0 / n,
        "dead_fraction": float(np.mean(fires == 0)),
        "dense_fraction": float(np.mean(freq > 0.1)),
        "density_hist": hist.tolist(),
        "density_edges": list(DENSITY_EDGES),
    }


def evaluate(params, spec, input_scale, source, data_cfg) -> dict:
    rows = validation_rows(source, data_cfg)
    return evaluate_rows(params, spec, input_scale, rows)
