"""Small builders shared by the trainer tests."""

import numpy as np

from saejax.config import load_config


def superposition_data(n: int, d: int = 64, m: int = 512, p: float = 0.01, seed: int = 0):
    """Rows that are sparse sums of `m` known unit directions in `d` dimensions."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(m, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = (rng.random((n, m)) < p) * rng.uniform(0.5, 1.5, (n, m))
    return (active @ directions).astype(np.float32), directions


def mean_max_cosine(true_directions, W_dec) -> float:
    W = np.asarray(W_dec, np.float64)
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    return float((true_directions @ W.T).max(axis=1).mean())


def small_config(data_path: str, run_dir: str, *overrides: str):
    base = [f"data.path={data_path}", f"run_dir={run_dir}", "sae.d_sae=64", "sae.k=4",
            "train.tokens=16384", "train.batch_size=256", "train.log_every=8",
            "train.checkpoint_every=16", "data.validation_tokens=1024", "data.block_rows=512",
            "data.shuffle_blocks=4", "log.progress=false", "sae.dead_tokens=2048"]
    return load_config(None, base + list(overrides))
