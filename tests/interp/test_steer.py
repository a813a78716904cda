"""Steering: boosting a latent moves the next token toward what its direction promotes; a
transcoder is steered at the hook it writes to, its latent read from its input hook."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.hooks import parse_hooks  # noqa: E402
from extract.models import load_model  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.interp.steer import generate, intervention, transcoder_intervention  # noqa: E402
from saejax.train.sae_files import load_sae, save_sae  # noqa: E402

HOOK = "blocks.3.hook_resid_post"  # the last block: its direction reaches the unembedding
MLP_IN, MLP_OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"


def save_identity_sae(folder, model, d, hook, target_hook=None):
    """Latent i reads +x_i (i < d) or −x_i and writes ±e_i: an SAE, or a transcoder from
    `hook` to `target_hook`."""
    eye = np.eye(d, dtype=np.float32)
    spec = S.SAESpec("relu", d, 2 * d, transcoder=target_hook is not None)
    sets = ["data.path=unused", "sae.architecture=relu", f"sae.d_sae={2 * d}"]
    cfg = load_config(None, sets + ([f"data.target_hook={target_hook}"] if target_hook else []))
    params = {
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    run = folder / "run"
    scale = (1.0, 1.0) if target_hook else 1.0
    meta = {"model": model, "extract_config": {"model": model}}
    save_sae(str(run / "sae"), params, spec, scale, cfg, meta, hook)
    return str(run)


@pytest.fixture(scope="module")
def steering_setup(trained_gpt2, tmp_path_factory):
    loaded = load_model(trained_gpt2)
    d = loaded.model.config.n_embd
    run = save_identity_sae(tmp_path_factory.mktemp("steer"), trained_gpt2, d, HOOK)
    return loaded, load_sae(run), run


@pytest.fixture(scope="module")
def transcoder_setup(trained_gpt2, tmp_path_factory):
    loaded = load_model(trained_gpt2)
    d = loaded.model.config.n_embd
    folder = tmp_path_factory.mktemp("steer_tc")
    run = save_identity_sae(folder, trained_gpt2, d, MLP_IN, MLP_OUT)
    return loaded, load_sae(run), run


def promoted_tokens(loaded, direction, n=10):
    """Tokens whose logits rise most along `direction` through ln_f and the unembedding."""
    m = loaded.model
    ln_w = m.transformer.ln_f.weight.detach().numpy()
    centred = direction - direction.mean()
    logit_change = m.lm_head.weight.detach().numpy() @ (ln_w * centred)
    return np.argsort(-logit_change)[:n]


def test_boost_moves_the_next_token_toward_promoted_tokens(steering_setup):
    loaded, sae, _ = steering_setup
    point = parse_hooks(HOOK)[0]
    for latent in (3, 17):
        promoted = promoted_tokens(loaded, np.asarray(sae.params["W_dec"][latent]))
        _, plain = generate(loaded, "The quick brown fox", 1)
        _, steered = generate(
            loaded,
            "The quick brown fox",
            1,
            point,
            intervention(sae, latent, boost=200.0, clamp=None),
        )
        # mean log-probability of the promoted tokens: up by a lot, and top-1 among them
        assert steered[0][promoted].mean() > plain[0][promoted].mean() + 1.0, latent
        assert int(np.argmax(steered[0])) in set(promoted.tolist()), latent


def test_clamp_sets_the_latent(steering_setup):
    loaded, sae, _ = steering_setup
    fn = intervention(sae, 5, boost=None, clamp=7.0)
    x = torch.randn(2, 3, sae.spec.d_in)
    x[..., 5] = x[..., 5].abs()  # so latent d+5 (the opposite direction) is off: f_5 = x_5
    out = fn(x).numpy().reshape(-1, sae.spec.d_in)
    assert np.allclose(np.asarray(sae.encode(out))[:, 5], 7.0, atol=1e-4)
    others = [i for i in range(sae.spec.d_in) if i != 5]
    assert np.allclose(out[:, others], x.numpy().reshape(-1, sae.spec.d_in)[:, others])


def test_steer_command_and_bad_latent(steering_setup, capsys):
    _, _, run = steering_setup
    assert (
        main(
            [
                "steer",
                run,
                "--latent",
                "3",
                "--boost",
                "40",
                "--prompt",
                "The quick",
                "--tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "unsteered" in out and "latent 3 boost +40" in out
    assert main(["steer", run, "--latent", "9999", "--boost", "1", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "latent 9999 is out of range" in err and len(err.strip().splitlines()) == 1


def test_a_transcoder_is_steered_where_it_writes(transcoder_setup, capsys):
    """Boosting latent i adds along e_i to the last MLP's output (which reaches the unembedding
    as the residual does); the command runs on the transcoder's run folder."""
    loaded, sae, run = transcoder_setup
    assert sae.info["target_hook"] == MLP_OUT
    out_point, in_point = parse_hooks(MLP_OUT)[0], parse_hooks(MLP_IN)[0]
    fn = transcoder_intervention(sae, 3, boost=200.0, clamp=None)
    promoted = promoted_tokens(loaded, np.asarray(sae.params["W_dec"][3]))
    _, plain = generate(loaded, "The quick brown fox", 1)
    _, steered = generate(loaded, "The quick brown fox", 1, out_point, fn, source=in_point)
    assert steered[0][promoted].mean() > plain[0][promoted].mean() + 1.0
    assert (
        main(["steer", run, "--latent", "3", "--boost", "40", "--prompt", "A", "--tokens", "3"])
        == 0
    )
    assert "latent 3 boost +40" in capsys.readouterr().out


def test_a_transcoder_clamp_reads_the_latent_from_its_input(transcoder_setup):
    """Clamping latent 5 to 7: f_5 is read from the input hook's x (here |x_5|, its sign made
    positive), and the output hook's t moves by (7 − f_5)·e_5 only."""
    _, sae, _ = transcoder_setup
    d = sae.spec.d_in
    fn = transcoder_intervention(sae, 5, boost=None, clamp=7.0)
    x, t = torch.randn(2, 3, d), torch.randn(2, 3, d)
    x[..., 5] = x[..., 5].abs()
    moved = (fn(x, t) - t).numpy().reshape(-1, d)
    np.testing.assert_allclose(moved[:, 5], 7.0 - x[..., 5].numpy().reshape(-1), atol=1e-5)
    assert np.allclose(np.delete(moved, 5, axis=1), 0.0)
