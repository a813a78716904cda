"""Feature splitting: where a small SAE's latents go in a larger one.

For each latent of the smaller SAE, the latents of the larger SAE whose decoder directions
are closest (cosine of unit decoder rows, model units). A latent that splits shows several
larger-SAE latents with high cosine; one that is kept shows one near 1.
"""

from __future__ import annotations

import numpy as np


def closest_latents(
    W_small: np.ndarray, W_large: np.ndarray, n: int = 3, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(indices [d_small, n], cosines [d_small, n]) of the nearest large-SAE decoder rows."""
    a = W_small / np.maximum(np.linalg.norm(W_small, axis=1, keepdims=True), 1e-12)
    b = W_large / np.maximum(np.linalg.norm(W_large, axis=1, keepdims=True), 1e-12)
    n = min(n, len(b))
    idx = np.zeros((len(a), n), np.int64)
    cos = np.zeros((len(a), n), np.float32)
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        idx[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        cos[start : start + chunk] = np.take_along_axis(sims, idx[start : start + chunk], axis=1)
    return idx, cos
