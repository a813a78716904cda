"""Held-out metrics with the field's conventions: pooled FVU and explained variance, the same
without outlier rows, the median per-token relative error, and an explicit count of latents
that never fired."""

import numpy as np
import pytest

from saejax.core import sae as S
from saejax.train.evaluate import evaluate_rows


def shrinking_sae(d: int, silent: int, shrink: float = 0.9):
    """A ReLU SAE whose reconstruction is `shrink`·x, plus `silent` latents that never fire."""
    eye = np.eye(d, dtype=np.float32)
    zeros = np.zeros((d, silent), np.float32)
    params = {
        "W_enc": np.concatenate([eye, -eye, zeros], 1),
        "b_enc": np.zeros(2 * d + silent, np.float32),
        "W_dec": np.concatenate([shrink * eye, -shrink * eye, zeros.T], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    return params, S.SAESpec("relu", d, 2 * d + silent)


def test_fvu_explained_variance_outliers_and_relative_error():
    rng = np.random.default_rng(0)
    d, n = 16, 2000
    rows = (rng.normal(size=(n, d)) + 3.0).astype(np.float32)
    rows[:4] *= 60.0  # four attention-sink-like rows with most of the variance
    params, spec = shrinking_sae(d, silent=5)
    out = evaluate_rows(params, spec, 1.0, rows, batch_size=512)

    x = rows.astype(np.float64)
    err = 0.01 * np.sum(x * x, 1)  # ‖x − 0.9x‖²

    def fvu(r, e):
        return e.sum() / np.sum(np.square(r - r.mean(0)))

    assert out["fvu"] == pytest.approx(fvu(x, err), rel=1e-4)
    assert out["explained_variance"] == pytest.approx(1 - fvu(x, err), rel=1e-4)
    assert out["outlier_rows"] == 4
    assert out["fvu_without_outliers"] == pytest.approx(fvu(x[4:], err[4:]), rel=1e-4)
    # the outliers dominate: without them the same SAE looks much worse
    assert out["fvu_without_outliers"] > 5 * out["fvu"]
    assert out["outlier_variance_share"] > 0.9
    assert out["median_relative_error"] == pytest.approx(0.1, rel=1e-4)
    legacy = np.mean(1 - err / np.sum(np.square(x - x.mean(0)), 1))
    assert out["explained_variance_legacy"] == pytest.approx(legacy, rel=1e-4)


def test_latents_that_never_fired_are_counted_not_dropped():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(500, 8)).astype(np.float32)
    params, spec = shrinking_sae(8, silent=3)
    out = evaluate_rows(params, spec, 1.0, rows)
    assert out["never_fired"] == 3
    assert out["silent_in_eval_fraction"] == pytest.approx(3 / spec.d_sae)
    # every latent is either in the histogram, below its first edge, or never fired
    assert sum(out["density_hist"]) + out["density_underflow"] + out["never_fired"] == spec.d_sae
