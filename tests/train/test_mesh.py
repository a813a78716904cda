"""Sharded training on 8 fake CPU devices gives what one device gives."""

import os

import numpy as np
import pytest
from helpers import run_on_fake_devices, superposition_data

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def run_meshes(tmp_path, arch, *runs, raw=False):
    data = tmp_path / "acts.npy"
    if not data.exists():
        rows, _ = superposition_data(16384, d=32, m=128, p=0.03)
        np.save(data, rows)
    result = run_on_fake_devices(
        [os.path.join(SCRIPTS, "mesh_runs.py"), str(data), str(tmp_path), arch, *runs]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if raw:
        return result.stdout
    return {r.split(":")[0]: dict(np.load(tmp_path / f"{r.split(':')[0]}.npz")) for r in runs}


def assert_same_run(got, ref, what, last_windows=None, atol=2e-5):
    n = last_windows or len(ref["loss"])
    np.testing.assert_allclose(
        got["loss"][-n:], ref["loss"][-n:], rtol=2e-4, err_msg=f"{what}: losses"
    )
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            got[name], ref[name], rtol=2e-3, atol=atol, err_msg=f"{what}: {name}"
        )


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_meshes_match_one_device(tmp_path, arch):
    meshes = {"m1x1": "1,1", "m8x1": "8,1", "m4x2": "4,2", "m2x4": "2,4", "m1x8": "1,8"}
    out = run_meshes(tmp_path, arch, *(f"{name}:{mesh}" for name, mesh in meshes.items()))
    ref = out["m1x1"]
    if arch == "relu":
        assert ref["resampled"].sum() > 0  # the comparison spans a resampling event
    for name, mesh in meshes.items():
        data_n, model_n = map(int, mesh.split(","))
        assert int(out[name]["shards"]) == data_n * model_n
        # BatchTopK's single cutoff over the whole batch turns summation-order differences
        # into an occasional different choice near the cutoff: the losses stay equal, the
        # weights within 1e-2
        assert_same_run(
            out[name], ref, f"{arch} on mesh {mesh}", atol=1e-2 if arch == "batchtopk" else 2e-5
        )


def test_checkpoint_moves_between_meshes(tmp_path):
    """Written on (4, 2), restored on (2, 4) and on 1 device: the same run as never stopped."""
    out = run_meshes(
        tmp_path, "relu", "full:1,1", "a:4,2:20", "a:2,4:resume", "b:4,2:20", "b:1,1:resume"
    )
    # the stopped runs log one extra window at the stop (step 20); the windows after it align
    assert_same_run(out["a"], out["full"], "(4,2) -> (2,4)", last_windows=5)
    assert_same_run(out["b"], out["full"], "(4,2) -> 1 device", last_windows=5)
    assert out["full"]["resampled"].sum() > 0 and out["a"]["resampled"][-5:].sum() > 0


def test_dry_run_matches_measured_parameter_bytes(tmp_path):
    import json

    report = json.loads(run_meshes(tmp_path, "bytes", "8,1", "4,2", "2,4", "1,8", raw=True))
    for mesh, r in report.items():
        measured, estimated = r["parameters"]
        assert measured == estimated, (mesh, measured, estimated)
        measured, estimated = r["optimizer"]  # Adam's moments, plus its step count
        assert 0 <= measured - estimated <= 64, (mesh, measured, estimated)
    assert report["1,8"]["parameters"][0] < report["8,1"]["parameters"][0] / 4
