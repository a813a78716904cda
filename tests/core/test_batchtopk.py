"""BatchTopK: k x batch activations per batch in training; a learned threshold at inference."""

import numpy as np
from helpers import small_config, superposition_data

from saejax.core import sae as S
from saejax.train.run import train


def test_batchtopk_trains_and_learns_its_inference_threshold(tmp_path):
    rows, _ = superposition_data(20_000, d=32, m=128, p=0.03, seed=11)
    np.save(tmp_path / "rows.npy", rows)
    result = train(
        small_config(
            str(tmp_path / "rows.npy"),
            str(tmp_path / "run"),
            "sae.architecture=batchtopk",
            "sae.k=4",
            "train.tokens=32768",
        )
    )
    threshold = np.asarray(result.state.params["threshold"])
    assert (threshold > 0).all() and np.allclose(threshold, threshold[0])
    x = rows[:2048] * float(result.state.input_scale)
    f_train = np.asarray(S.encode(result.state.params, x, result.spec, training=True))
    assert np.isclose((f_train > 0).sum(1).mean(), 4, atol=0.05)  # exactly k per row on average
    # The inference threshold keeps a comparable sparsity without looking at the batch.
    assert 1.5 <= result.final_metrics["l0"] <= 10
    assert result.final_metrics["fvu"] < 0.9
