"""Feature decorrelation: how different the MLP pre-activations of different prompts are."""

from __future__ import annotations

import numpy as np


def decorrelation(acts: np.ndarray) -> np.ndarray:
    """acts [L, N, d] (one vector per prompt and layer) → per layer 1 − mean pairwise cosine.

    The mean runs over the N·(N−1) ordered pairs of different prompts; a zero vector
    counts as cosine 0 with everything.
    """
    acts = np.asarray(acts, dtype=np.float64)
    n = acts.shape[1]
    if n < 2:
        raise ValueError("decorrelation needs at least two prompts")
    norms = np.linalg.norm(acts, axis=2, keepdims=True)
    unit = np.divide(acts, norms, out=np.zeros_like(acts), where=norms > 0)
    # Σ_{i≠j} cos(i, j) = ‖Σ_i u_i‖² − Σ_i ‖u_i‖²: O(N·d) instead of an N×N matrix
    total = np.sum(unit, axis=1)
    off_diagonal = np.sum(total * total, axis=1) - np.sum(unit * unit, axis=(1, 2))
    return 1.0 - off_diagonal / (n * (n - 1))
