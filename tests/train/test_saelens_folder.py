"""Loading a SAELens folder written by someone else: cfg.json + sae_weights.safetensors by hand,
with the settings saejax must honour or refuse."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from saejax.errors import SaejaxError
from saejax.train.sae_files import load_sae


def write_folder(path, **cfg_fields):
    rng = np.random.default_rng(0)
    d_in, d_sae = 6, 12
    w = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": (3.0 * rng.normal(size=d_in)).astype(np.float32),
    }
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": "h", **cfg_fields}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


def test_apply_b_dec_to_input_false_encodes_without_subtracting_b_dec(tmp_path):
    w = write_folder(tmp_path / "gemmascope_like", apply_b_dec_to_input=False)
    sae = load_sae(str(tmp_path / "gemmascope_like"))
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    expected = np.maximum(x @ w["W_enc"] + w["b_enc"], 0)
    np.testing.assert_allclose(np.asarray(sae.encode(x)), expected, rtol=1e-4, atol=1e-4)
    recon = expected @ w["W_dec"] + w["b_dec"]
    np.testing.assert_allclose(np.asarray(sae.reconstruct(x)), recon, rtol=1e-4, atol=1e-4)


def test_apply_b_dec_to_input_true_is_the_default(tmp_path):
    w = write_folder(tmp_path / "standard")
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    expected = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    got = np.asarray(load_sae(str(tmp_path / "standard")).encode(x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "field, value",
    [("normalize_activations", "expected_average_only_in"), ("reshape_activations", "hook_z")],
)
def test_settings_that_cannot_be_honoured_are_refused(tmp_path, field, value):
    write_folder(tmp_path / "f", **{field: value})
    with pytest.raises(SaejaxError, match=f"{field}={value!r} is not supported"):
        load_sae(str(tmp_path / "f"))
