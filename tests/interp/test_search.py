"""Feature search from prompts: the seed pipeline's two rankings."""

import numpy as np
import pytest

from saejax.interp.search import rank_latents


def test_a_latent_active_only_on_positive_tokens_ranks_first():
    rng = np.random.default_rng(0)
    pos = np.abs(rng.normal(0, 0.1, (40, 50)))
    neg = np.abs(rng.normal(0, 0.1, (30, 50)))
    pos[:, 7] += 3.0  # fires hard on every positive token
    neg[:, 9] += 3.0  # fires on negatives only
    pos[:, 9] += 2.0
    scores = rank_latents(pos, neg, percentile=2.0)
    assert int(np.argmax(scores["contrast"])) == 7
    assert int(np.argmax(scores["top_share"])) == 7
    assert scores["contrast"][9] < 0
    assert scores["top_share"][7] == pytest.approx(1.0)


def test_search_command_bad_inputs(tmp_path, capsys):
    from saejax.cli import main

    assert main(["search", str(tmp_path), "--positive", "  "]) == 2
    assert "non-empty --positive" in capsys.readouterr().err
