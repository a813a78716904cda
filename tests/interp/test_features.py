"""Top-activating examples: one streaming pass equals a brute-force ranking of every row."""

import numpy as np
from helpers import make_store

from saejax.config import load_config
from saejax.core import sae as S
from saejax.interp.features import quantile_examples, scan_examples
from saejax.train.sae_files import load_sae, save_sae


def test_streaming_pass_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1000, 8)).astype(np.float32)
    store = make_store(str(tmp_path / "store"), rows)
    spec = S.SAESpec("relu", 8, 24)
    params = {
        "W_enc": rng.normal(size=(8, 24)).astype(np.float32),
        "b_enc": rng.normal(-1.0, 0.5, 24).astype(np.float32),
        "W_dec": rng.normal(size=(24, 8)).astype(np.float32),
        "b_dec": np.zeros(8, np.float32),
    }
    params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    cfg = load_config(None, ["data.path=x", "sae.architecture=relu", "sae.d_sae=24"], check=False)
    save_sae(str(tmp_path / "sae"), params, spec, 1.0, cfg, store.meta, "h")
    sae = load_sae(str(tmp_path / "sae"))

    result = scan_examples(sae, store, "h", k=5, m=16, chunk_rows=128)  # 8 chunks
    f = np.asarray(sae.encode(rows))
    np.testing.assert_array_equal(result["fire_count"], (f > 0).sum(0))
    np.testing.assert_allclose(result["act_sum"], f.sum(0), rtol=1e-4)
    for latent in range(24):
        expected = np.sort(f[:, latent])[::-1][:5]
        np.testing.assert_allclose(result["top_vals"][latent], expected, rtol=1e-5)
        got_rows = result["top_rows"][latent]
        np.testing.assert_allclose(f[got_rows, latent], result["top_vals"][latent], rtol=1e-5)
        kept = result["sample_priority"][latent] >= 0
        assert kept.sum() == min(16, (f[:, latent] > 0).sum())
        sample_rows = result["sample_rows"][latent][kept]
        assert len(set(sample_rows.tolist())) == len(sample_rows)  # without replacement
        np.testing.assert_allclose(
            result["sample_vals"][latent][kept], f[sample_rows, latent], rtol=1e-5
        )
        quantiles = quantile_examples(result, latent)
        assert [v for v, _ in quantiles] == sorted(v for v, _ in quantiles)


def test_features_command_rejects_a_latent_out_of_range(tmp_path, capsys):
    from saejax.cli import main

    spec = S.SAESpec("relu", 4, 8)
    params = {
        "W_enc": np.ones((4, 8), np.float32),
        "b_enc": np.zeros(8, np.float32),
        "W_dec": np.ones((8, 4), np.float32) / 2,
        "b_dec": np.zeros(4, np.float32),
    }
    cfg = load_config(None, ["data.path=x", "sae.architecture=relu", "sae.d_sae=8"], check=False)
    save_sae(str(tmp_path / "run" / "sae"), params, spec, 1.0, cfg, {}, "h")
    assert main(["features", str(tmp_path / "run"), "--show", "8"]) == 2
    err = capsys.readouterr().err
    assert "latent 8 is out of range" in err and len(err.strip().splitlines()) == 1
