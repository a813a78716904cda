"""`saejax eval`: the SAE spliced into the model at its hook, on held-out sequences."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402
from saejax.train.sae_files import save_sae  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def gpt2_store(trained_gpt2, corpus_file, tmp_path_factory):
    model_dir = trained_gpt2
    out = tmp_path_factory.mktemp("lm_eval") / "store"
    run_extract(
        ExtractConfig(
            out=str(out),
            model=model_dir,
            corpus=corpus_file,
            hooks=[HOOK],
            tokens=3000,
            context=32,
            batch_size=4,
            dtype="float32",
        ),
        progress=False,
    )
    return str(out)


def write_sae(run_dir, store_path, W_enc, W_dec):
    d_in, d_sae = W_enc.shape
    spec = S.SAESpec("relu", d_in, d_sae)
    cfg = load_config(
        None,
        [f"data.path={store_path}", "sae.architecture=relu", f"sae.d_sae={d_sae}"],
        check=False,
    )
    params = {
        "W_enc": W_enc,
        "b_enc": np.zeros(d_sae, np.float32),
        "W_dec": W_dec,
        "b_dec": np.zeros(d_in, np.float32),
    }
    store = ActivationStore.open(store_path)
    save_sae(str(run_dir / "sae"), params, spec, 1.0, cfg, store.meta, HOOK)
    return str(run_dir)


def evaluate(capsys, run, store):
    assert (
        main(["eval", run, "--store", store, "--sequences", "8", "--batch-size", "4", "--json"])
        == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perfect_reconstruction_recovers_all_of_the_loss(capsys, gpt2_store, tmp_path):
    d = ActivationStore.open(gpt2_store).d_in
    eye = np.eye(d, dtype=np.float32)
    # relu(x) - relu(-x) = x: an SAE that reconstructs exactly
    run = write_sae(
        tmp_path / "perfect",
        gpt2_store,
        np.concatenate([eye, -eye], 1),
        np.concatenate([eye, -eye], 0),
    )
    out = evaluate(capsys, run, gpt2_store)
    lm = out["lm"]
    assert lm["ce_zero"] > lm["ce_clean"] + 0.01  # ablating the residual stream hurts
    assert lm["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert lm["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert lm["sequences"] == 8 and lm["bos_left_clean"]
    assert out["sae"]["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "perfect" / "eval_lm.json").exists()


def test_zero_reconstruction_recovers_nothing_and_noise_is_in_between(capsys, gpt2_store, tmp_path):
    d = ActivationStore.open(gpt2_store).d_in
    eye = np.eye(d, dtype=np.float32)
    zero = write_sae(
        tmp_path / "zero",
        gpt2_store,
        np.concatenate([eye, -eye], 1),
        np.zeros((2 * d, d), np.float32),
    )
    lm = evaluate(capsys, zero, gpt2_store)["lm"]
    assert lm["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert lm["kl_spliced"] == pytest.approx(lm["kl_zero"], rel=1e-4)

    rng = np.random.default_rng(0)
    noisy_dec = np.concatenate([eye, -eye], 0) + rng.normal(0, 0.3, (2 * d, d)).astype(np.float32)
    noisy = write_sae(tmp_path / "noisy", gpt2_store, np.concatenate([eye, -eye], 1), noisy_dec)
    lm = evaluate(capsys, noisy, gpt2_store)["lm"]
    assert 0.0 < lm["ce_loss_recovered"] < 1.0
    assert 0.0 < lm["kl_spliced"] < lm["kl_zero"]


def test_run_without_its_store(capsys, gpt2_store, tmp_path):
    d = ActivationStore.open(gpt2_store).d_in
    eye = np.eye(d, dtype=np.float32)
    run = write_sae(
        tmp_path / "r", gpt2_store, np.concatenate([eye, -eye], 1), np.concatenate([eye, -eye], 0)
    )
    code = main(["eval", run, "--store", str(tmp_path / "gone")])
    err = capsys.readouterr().err
    assert code == 2 and "is missing" in err and len(err.strip().splitlines()) == 1
