"""The per-neuron weight statistic p = ‖w_in‖₂ · b_in and its per-layer summaries.

The paper reads a positive median p as neurons whose bias pushes them to fire often
(less monosemantic) and tracks it across depth and after preference tuning (DPO).
"""

from __future__ import annotations

import numpy as np

from analysis.weights import MLPWeights


class UndefinedStatistic(ValueError):
    """The model has no MLP input bias, so ‖w_in‖·b_in does not exist."""


def relative_depth(n_layers: int) -> np.ndarray:
    return np.arange(n_layers) / max(n_layers - 1, 1)


def neuron_statistic(w_in: np.ndarray, b_in: np.ndarray | None) -> np.ndarray:
    """p[l, j] = ‖W_in[l, :, j]‖₂ · b_in[l, j] (the norm, not its square)."""
    if b_in is None:
        raise UndefinedStatistic("no MLP input bias")
    return np.linalg.norm(w_in, axis=1) * b_in


def layer_medians(p: np.ndarray) -> dict:
    """median_j p per layer, and the same divided by max_l median_j |p[l, j]|."""
    median = np.median(p, axis=1)
    scale = float(np.max(np.median(np.abs(p), axis=1)))
    normalised = median / scale if scale > 0 else np.full_like(median, np.nan)
    return {
        "median": median,
        "scale": scale,
        "normalised": normalised,
        "relative_depth": relative_depth(p.shape[0]),
    }


def neuron_extras(w: MLPWeights) -> dict:
    """Saved alongside p: ‖W_out[l, j, :]‖₂, b_out, and cos(W_in[l, :, j], W_out[l, j, :])."""
    out_norm = np.linalg.norm(w.w_out, axis=2)
    in_norm = np.linalg.norm(w.w_in, axis=1)
    dot = np.einsum("ldj,ljd->lj", w.w_in, w.w_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (in_norm * out_norm)
    extras = {"w_out_norm": out_norm, "cos_in_out": cos}
    if w.b_out is not None:
        extras["b_out"] = w.b_out
    return extras


def weight_statistics(processed: MLPWeights) -> dict:
    """Everything `saejax analyze weights` writes for one (processed) model."""
    p = neuron_statistic(processed.w_in, processed.b_in)
    return {"p": p, **layer_medians(p), **neuron_extras(processed)}
