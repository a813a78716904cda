"""`saejax eval`: the SAE spliced into the model at its hook, on held-out sequences."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import TRAINED_GPT2_HOOK  # noqa: E402

from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402
from saejax.train.sae_files import save_sae  # noqa: E402

HOOK = TRAINED_GPT2_HOOK


@pytest.fixture(scope="module")
def gpt2_store(trained_gpt2_store):
    return trained_gpt2_store


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
    # the splice leaves BOS (a special token) clean, as SAELens does: against the baseline
    # that zeroes the same positions a zero reconstruction recovers nothing (the headline
    # baseline zeroes BOS too, so there it differs by what the BOS row is worth)
    assert lm["ce_loss_recovered_bos_kept"] == pytest.approx(0.0, abs=1e-4)
    assert lm["kl_spliced"] == pytest.approx(lm["kl_zero_bos_kept"], rel=1e-4)
    assert lm["ce_spliced"] == pytest.approx(lm["ce_zero_bos_kept"], rel=1e-5)

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


def test_zero_ablation_baseline_zeroes_every_position(capsys, gpt2_store, trained_gpt2, tmp_path):
    """ce_zero is the CE of the model with the hook's output zeroed at every position (BOS
    included), scored on positions whose input token is not special, as SAELens does;
    checked against a plain PyTorch forward hook."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = ActivationStore.open(gpt2_store).d_in
    eye = np.eye(d, dtype=np.float32)
    run = write_sae(
        tmp_path / "z", gpt2_store, np.concatenate([eye, -eye], 1), np.concatenate([eye, -eye], 0)
    )
    out = evaluate(capsys, run, gpt2_store)
    lm = out["lm"]
    assert lm["zero_ablation"] == "every position" and len(lm["sequence_ids"]) == 8

    store = ActivationStore.open(gpt2_store)
    model = AutoModelForCausalLM.from_pretrained(trained_gpt2).eval()
    special = torch.tensor(AutoTokenizer.from_pretrained(trained_gpt2).all_special_ids)
    doc = store.doc(0, len(store))[:, 0]

    def zero_block_output(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    def mean_ce(zeroed: bool) -> float:
        total, count = 0.0, 0
        handle = model.transformer.h[1].register_forward_hook(zero_block_output) if zeroed else None
        with torch.no_grad():
            for seq in lm["sequence_ids"]:
                ids = torch.tensor(
                    store.sequence_input(seq, int(np.argmax(doc == seq))), dtype=torch.long
                )[None]
                logits = model(input_ids=ids).logits[0, :-1]
                ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                scored = ~torch.isin(ids[0, :-1], special)
                total, count = total + float(ce[scored].sum()), count + int(scored.sum())
        if handle is not None:
            handle.remove()
        return total / count

    assert lm["ce_clean"] == pytest.approx(mean_ce(zeroed=False), rel=1e-4)
    assert lm["ce_zero"] == pytest.approx(mean_ce(zeroed=True), rel=1e-4)
    assert abs(lm["ce_zero"] - lm["ce_zero_bos_kept"]) > 1e-3  # BOS was zeroed too
