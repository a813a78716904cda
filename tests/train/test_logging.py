"""The metrics reach TensorBoard and wandb under namespaced tags, readable by their own tools.

The tests drive MetricsLogger directly (no training): three fetches, then the final
evaluation, as the training loop would.
"""

import glob
import json
import os
import time

import numpy as np
import pytest

from saejax.config import load_config
from saejax.errors import SaejaxError
from saejax.train.metrics import WANDB_ID_FILE, MetricsLogger
from saejax.train.step import DENSITY_EDGES

FINAL = {
    "tokens": 512,
    "mse": 0.01,
    "fvu": 0.125,
    "l0": 30.5,
    "dead_fraction": 0.0,
    "dense_fraction": 0.25,
    "density_hist": [0] * 10 + [1, 2, 4, 8, 1, 0],
    "tokens_per_s": 12345.0,
    "steps": 30,
}


def fetched(step: int) -> dict:
    """What `summarize` hands the logger every train.log_every steps."""
    return {
        "loss": np.float32(1.0 / step),
        "mse": np.float32(0.5 / step),
        "fvu": np.float32(0.25 + 1.0 / step),
        "l0": np.float32(32.0),
        "aux_loss": np.float32(0.01),
        "sparsity_loss": np.float32(0.0),
        "grad_norm": np.float32(2.0 + step),
        "density_hist": np.arange(len(DENSITY_EDGES) - 1, dtype=np.int32) + step,
        "never_fired_in_window": np.int32(3),
        "dead_fraction": np.float32(step / 100),
        "resampled": np.int32(0),
        "resampled_total": np.int32(0),
        "step": np.int32(step),
    }


def config(tmp_path, *sets):
    return load_config(
        None, ["data.path=acts.npy", f"run_dir={tmp_path}", "log.progress=false", *sets]
    )


def test_tensorboard_holds_what_metrics_jsonl_holds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(config(tmp_path, "log.tensorboard=true"), 30, 0, d_in=16)
    for step in (10, 20, 30):
        logger.log(step, fetched(step))
    logger.log_final(FINAL)
    logger.close()

    events = EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    events.Reload()
    found = events.Tags()
    assert {"train/loss", "train/fvu", "train/l0", "train/dead_fraction"} <= set(found["scalars"])
    assert "perf/tokens_per_s" in found["scalars"]
    assert not [t for t in found["scalars"] if t.split("/")[1] in ("step", "tokens")]
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [10, 20, 30]
    for name in ("loss", "fvu", "l0", "dead_fraction", "grad_norm", "resampled"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(ln["step"], pytest.approx(ln[name], rel=1e-6)) for ln in lines]
    speed = [(e.step, e.value) for e in events.Scalars("perf/tokens_per_s")]
    assert speed == [(ln["step"], pytest.approx(ln["tokens_per_s"], rel=1e-6)) for ln in lines]

    histograms = events.Histograms("train/feature_density")
    assert [h.step for h in histograms] == [10, 20, 30]
    assert list(histograms[-1].histogram_value.bucket) == lines[-1]["density_hist"]
    assert list(histograms[-1].histogram_value.bucket_limit) == pytest.approx(DENSITY_EDGES[1:])

    assert [(e.step, e.value) for e in events.Scalars("val/fvu")] == [(30, 0.125)]
    assert events.Scalars("perf/run_tokens_per_s")[0].value == pytest.approx(12345.0)
    assert "val/tokens" not in found["scalars"] and "val/steps" not in found["scalars"]
    assert "val/feature_density" in found["histograms"]
    (text,) = events.Tensors("config/text_summary")
    assert "d_in: 16" in text.tensor_proto.string_val[0].decode()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_keeps_one_run_across_a_resume(tmp_path, wandb_offline):
    run = tmp_path / "run"
    run.mkdir()
    cfg = config(run, "log.wandb=true", "log.wandb_project=saejax-test")

    first = MetricsLogger(cfg, 30, 0, d_in=16)
    first.log(10, fetched(10))
    first.log(20, fetched(20))
    run_id = first.wandb.id
    first.close()
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id

    resumed = MetricsLogger(cfg, 30, 20, d_in=16)  # a resume from the checkpoint at step 20
    assert resumed.wandb.id == run_id
    assert resumed.wandb.config["sae"]["d_in"] == 16  # resolved from the data, not 0
    resumed.log(30, fetched(30))
    resumed.log_final(FINAL)
    assert resumed.wandb.summary["val/fvu"] == 0.125
    resumed.close()

    sessions = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(sessions) == 2 and all(s.endswith(f"-{run_id}") for s in sessions)
    logged = b""  # wandb's own record of the session, as `wandb sync` will send it
    for _ in range(100):  # its writer may still be flushing after finish() returned
        with open(glob.glob(os.path.join(sessions[1], "*.wandb"))[0], "rb") as f:
            logged = f.read()
        if b"val/fvu" in logged:
            break
        time.sleep(0.1)
    assert b"val/fvu" in logged and b"train/loss" in logged and b"d_in" in logged


def test_wandb_without_credentials_says_how_before_writing(tmp_path, monkeypatch, wandb_offline):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SaejaxError, match="wandb login.*WANDB_MODE=offline"):
        MetricsLogger(config(run, "log.wandb=true"), 30, 0)
    assert os.listdir(run) == []


def test_a_resumed_run_replaces_what_tensorboard_got_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "log.tensorboard=true")
    first = MetricsLogger(cfg, 40, 0)
    for step in (10, 20, 30):  # then killed: the last checkpoint was at step 20
        first.log(step, fetched(step))
    first.close()
    resumed = MetricsLogger(cfg, 40, 20)
    for step in (30, 40):
        resumed.log(step, fetched(step) | {"loss": np.float32(-step)})
    resumed.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, -30), (40, -40)]
