"""Stores on object storage, end to end against local servers the test starts itself: a GCS
emulator (fake-gcs-server, reached through TensorStore's TENSORSTORE_GCS_HTTP_URL) and an S3
server (moto, reached through AWS_ENDPOINT_URL_S3). Extracting into a bucket gives the same
store as a local folder; training from a bucket gives the same SAE; a missing bucket or an
unreachable endpoint is one line and exit 2 within bounded retries."""

import time

import numpy as np
import pytest
from helpers import free_port, object_storage, small_config

from extract.extractor import ExtractConfig, run_extract
from saejax.cli import main
from saejax.store import ActivationStore
from saejax.train.run import train


@pytest.fixture(scope="module")
def buckets():
    """A GCS emulator with bucket `gbkt` and an S3 server with bucket `sbkt`, and the
    environment that points TensorStore at them."""
    with object_storage("gbkt", "sbkt") as env:
        yield env


def extract_to(out, model, corpus):
    config = ExtractConfig(
        out=out,
        model=model,
        corpus=corpus,
        hooks=["blocks.3.hook_resid_post"],
        tokens=600,
        context=32,
        batch_size=4,
        dtype="float32",
        device="cpu",
    )
    run_extract(config, progress=False)


def contents(path) -> dict:
    store = ActivationStore.open(path)
    meta = {k: v for k, v in store.meta.items() if k != "created"}
    meta["extract_config"] = {k: v for k, v in meta["extract_config"].items() if k != "out"}
    return {
        "acts": store.read(0, len(store)),
        "tokens": store.tokens(),
        "doc": store.doc(),
        "meta": meta,
    }


@pytest.fixture(scope="module")
def stores(buckets, tiny_gpt2, corpus_file, tmp_path_factory):
    local = str(tmp_path_factory.mktemp("object_storage") / "store")
    paths = {"local": local, "gs": "gs://gbkt/runs/store", "s3": "s3://sbkt/runs/store"}
    for path in paths.values():
        extract_to(path, tiny_gpt2, corpus_file)
    return paths


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_a_store_extracted_into_a_bucket_equals_the_local_one(stores, scheme):
    local, remote = contents(stores["local"]), contents(stores[scheme])
    assert remote["meta"] == local["meta"]
    for name in ("acts", "tokens", "doc"):
        np.testing.assert_array_equal(remote[name], local[name])


def test_extracting_into_a_finished_bucket_store_again_does_nothing(stores, tiny_gpt2, corpus_file):
    before = contents(stores["gs"])
    extract_to(stores["gs"], tiny_gpt2, corpus_file)
    after = contents(stores["gs"])
    np.testing.assert_array_equal(after["acts"], before["acts"])
    assert after["meta"] == before["meta"]


def test_training_from_a_bucket_equals_training_from_local_disk(stores, tmp_path):
    from saejax.train.sae_files import load_sae

    params = {}
    for name in ("local", "gs"):
        run = str(tmp_path / name)
        overrides = ("train.tokens=4096", "data.validation_tokens=128", "sae.d_sae=32")
        train(small_config(stores[name], run, *overrides))
        params[name] = load_sae(run).params
    for key, value in params["local"].items():
        np.testing.assert_array_equal(np.asarray(params["gs"][key]), np.asarray(value))


def extract_argv(out, model, corpus):
    return [
        "extract",
        "--model",
        model,
        "--corpus",
        corpus,
        "--out",
        out,
        "--tokens",
        "64",
        "--context",
        "32",
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize(
    "out, phrase",
    [
        ("gs://no-such-bucket/store", "the bucket does not exist"),
        ("s3://no-such-bucket/store", "the bucket does not exist"),
        ("gs://gbkt/store@unreachable", "cannot be reached"),
        ("s3://sbkt/store@unreachable", "cannot be reached"),
    ],
)
def test_bad_buckets_are_one_line_and_exit_2(
    buckets, tiny_gpt2, corpus_file, monkeypatch, capsys, out, phrase
):
    if out.endswith("@unreachable"):
        out = out.removesuffix("@unreachable")
        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", dead)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
        monkeypatch.setenv("SAEJAX_REMOTE_RETRIES", "2")
    start = time.monotonic()
    code = main(extract_argv(out, tiny_gpt2, corpus_file))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert phrase in lines[0] and out in lines[0], lines[0]
    assert time.monotonic() - start < 60, "bounded retries"
    if "reached" in phrase:
        assert "after 2 retries" in lines[0]


def test_opening_a_missing_remote_store_is_one_line(buckets, capsys):
    assert main(["store", "info", "gs://gbkt/nothing-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gs://gbkt/nothing-here" in err[0], err
