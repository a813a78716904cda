"""`saejax sweep`: members trained in lockstep end where separate runs end."""

import json

import numpy as np

from helpers import superposition_data
from saejax.cli import main
from saejax.config import load_config
from saejax.train import train

SETS = ["train.tokens=16384", "train.batch_size=256", "sae.k=4", "data.validation_tokens=2048",
        "train.log_every=16", "train.checkpoint_every=32", "log.progress=false",
        "data.block_rows=1024", "data.shuffle_blocks=4"]


def test_lockstep_members_equal_separate_runs(tmp_path):
    rows, _ = superposition_data(16384, d=32, m=128, p=0.03)
    data = tmp_path / "acts.npy"
    np.save(data, rows)
    sets = [f"data.path={data}", *SETS]
    args = ["sweep", *sum((["--set", s] for s in sets), []), "--d-sae", "64,128", "--out",
            str(tmp_path / "sweep"), "--quiet"]
    assert main(args) == 0
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["members"]
    assert [m["d_sae"] for m in table] == [64, 128]
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n") == 4

    separate = train(load_config(None, [*sets, "sae.d_sae=128", f"run_dir={tmp_path / 'alone'}"]))
    from safetensors.numpy import load_file
    lockstep = load_file(str(tmp_path / "sweep" / "d128" / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(lockstep[name], np.asarray(separate.state.params[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert table[1]["fvu"] == separate.final_metrics["fvu"]
