"""The sparsify export's cfg.json says what is true of the exported weights."""

import json

import numpy as np
import pytest

from saejax.config import load_config
from saejax.core import sae as S
from saejax.train.export import export_sparsify
from saejax.train.sae_files import save_sae


def topk_sae(tmp_path, decoder_norms):
    d_in, d_sae = 4, len(decoder_norms)
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    w_dec *= (np.asarray(decoder_norms) / np.linalg.norm(w_dec, axis=1))[:, None]
    params = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
        "W_dec": w_dec.astype(np.float32),
        "b_dec": np.zeros(d_in, np.float32),
    }
    cfg = load_config(None, ["data.path=x.npy", "sae.architecture=topk"], check=False)
    path = str(tmp_path / "sae")
    save_sae(path, params, S.SAESpec("topk", d_in, d_sae, 2), 1.0, cfg, {}, "h")
    return path


@pytest.mark.parametrize("norms, unit", [([2.0] * 8, True), ([1.0, 2.0] * 4, False)])
def test_normalize_decoder_is_true_only_for_unit_norm_rows(tmp_path, norms, unit):
    export_sparsify(topk_sae(tmp_path, norms), str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["normalize_decoder"] is unit
