"""BatchTopK: k x batch activations per batch in training; a learned threshold at inference."""

import jax
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


def test_the_batch_cutoff_is_the_exact_kth_largest_even_when_one_row_holds_most_of_it():
    """The cutoff is searched among each row's 4k largest first; a row holding more of the
    batch's largest entries than that (here one row far above the rest, as at initialisation)
    sends the search over the whole batch. Both ways give NumPy's answer, ties included (every entry
    equal to the cutoff is kept)."""
    rng = np.random.default_rng(0)
    k = 3
    spread = np.maximum(rng.normal(size=(64, 200)), 0).astype(np.float32)
    one_loud_row = spread.copy()
    one_loud_row[5] += 10.0  # row 5 holds the batch's 200 largest entries
    ties = np.round(spread, 1)  # many equal values at the cutoff
    few_positive = np.where(rng.random((64, 200)) < 0.01, spread, 0.0).astype(np.float32)
    for pre in (spread, one_loud_row, ties, few_positive):
        expected = np.sort(pre.reshape(-1))[::-1][k * 64 - 1]
        for kernels in ("xla", S.sparse_kernels("auto")):
            got = jax.jit(lambda p: S._batchtopk_cutoff(p, k, kernels))(pre)
            assert float(got) == expected
        kept = np.asarray(S.batchtopk_activation(pre, k)) > 0
        assert (kept == ((pre >= expected) & (pre > 0))).all()
