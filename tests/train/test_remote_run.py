"""Run directories on object storage, end to end against local servers the test starts (a GCS
emulator and moto's S3 server): training into gs:// ends with the parameters local training
gives, resumes after kill -9 on a machine without the local copy, works on s3:// too, and a
bucket that cannot be written is one line before any training."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore as ts
from helpers import (
    REPO_ROOT,
    copy_to_bucket,
    free_port,
    make_store,
    object_storage,
    small_config,
    superposition_data,
)

from saejax.cli import main
from saejax.config import dump_yaml
from saejax.errors import SaejaxError
from saejax.store import kvstore_spec
from saejax.train.remote_run import LOCK_KEY, RemoteLock, fetch_sae, staging_dir
from saejax.train.run import load_run_config, train
from saejax.train.sae_files import load_sae

SHORT = ("train.tokens=4096", "data.validation_tokens=512", "sae.d_sae=32")


@pytest.fixture(scope="module")
def buckets():
    with object_storage("gbkt", "sbkt") as env:
        yield env


@pytest.fixture(scope="module")
def stores(buckets, tmp_path_factory):
    """The same rows as a local store and as a store in the GCS bucket."""
    rows, _ = superposition_data(6144, d=16, m=64, p=0.05, seed=5)
    local = str(tmp_path_factory.mktemp("remote_run") / "store")
    make_store(local, rows, context=64)
    return {"local": local, "gs": copy_to_bucket(local, "gs://gbkt/store")}


@pytest.fixture(scope="module")
def local_sae(stores, tmp_path_factory):
    """The SAE the short run trains with its run directory on local disk."""
    run = str(tmp_path_factory.mktemp("remote_run") / "local")
    train(small_config(stores["local"], run, *SHORT))
    return load_sae(run).params


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test's staging copies in its own folder (as on a fresh machine)."""
    monkeypatch.setenv("SAEJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def keys(url: str) -> list[str]:
    kv = ts.KvStore.open(kvstore_spec(url)).result()
    return sorted(k.decode() for k in kv.list().result())


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_training_from_gs_into_gs_equals_local_training(stores, local_sae, tmp_path):
    result = train(small_config(stores["gs"], "gs://gbkt/runs/a", *SHORT))
    assert result.run_dir == "gs://gbkt/runs/a"
    # read back from the bucket, not from the working copy
    shutil.rmtree(staging_dir("gs://gbkt/runs/a"))
    fetched = fetch_sae("gs://gbkt/runs/a", str(tmp_path / "fetched"))
    assert_same_params(local_sae, load_sae(fetched).params)
    names = keys("gs://gbkt/runs/a")
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "sae.manifest.json"):
        assert name in names
    assert "checkpoints/16.manifest.json" in names
    assert ".saejax-lock" not in names, "the lock is released"


def test_a_fresh_run_into_a_url_that_holds_one_is_refused(stores, capsys):
    url = "gs://gbkt/runs/held"
    train(small_config(stores["local"], url, "train.tokens=512", "data.validation_tokens=512"))
    before = keys(url)
    assert main(["train", "--set", f"data.path={stores['local']}", "--set", f"run_dir={url}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0], err
    assert keys(url) == before


def test_kill_9_then_resume_without_the_local_copy(stores, tmp_path, cache):
    url = "gs://gbkt/runs/killed"
    rows, _ = superposition_data(8192, d=16, m=64, p=0.05, seed=6)
    np.save(tmp_path / "rows.npy", rows)
    long_run = ("train.tokens=25600000", "train.checkpoint_every=8", "data.validation_tokens=512")
    cfg = small_config(str(tmp_path / "rows.npy"), url, *long_run)
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "saejax", "train", str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(k.endswith(".manifest.json") for k in keys(url)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(staging_dir(url))  # a fresh machine: only the bucket is left
    done = [int(k.split("/")[1].split(".")[0]) for k in keys(url) if k.endswith("manifest.json")]
    kv = ts.KvStore.open(kvstore_spec(url)).result()
    kv.write("checkpoints/99999/state/half-uploaded", b"x").result()  # no manifest: ignored

    step = max(done)
    resumed = train(load_run_config(url), resume=True, max_steps=8)
    assert "checkpoints/99999/state/half-uploaded" not in keys(url), "cleaned"
    assert f"checkpoints/{step + 8}.manifest.json" in keys(url)
    whole = train(
        small_config(str(tmp_path / "rows.npy"), str(tmp_path / "whole"), *long_run),
        max_steps=step + 8,
    )
    assert int(resumed.state.step) == int(whole.state.step) == step + 8
    assert_same_params(
        jax.tree_util.tree_map(np.asarray, whole.state.params),
        jax.tree_util.tree_map(np.asarray, resumed.state.params),
    )


def test_an_s3_run_directory_trains_and_keeps_its_sae(stores, local_sae, tmp_path):
    train(small_config(stores["local"], "s3://sbkt/runs/b", *SHORT))
    fetched = fetch_sae("s3://sbkt/runs/b", str(tmp_path / "fetched"))
    assert_same_params(local_sae, load_sae(fetched).params)
    assert {"config.yaml", "eval.json", "sae.manifest.json"} <= set(keys("s3://sbkt/runs/b"))


@pytest.mark.parametrize(
    "run_dir, phrase",
    [
        ("gs://no-such-bucket/run", "the bucket does not exist"),
        ("s3://no-such-bucket/run", "the bucket does not exist"),
        ("gs://gbkt/run@unreachable", "cannot be reached"),
    ],
)
def test_a_run_directory_that_cannot_be_written_is_one_line_before_training(
    stores, capsys, monkeypatch, cache, run_dir, phrase
):
    if run_dir.endswith("@unreachable"):
        run_dir = run_dir.removesuffix("@unreachable")
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("SAEJAX_REMOTE_RETRIES", "1")
    argv = ["train", "--set", f"data.path={stores['local']}", "--set", f"run_dir={run_dir}"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0] and run_dir in lines[0], lines
    assert not cache.exists(), "nothing staged, nothing trained"


@pytest.mark.parametrize("url", ["gs://gbkt/runs/locked", "s3://sbkt/runs/locked"])
def test_a_held_lock_refuses_a_second_starter(buckets, url):
    kv = ts.KvStore.open(kvstore_spec(url)).result()
    held = RemoteLock(kv, url).acquire()
    with pytest.raises(SaejaxError, match="in use by another saejax process"):
        RemoteLock(kv, url).acquire()  # its holder (this process) is alive
    held.release()
    assert LOCK_KEY.encode() not in kv.list().result()
    RemoteLock(kv, url).acquire().release()


def test_conditional_writes_keep_the_lock_exclusive(buckets):
    """On S3 (moto honours preconditions; fake-gcs-server ignores them, real GCS does not)."""
    url = "s3://sbkt/runs/raced"
    kv = ts.KvStore.open(kvstore_spec(url)).result()
    before = kv.read(LOCK_KEY).result()
    held = RemoteLock(kv, url).acquire()
    # a starter that read "no lock" before `held` was written loses its conditional write
    assert not kv.write(LOCK_KEY, b"{}", if_equal=before.stamp.generation).result().generation
    # a lock someone else took over is not removed by the old holder's release
    kv.write(LOCK_KEY, b'{"host": "elsewhere", "pid": 1}').result()
    held.release()
    assert kv.read(LOCK_KEY).result().value == b'{"host": "elsewhere", "pid": 1}'
    kv.write(LOCK_KEY, None).result()


def test_a_sweep_into_a_bucket_is_still_refused_in_one_line(stores, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--set", f"data.path={stores['local']}", "--d-sae", "32"]
    assert main([*argv, "--out", "gs://gbkt/sweep"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "object-storage URL" in err[0], err
    assert not os.path.exists(tmp_path / "gs:"), "no local folder named after the URL"


def test_an_upload_that_fails_mid_run_is_one_line_when_the_run_ends(stores, monkeypatch, capsys):
    from saejax.train import remote_run

    def lost_bucket(self, uploads):
        raise ValueError('NOT_FOUND: Error writing "x": HTTP response code: 404')

    monkeypatch.setattr(remote_run.Mirror, "_put", lost_bucket)
    url = "gs://gbkt/runs/lost"
    argv = ["train", "--set", f"data.path={stores['local']}", "--set", f"run_dir={url}"]
    assert main(argv + [f"--set={o}" for o in (*SHORT, "log.progress=false")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and "bucket does not exist" in err[0], err
    assert LOCK_KEY not in keys(url), "the lock is released"
