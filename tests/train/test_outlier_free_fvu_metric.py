"""The per-step training metrics carry the FVU without outlier rows beside the overall FVU:
eval.json's rule (norm > 10× the median) applied within each batch, on device, with no
matmul. Checkpoints written before the metric existed still resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.checkpoint import Checkpointer
from saejax.train.run import train


def with_outliers(n: int, d: int, every: int, seed: int = 0) -> np.ndarray:
    """Rows of the usual toy data, with every `every`-th row 50× longer (an attention sink)."""
    rows, _ = superposition_data(n, d=d, m=4 * d, p=0.05, seed=seed)
    rows[::every] *= 50.0
    return rows


def numpy_fvu_without_outliers(x, err) -> float:
    norms = np.linalg.norm(x, axis=1)
    keep = norms <= 10.0 * np.median(norms)
    inliers = x[keep]
    variance = np.sum(np.square(inliers - inliers.mean(0)))
    return float(np.sum(np.square(err[keep])) / variance)


def test_the_batch_rule_is_eval_jsons_rule():
    x = with_outliers(512, 16, every=100)
    err = 0.1 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    got = float(S.fvu_without_outliers(jnp.asarray(x), jnp.asarray(err)))
    assert got == pytest.approx(numpy_fvu_without_outliers(x, err), rel=1e-5)
    overall = float(jnp.sum(jnp.square(err)) / S.total_variance(jnp.asarray(x)))
    assert got > 10 * overall  # the six sinks hold most of the variance
    shifted = x + 2.0  # a common offset (as residual streams have) costs no precision
    got = float(S.fvu_without_outliers(jnp.asarray(shifted), jnp.asarray(err)))
    assert got == pytest.approx(
        numpy_fvu_without_outliers(shifted.astype(np.float64), err), rel=1e-4
    )


def test_without_outliers_it_is_the_overall_fvu():
    x, _ = superposition_data(512, d=16, m=64, p=0.05, seed=2)
    err = 0.1 * np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    got = float(S.fvu_without_outliers(jnp.asarray(x), jnp.asarray(err)))
    overall = float(jnp.sum(jnp.square(err)) / S.total_variance(jnp.asarray(x)))
    assert got == pytest.approx(overall, rel=1e-5)


def test_it_adds_no_matmul():
    x = jnp.ones((64, 16))
    jaxpr = str(jax.make_jaxpr(S.fvu_without_outliers)(x, x))
    assert "dot_general" not in jaxpr and "sort" in jaxpr  # the median's sort, nothing more


def test_training_logs_it_beside_the_fvu(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, with_outliers(8000, 16, every=97))
    run = tmp_path / "run"
    train(small_config(str(path), str(run), "sae.d_sae=32"), max_steps=16)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 16]
    for r in records:  # a figure of its own (the sinks are fitted as well as the rest here)
        assert np.isfinite(r["fvu_without_outliers"]) and r["fvu_without_outliers"] != r["fvu"]


def test_a_checkpoint_from_before_the_metric_resumes(tmp_path):
    spec = S.SAESpec("topk", 8, 16, k=2)
    tx = T.make_optimizer(T.TrainConfig(), 10)
    state = T.init_state(S.init_params(spec, jax.random.PRNGKey(0)), tx, 0, 1.0)
    old_sums = {k: v + 1.0 for k, v in state.metric_sums.items() if k != "fvu_without_outliers"}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(metric_sums=old_sums), {"d_sae": 16})
    ckpt.wait()
    restored, _ = ckpt.restore(state, {"d_sae": 16})
    assert float(restored.metric_sums["fvu_without_outliers"]) == 0.0
    assert float(restored.metric_sums["fvu"]) == 1.0 and ckpt.saved_steps() == [3]
    ckpt.close()


def test_a_checkpoint_from_a_newer_saejax_is_refused_not_deleted(tmp_path):
    spec = S.SAESpec("topk", 8, 16, k=2)
    tx = T.make_optimizer(T.TrainConfig(), 10)
    state = T.init_state(S.init_params(spec, jax.random.PRNGKey(0)), tx, 0, 1.0)
    newer = {**state.metric_sums, "some_new_metric": state.metric_sums["fvu"]}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(metric_sums=newer), {})
    ckpt.wait()
    with pytest.raises(SaejaxError, match="newer saejax .*some_new_metric"):
        ckpt.restore(state, {})
    assert ckpt.saved_steps() == [3]
    ckpt.close()
