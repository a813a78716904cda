"""`saejax sweep`: members trained in lockstep end where separate runs end."""

import json

import numpy as np
import pytest
from helpers import superposition_data

from saejax.cli import main
from saejax.config import load_config
from saejax.train.run import train

SETS = [
    "train.tokens=16384",
    "train.batch_size=256",
    "sae.k=4",
    "data.validation_tokens=2048",
    "train.log_every=16",
    "train.checkpoint_every=32",
    "log.progress=false",
    "data.block_rows=1024",
    "data.shuffle_blocks=4",
]


def test_lockstep_members_equal_separate_runs(tmp_path):
    rows, _ = superposition_data(16384, d=32, m=128, p=0.03)
    data = tmp_path / "acts.npy"
    np.save(data, rows)
    sets = [f"data.path={data}", *SETS]
    args = [
        "sweep",
        *sum((["--set", s] for s in sets), []),
        "--d-sae",
        "64,128",
        "--out",
        str(tmp_path / "sweep"),
        "--quiet",
    ]
    assert main(args) == 0
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["members"]
    assert [m["d_sae"] for m in table] == [64, 128]
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert md.count("| 128 | 4 |") == 1 and "trained in lockstep in" in md
    import csv

    with open(tmp_path / "sweep" / "sweep.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["d_sae"]) for r in csv_rows] == [64, 128]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["sweep_wall_s"]) > 0 for r in csv_rows)
    assert float(csv_rows[1]["fvu"]) == table[1]["fvu"]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000

    separate = train(load_config(None, [*sets, "sae.d_sae=128", f"run_dir={tmp_path / 'alone'}"]))
    from safetensors.numpy import load_file

    lockstep = load_file(str(tmp_path / "sweep" / "d128" / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            lockstep[name],
            np.asarray(separate.state.params[name]),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    assert table[1]["fvu"] == separate.final_metrics["fvu"]


def test_stopped_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    from saejax.train.sweep import members_of, run_sweep

    rows, _ = superposition_data(16384, d=32, m=128, p=0.03, seed=5)
    data = tmp_path / "acts.npy"
    np.save(data, rows)
    sets = [f"data.path={data}", *SETS]
    grid = members_of("topk", [64, 128], [], [])
    base = load_config(None, sets)
    untimed = {"progress": False, "time_alone": False}  # no member's step compiled twice
    run_sweep(base, grid, str(tmp_path / "stopped"), max_steps=21, **untimed)
    for name in ("d64", "d128"):  # both members checkpointed where the sweep stopped
        assert (tmp_path / "stopped" / name / "checkpoints" / "21").is_dir()
    resumed = run_sweep(base, grid, str(tmp_path / "stopped"), **untimed)
    whole = run_sweep(base, grid, str(tmp_path / "whole"), **untimed)
    from safetensors.numpy import load_file

    for name in ("d64", "d128"):
        a = load_file(str(tmp_path / "stopped" / name / "sae" / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "whole" / name / "sae" / "sae_weights.safetensors"))
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(
                a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}"
            )
    assert [r["fvu"] for r in resumed] == [r["fvu"] for r in whole]


def test_the_grid_crosses_sizes_with_k_or_l1_and_learning_rates():
    from saejax.errors import SaejaxError
    from saejax.train.sweep import members_of

    grid = members_of("topk", [64, 128], [4], [], [1e-3, 3e-3])
    assert [name for name, _ in grid] == [
        "d64_k4_lr0.001",
        "d64_k4_lr0.003",
        "d128_k4_lr0.001",
        "d128_k4_lr0.003",
    ]
    assert grid[1][1] == {"sae.d_sae": 64, "sae.k": 4, "train.lr": 3e-3}
    for bad, message in (
        (lambda: members_of("topk", [64], [], [2.0]), "--l1 applies to relu"),
        (lambda: members_of("relu", [64], [4], []), "--k applies to topk"),
        (lambda: members_of("topk", [128, 128], [], []), "lists a member twice"),
    ):
        with pytest.raises(SaejaxError, match=message):
            bad()
