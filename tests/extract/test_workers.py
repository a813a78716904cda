"""Extraction workers: N processes write one store that reads as the one-process store."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from extract.workers import deal, resolve_worker, run_worker  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.errors import SaejaxError  # noqa: E402
from saejax.store import ActivationStore, read_meta  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
TOKENS = 3000  # 97 contexts of 31 rows: the last context is cut, as in a one-process store
TIMEOUT_S = 120


def _args(model, corpus, out, *extra):
    return [
        sys.executable,
        "-m",
        "saejax",
        "extract",
        "--model",
        model,
        "--corpus",
        corpus,
        "--hooks",
        HOOK,
        "--tokens",
        str(TOKENS),
        "--context",
        "32",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        "--chunk-mib",
        "0.02",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def _config(model, corpus, out, **kw):
    settings = dict(hooks=[HOOK], tokens=TOKENS, context=32, batch_size=4, dtype="float32")
    return ExtractConfig(
        out=str(out), model=model, corpus=corpus, chunk_mib=0.02, **{**settings, **kw}
    )


def _start_workers(model, corpus, out, n, env=None):
    return [
        subprocess.Popen(
            _args(model, corpus, out, "--workers", str(n), "--worker", str(i)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(n)
    ]


def _wait(procs):
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, err.decode()


def _rows(path):
    store = ActivationStore.open(str(path))
    return {
        "acts": store.read(0, len(store), HOOK),
        "tokens": store.tokens(),
        "doc": store.doc(),
        "n": len(store),
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def one_process(tiny_gpt2, corpus_file, tmp_path_factory):
    """The reference: the same request extracted by one process."""
    out = tmp_path_factory.mktemp("one") / "store"
    run_extract(_config(tiny_gpt2, corpus_file, out), progress=False)
    return _rows(out)


@pytest.fixture(scope="module")
def three_workers(tiny_gpt2, corpus_file, tmp_path_factory):
    """Three workers started at once as separate processes, writing one store."""
    out = tmp_path_factory.mktemp("three") / "store"
    _wait(_start_workers(tiny_gpt2, corpus_file, out, 3))
    return str(out)


def test_contexts_are_dealt_as_contiguous_ranges():
    assert deal(0, 97, 3) == [(0, 32), (32, 64), (64, 97)]
    assert deal(97, 100, 2) == [(97, 98), (98, 100)]
    assert resolve_worker(None, None, {"RANK": "2", "WORLD_SIZE": "4"}) == (4, 2)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_worker(3, None, env) == (3, 1)
    assert resolve_worker(2, None, {}) == (2, None)  # no launcher: start them here
    with pytest.raises(SaejaxError, match="--worker must be 0..2"):
        resolve_worker(3, 3, {})


def test_three_workers_equal_one_process(three_workers, one_process, capsys):
    _assert_same(one_process, _rows(three_workers))
    store = ActivationStore.open(three_workers)
    assert store.meta["complete"] and len(store) == TOKENS
    assert [p["part"] for p in store.meta["parts"]] == [
        f"parts/0/worker-{i}-of-3" for i in range(3)
    ]
    assert [p["rows"] for p in store.meta["parts"]] == [32 * 31, 32 * 31, 33 * 31]
    assert main(["store", "info", three_workers]) == 0
    out = capsys.readouterr().out
    assert "worker 1/3   parts/0/worker-1-of-3: 992 of 992 rows" in out
    assert "integrity    ok" in out


def test_reads_cross_part_boundaries(three_workers, one_process):
    from saejax.train.data import ArraySource

    store = ActivationStore.open(three_workers)
    acts, boundary = one_process["acts"], 32 * 31  # the first row of worker 1's part
    np.testing.assert_array_equal(
        store.read(boundary - 5, boundary + 5), acts[boundary - 5 : boundary + 5]
    )
    rows = np.array([boundary + 3, 0, 2 * boundary, boundary - 1, TOKENS - 1])
    np.testing.assert_array_equal(store.take(rows), acts[rows])
    firsts = [first for first, _ in store.iter_chunks(chunk_rows=700)]
    assert firsts == list(range(0, TOKENS, 700))
    np.testing.assert_array_equal(np.concatenate([r for _, r in store.iter_chunks(700)]), acts)
    ids, at = store.context(boundary, before=40, after=3)
    assert at == 0 and len(ids) == 4  # worker 1 begins a sequence: none of worker 0's tokens
    assert store.doc(boundary, boundary + 1)[0, 0] == 32  # the corpus's own context index
    source = ArraySource(three_workers)
    np.testing.assert_array_equal(source.take(np.sort(rows)), acts[np.sort(rows)])


def test_kill_9_of_a_worker_then_restart_completes_the_same_store(
    tiny_gpt2, corpus_file, one_process, tmp_path
):
    from extract.models import load_model

    out = tmp_path / "store"
    slow = {**os.environ, "SAEJAX_TEST_CHUNK_DELAY_S": "0.3"}
    killed = _start_workers(tiny_gpt2, corpus_file, out, 3, env=slow)[1:2]
    loaded = load_model(tiny_gpt2)
    for i in (0, 2):  # the other two workers, here (each process costs seconds of imports)
        run_worker(_config(tiny_gpt2, corpus_file, out), 3, i, False, loaded)
    part = out / "parts/0/worker-1-of-3"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        meta = read_meta(str(part)) if (part / "meta.json").exists() else None
        if meta and meta["n_tokens"] > 0:
            break
        time.sleep(0.05)
    killed[0].send_signal(signal.SIGKILL)
    killed[0].wait()
    killed_at = read_meta(str(part))["n_tokens"]
    assert 0 < killed_at < 992
    store = ActivationStore.open(str(out))  # the written prefix: worker 0, part of worker 1
    assert not store.meta["complete"] and len(store) == 992 + killed_at
    np.testing.assert_array_equal(store.read(0, len(store)), one_process["acts"][: len(store)])
    restarted = subprocess.Popen(
        _args(tiny_gpt2, corpus_file, out, "--workers", "3", "--worker", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait([restarted])
    _assert_same(one_process, _rows(out))


def test_workers_without_worker_start_them_here(
    tiny_gpt2, corpus_file, one_process, tmp_path, monkeypatch
):
    from extract.workers import launch_local

    meta = launch_local(_config(tiny_gpt2, corpus_file, tmp_path / "local", tokens=600), 2, False)
    assert meta["complete"] and meta["n_tokens"] == 600
    np.testing.assert_array_equal(_rows(tmp_path / "local")["acts"], one_process["acts"][:600])
    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker process fails
    with pytest.raises(SaejaxError, match="worker 0 of 2 failed \\(exit 1\\)"):
        launch_local(_config(tiny_gpt2, corpus_file, tmp_path / "failing", tokens=600), 2, False)


def test_mixing_configurations_is_refused(three_workers, tiny_gpt2, corpus_file, tmp_path, capsys):
    other = _args(tiny_gpt2, corpus_file, three_workers, "--workers", "3", "--worker", "0")
    other[other.index("--context") + 1] = "16"
    assert main(other[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration" in err and "context: store has 32" in err
    assert len(err.splitlines()) == 1
    assert main(_args(tiny_gpt2, corpus_file, three_workers)[3:]) == 2  # one process
    assert "written by extraction workers" in capsys.readouterr().err
    run_extract(_config(tiny_gpt2, corpus_file, tmp_path / "single", tokens=100), progress=False)
    with pytest.raises(SaejaxError, match="written by one process"):
        run_worker(_config(tiny_gpt2, corpus_file, tmp_path / "single"), 2, 0, progress=False)


def test_growing_adds_a_segment_in_row_order(tiny_gpt2, corpus_file, one_process, tmp_path):
    from extract.models import load_model

    loaded = load_model(tiny_gpt2)
    out = tmp_path / "grown"
    for i in range(3):
        run_worker(_config(tiny_gpt2, corpus_file, out, tokens=1000), 3, i, False, loaded)
    for i in range(2):
        run_worker(_config(tiny_gpt2, corpus_file, out, tokens=2000), 2, i, False, loaded)
    store = ActivationStore.open(str(out))
    assert [p["part"] for p in store.meta["parts"]][3:] == [
        "parts/1/worker-0-of-2",
        "parts/1/worker-1-of-2",
    ]
    assert store.meta["complete"] and len(store) == 2000
    grown = _rows(out)
    for key in ("acts", "tokens", "doc"):
        np.testing.assert_array_equal(grown[key], one_process[key][:2000], err_msg=key)


def test_a_damaged_chunk_of_a_part_is_named_and_repaired_by_its_worker(
    three_workers, tiny_gpt2, corpus_file, one_process, tmp_path, capsys
):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(three_workers, out)
    os.remove(out / "parts/0/worker-1-of-3/tokens/c/1")  # the part's second chunk of tokens
    assert main(["store", "info", str(out)]) == 2
    captured = capsys.readouterr()
    assert "chunk 1 of part parts/0/worker-1-of-3" in captured.out
    with pytest.raises(SaejaxError, match="worker-1-of-3: tokens chunk 1 .* missing"):
        ActivationStore.open(str(out)).tokens()  # a read names the part and its own rows
    run_worker(_config(tiny_gpt2, corpus_file, out), 3, 1, progress=False)
    _assert_same(one_process, _rows(out))


def test_parts_beyond_the_end_of_the_corpus_are_complete_and_empty(
    tiny_gpt2, corpus_file, one_process, tmp_path
):
    from extract.models import load_model

    loaded = load_model(tiny_gpt2)
    out, far = tmp_path / "short", 100_000  # far more rows than the corpus holds
    for i in range(2):
        run_worker(_config(tiny_gpt2, corpus_file, out, tokens=far), 2, i, False, loaded)
    store = ActivationStore.open(str(out))
    worker_0, worker_1 = store.meta["parts"]
    assert worker_0["complete"] and 0 < worker_0["rows"] < worker_0["target"]
    assert worker_1["complete"] and worker_1["rows"] == 0
    assert store.meta["complete"] and store.meta["corpus_exhausted"]
    assert len(store) == worker_0["rows"]
    np.testing.assert_array_equal(store.read(0, TOKENS), one_process["acts"])
