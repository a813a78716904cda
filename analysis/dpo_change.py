"""How preference tuning moves the weight statistic, on the neurons it changed most."""

from __future__ import annotations

import numpy as np

from analysis.weight_stats import layer_medians, neuron_statistic, relative_depth
from analysis.weights import MLPWeights


class ArchitectureMismatch(ValueError):
    """Base and tuned models do not have the same MLP shapes."""


def most_changed_neurons(w_in_base: np.ndarray, w_in_tuned: np.ndarray, top: int) -> np.ndarray:
    """Per layer, the `top` neurons with the largest Σ_d |ΔW_in[d, j]|, largest first: [L, top]."""
    change = np.abs(w_in_tuned - w_in_base).sum(axis=1)  # [L, d_mlp]
    top = min(top, change.shape[1])
    # stable sort on the negated change: ties keep the lower neuron index first
    return np.argsort(-change, axis=1, kind="stable")[:, :top]


def dpo_change(base: MLPWeights, tuned: MLPWeights, top: int = 100) -> dict:
    """The statistic over each layer's `top` most-changed neurons, for both models.

    Each model's per-layer medians are normalised by its own max over layers of the
    median |p| (over the same selected neurons); the change is (tuned − base) / |base|.
    """
    if base.shape_signature() != tuned.shape_signature():
        raise ArchitectureMismatch(
            f"base {base.shape_signature()} and tuned {tuned.shape_signature()} differ"
        )
    selected = most_changed_neurons(base.w_in, tuned.w_in, top)
    summaries = {}
    for name, w in (("base", base), ("tuned", tuned)):
        p = neuron_statistic(w.w_in, w.b_in)
        summaries[name] = layer_medians(np.take_along_axis(p, selected, axis=1))
    b, t = summaries["base"]["normalised"], summaries["tuned"]["normalised"]
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = (t - b) / np.abs(b)
    return {
        "selected": selected,
        "base": summaries["base"],
        "tuned": summaries["tuned"],
        "relative_change": relative,
        "relative_depth": relative_depth(base.n_layers),
    }
