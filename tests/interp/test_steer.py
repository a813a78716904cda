"""Steering: boosting a latent moves the next token toward what its direction promotes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.hooks import parse_hooks  # noqa: E402
from extract.models import load_model  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.interp.steer import generate, intervention  # noqa: E402
from saejax.train.sae_files import load_sae, save_sae  # noqa: E402

HOOK = "blocks.3.hook_resid_post"  # the last block: its direction reaches the unembedding


@pytest.fixture(scope="module")
def steering_setup(trained_gpt2, tmp_path_factory):
    loaded = load_model(trained_gpt2)
    d = loaded.model.config.n_embd
    eye = np.eye(d, dtype=np.float32)
    spec = S.SAESpec("relu", d, 2 * d)
    cfg = load_config(
        None, ["data.path=unused", "sae.architecture=relu", f"sae.d_sae={2 * d}"], check=False
    )
    params = {
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    run = tmp_path_factory.mktemp("steer") / "run"
    save_sae(
        str(run / "sae"),
        params,
        spec,
        1.0,
        cfg,
        {"model": trained_gpt2, "extract_config": {"model": trained_gpt2}},
        HOOK,
    )
    return loaded, load_sae(str(run)), str(run)


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
