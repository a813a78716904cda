"""RUN/features/ caches a scan for exactly the parameters, SAE and store it was made with,
and is written as one unit: a smaller or different scan is never reused, a half-written
cache never read."""

import os
import shutil

import numpy as np
import pytest
from helpers import make_store, superposition_data

from saejax.cli import main
from saejax.interp import features as F


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_cache")
    rows, _ = superposition_data(4096, d=16, m=32, p=0.1)
    make_store(str(root / "store"), rows)
    argv = [
        "train",
        f"--set=data.path={root / 'store'}",
        f"--set=run_dir={root / 'run'}",
        "--set=sae.d_sae=32",
        "--set=sae.k=4",
        "--set=train.tokens=2048",
        "--set=train.batch_size=256",
        "--set=data.validation_tokens=512",
        "--set=data.block_rows=512",
        "--set=log.progress=false",
    ]
    assert main(argv) == 0
    return str(root / "run")


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return str(tmp_path / "run")


def test_max_rows_below_one_is_refused_and_writes_nothing(run, capsys):
    assert main(["features", run, "--max-rows", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-rows must be at least 1" in err[0]
    assert not os.path.exists(os.path.join(run, "features"))


def test_a_partial_scan_is_not_reused_for_a_full_one(run):
    result, store, scanned = F.latent_examples(run, max_rows=100)
    assert scanned and int(result["n_rows"]) == 100
    result, _, scanned = F.latent_examples(run)
    assert scanned and int(result["n_rows"]) == len(store)
    again, _, scanned = F.latent_examples(run)
    assert not scanned  # same parameters: reused
    np.testing.assert_array_equal(again["top_rows"], result["top_rows"])


def test_changed_top_or_samples_scan_again(run):
    F.latent_examples(run, top=20, samples=64)
    result, _, scanned = F.latent_examples(run, top=5, samples=64)
    assert scanned and result["top_vals"].shape[1] == 5
    result, _, scanned = F.latent_examples(run, top=5, samples=8)
    assert scanned and result["sample_vals"].shape[1] == 8
    _, _, scanned = F.latent_examples(run, top=5, samples=8)
    assert not scanned


def test_a_changed_sae_scans_again(run):
    F.latent_examples(run)
    weights = os.path.join(run, "sae", "sae_weights.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a retrained SAE
    _, _, scanned = F.latent_examples(run)
    assert scanned


def test_half_written_cache_is_never_read(run):
    """An older saejax wrote examples.npz, then summary.json: a kill in between left only
    the first. Such a folder (no key) is not a cache."""
    result, store, _ = F.latent_examples(run)
    os.remove(os.path.join(run, "features", "summary.json"))
    key = F.examples_key(run, store, "h", 20, 64, len(store))
    assert F.read_examples_cache(run, key) is None
    _, _, scanned = F.latent_examples(run)
    assert scanned


def test_a_failed_write_leaves_no_cache(run, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill between examples.npz and summary.json

    monkeypatch.setattr(F, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        F.latent_examples(run)
    assert not os.path.exists(os.path.join(run, "features"))
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
