"""Shared fixtures: tiny language models built from configs (no download). The builders
themselves live in helpers.py."""

import os

import pytest
from helpers import CORPUS_TEXT, TRAINED_GPT2_HOOK, build_tiny_model, trained_tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), "gpt2")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    import json

    with open(path, "w") as f:
        for text in CORPUS_TEXT:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def trained_gpt2(tiny_gpt2, tmp_path_factory):
    return trained_tiny_gpt2(tiny_gpt2, str(tmp_path_factory.mktemp("trained_gpt2")))


@pytest.fixture(scope="session")
def trained_gpt2_store(trained_gpt2, corpus_file, tmp_path_factory):
    """A store of the trained tiny GPT-2's TRAINED_GPT2_HOOK (3000 rows of 32-token contexts),
    extracted once and only read by the tests that use it (eval, dashboard)."""
    from extract.extractor import ExtractConfig, run_extract

    out = str(tmp_path_factory.mktemp("trained_gpt2_store") / "store")
    config = ExtractConfig(
        out=out,
        model=trained_gpt2,
        corpus=corpus_file,
        hooks=[TRAINED_GPT2_HOOK],
        tokens=3000,
        context=32,
        batch_size=4,
        dtype="float32",
    )
    run_extract(config, progress=False)
    return out
