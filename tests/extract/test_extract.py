"""Extraction: rows equal transformers' hidden states; resume equals an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from saejax.store import ActivationStore, read_meta  # noqa: E402


def _extract(model_dir, corpus, out, **kw):
    cfg = ExtractConfig(
        out=str(out),
        model=model_dir,
        corpus=corpus,
        **{
            "hooks": ["blocks.1.hook_resid_post"],
            "tokens": 3000,
            "context": 32,
            "batch_size": 4,
            "dtype": "float32",
            "chunk_mib": 0.02,
            **kw,
        },
    )
    return run_extract(cfg, progress=False)


def _hidden_states(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None], output_hidden_states=True).hidden_states


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_rows_equal_transformers_hidden_states(fixture, request, corpus_file, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    meta = _extract(model_dir, corpus_file, tmp_path / "s", hooks=hooks, tokens=700)
    store = ActivationStore.open(str(tmp_path / "s"))
    assert len(store) == meta["n_tokens"] == 700
    doc = store.doc()
    assert (doc[:, 1] >= 1).all(), "BOS rows are dropped by default"
    for sequence in (0, int(doc[-1, 0])):  # the first and the last (possibly short) sequence
        rows = np.flatnonzero(doc[:, 0] == sequence)
        ids = store.sequence_input(sequence, int(rows[0]))
        assert ids[0] == meta["bos_token_id"]
        hidden = _hidden_states(model_dir, ids)
        positions = doc[rows, 1]
        np.testing.assert_array_equal(store.tokens()[rows], ids[positions])
        for hook, layer in zip(hooks, (0, 2, 3)):  # resid_pre L = hs[L]; resid_post L = hs[L+1]
            expected = hidden[layer][0, positions].numpy()
            np.testing.assert_allclose(
                store.read(rows[0], rows[-1] + 1, hook), expected, rtol=1e-5, atol=1e-5
            )


def test_bfloat16_store_within_dtype_tolerance(tiny_llama, corpus_file, tmp_path):
    _extract(tiny_llama, corpus_file, tmp_path / "bf", dtype="bfloat16", tokens=200)
    _extract(tiny_llama, corpus_file, tmp_path / "f32", dtype="float32", tokens=200)
    bf = ActivationStore.open(str(tmp_path / "bf")).read(0, 200).astype(np.float32)
    f32 = ActivationStore.open(str(tmp_path / "f32")).read(0, 200)
    np.testing.assert_allclose(bf, f32, rtol=1e-2, atol=1e-2)


def test_truncated_forward_runs_no_later_layer(tiny_llama):
    from extract.hooks import Capture, find_blocks, parse_hooks
    from extract.models import load_model

    model = load_model(tiny_llama).model
    fired = []
    handles = [
        b.register_forward_hook(lambda *a, i=i: fired.append(i))
        for i, b in enumerate(find_blocks(model))
    ]
    with Capture(model, parse_hooks("blocks.1.hook_mlp_out,blocks.0.mlp.hook_pre")) as cap:
        out = cap.run(torch.zeros(2, 8, dtype=torch.long))
    for h in handles:
        h.remove()
    assert fired == [0, 1]
    assert out["blocks.0.mlp.hook_pre"].shape == (2, 8, 64)


def _arrays(path):
    store = ActivationStore.open(str(path))
    return {h: store.read(0, len(store), h) for h in store.hooks} | {
        "tokens": store.tokens(),
        "doc": store.doc(),
        "n": len(store),
    }


def _assert_same_store(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_interrupted_then_resumed_equals_uninterrupted(tiny_llama, corpus_file, tmp_path):
    _extract(tiny_llama, corpus_file, tmp_path / "full")

    def interrupt(chunks):
        if chunks == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(
            ExtractConfig(
                out=str(tmp_path / "part"),
                model=tiny_llama,
                corpus=corpus_file,
                hooks=["blocks.1.hook_resid_post"],
                tokens=3000,
                context=32,
                batch_size=4,
                dtype="float32",
                chunk_mib=0.02,
            ),
            progress=False,
            on_chunk=interrupt,
        )
    partial = read_meta(str(tmp_path / "part"))
    assert 0 < partial["n_tokens"] < 3000 and not partial["complete"]
    _extract(tiny_llama, corpus_file, tmp_path / "part")
    _assert_same_store(_arrays(tmp_path / "full"), _arrays(tmp_path / "part"))


def test_kill_9_then_resume_equals_uninterrupted(tiny_gpt2, corpus_file, tmp_path):
    args = [
        sys.executable,
        "-m",
        "saejax",
        "extract",
        "--model",
        tiny_gpt2,
        "--corpus",
        corpus_file,
        "--hooks",
        "blocks.1.hook_resid_post",
        "--tokens",
        "3000",
        "--context",
        "32",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        "--chunk-mib",
        "0.02",
        "--quiet",
    ]
    env = {**os.environ, "SAEJAX_TEST_CHUNK_DELAY_S": "0.3"}
    proc = subprocess.Popen(
        args + ["--out", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        meta = read_meta(str(tmp_path / "killed")) if (tmp_path / "killed").exists() else None
        if meta and meta["n_tokens"] > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < read_meta(str(tmp_path / "killed"))["n_tokens"] < 3000
    subprocess.run(args + ["--out", str(tmp_path / "killed")], check=True, capture_output=True)
    subprocess.run(args + ["--out", str(tmp_path / "clean")], check=True, capture_output=True)
    _assert_same_store(_arrays(tmp_path / "clean"), _arrays(tmp_path / "killed"))


def test_resume_with_more_tokens_extends_the_store(tiny_llama, corpus_file, tmp_path):
    _extract(tiny_llama, corpus_file, tmp_path / "grow", tokens=1000)
    _extract(tiny_llama, corpus_file, tmp_path / "grow", tokens=2500)
    _extract(tiny_llama, corpus_file, tmp_path / "once", tokens=2500)
    _assert_same_store(_arrays(tmp_path / "once"), _arrays(tmp_path / "grow"))
