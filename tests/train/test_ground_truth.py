"""Towards Monosemanticity's ground-truth check: recover known directions in superposition.

512 unit directions in 64 dimensions, each active with probability 1%, trained with the
real loop (`train`) from a .npy file, with the shipped optimizer and sparsity defaults (the
automatic lr, its schedule, the L1 weight and warm-up): only the shape, the data and the budget
are set here.
"""

import numpy as np
import pytest
from helpers import mean_max_cosine, small_config, superposition_data

from saejax.train.run import train


@pytest.fixture(scope="module")
def superposition(tmp_path_factory):
    rows, directions = superposition_data(300_000)
    path = tmp_path_factory.mktemp("gt") / "rows.npy"
    np.save(path, rows)
    return str(path), directions


def test_topk_recovers_features(superposition, tmp_path):
    path, directions = superposition
    cfg = small_config(
        path,
        str(tmp_path / "topk"),
        "sae.architecture=topk",
        "sae.d_sae=1024",
        "sae.k=5",
        "train.tokens=819200",
        "train.batch_size=1024",
        "sae.dead_tokens=20000",
        "train.log_every=100",
        "train.checkpoint_every=100000",
        "data.block_rows=8192",
        "data.shuffle_blocks=8",
    )
    result = train(cfg)
    assert mean_max_cosine(directions, result.state.params["W_dec"]) >= 0.95
    assert 4.5 <= result.final_metrics["l0"] <= 5  # TopK, then ReLU: at most k fire


def test_relu_with_resampling_recovers_features(superposition, tmp_path):
    path, directions = superposition
    cfg = small_config(
        path,
        str(tmp_path / "relu"),
        "sae.architecture=relu",
        "sae.d_sae=1024",
        "train.tokens=1536000",
        "train.batch_size=1024",
        "sae.dead_tokens=20000",
        "train.resample.every_steps=200",
        "train.resample.stop_after_fraction=0.6",
        "train.log_every=100",
        "train.checkpoint_every=100000",
        "data.block_rows=8192",
        "data.shuffle_blocks=8",
    )
    result = train(cfg)
    assert int(result.state.resampled_total) > 0, "the schedule must have revived latents"
    assert mean_max_cosine(directions, result.state.params["W_dec"]) >= 0.9
