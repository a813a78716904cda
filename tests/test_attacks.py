"""Hostile and broken inputs: damaged SAE files, out-of-range options, a full disk, a
malformed LLM reply, a torn metrics line, escape sequences in the corpus. Each is one line
on stderr starting with "saejax: error:", exit status 2, no traceback and nothing written."""

import errno
import http.server
import json
import os
import shutil
import threading

import numpy as np
import pytest
from helpers import make_store, superposition_data

from saejax.cli import main


def train_args(data, run):
    return [
        "train",
        f"--set=data.path={data}",
        f"--set=run_dir={run}",
        "--set=sae.d_sae=32",
        "--set=sae.k=4",
        "--set=train.tokens=2048",
        "--set=train.batch_size=256",
        "--set=data.validation_tokens=512",
        "--set=data.block_rows=512",
        "--set=log.progress=false",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run trained on a store and one trained on a .npy file."""
    root = tmp_path_factory.mktemp("attacks")
    rows, _ = superposition_data(4096, d=16, m=32, p=0.1)
    make_store(str(root / "store"), rows)
    np.save(root / "rows.npy", rows)
    assert main(train_args(root / "store", root / "run")) == 0
    assert main(train_args(root / "rows.npy", root / "npy_run")) == 0
    return {"root": root, "run": str(root / "run"), "npy_run": str(root / "npy_run")}


def snapshot(path) -> dict:
    """Every file under `path` with its size and modification time."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def fails_cleanly(capsys, argv, *phrases) -> str:
    """Run `saejax argv`: exit 2, one error line holding `phrases`, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("saejax: error:"), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---- damaged sae/ files ----------------------------------------------------------------


def _bad_json(sae):
    (sae / "sae.json").write_text('{"spec": {"architecture": "topk", ')


def _truncated_weights(sae):
    path = sae / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _random_weights(sae):
    (sae / "sae_weights.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))


def _wrong_shapes(sae):
    info = json.loads((sae / "sae.json").read_text())
    info["spec"]["d_sae"] = 48
    (sae / "sae.json").write_text(json.dumps(info))


def _missing_key(sae):
    info = json.loads((sae / "sae.json").read_text())
    del info["spec"]
    (sae / "sae.json").write_text(json.dumps(info))


def _missing_weights(sae):
    os.remove(sae / "sae_weights.safetensors")


DAMAGE = [_bad_json, _truncated_weights, _random_weights, _wrong_shapes, _missing_key]
COMMANDS = [
    lambda run, out: ["export", run, "--out", out],
    lambda run, out: ["features", run],
    lambda run, out: ["eval", run],
    lambda run, out: ["dashboard", run, "--out", out],
    lambda run, out: ["steer", run, "--latent", "0", "--prompt", "hi", "--boost", "2"],
    lambda run, out: ["search", run, "--positive", "hi"],
]


@pytest.mark.parametrize("damage", DAMAGE + [_missing_weights], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("command", range(len(COMMANDS)))
def test_damaged_sae_files(runs, tmp_path, capsys, damage, command):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    damage(run / "sae")
    before = snapshot(run)
    out = str(tmp_path / "out")
    phrase = "no sae_weights" if damage is _missing_weights else "files are damaged"
    fails_cleanly(capsys, COMMANDS[command](str(run), out), str(run / "sae"), phrase)
    assert snapshot(run) == before and not os.path.exists(out)


# ---- options out of range ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["search", "{run}", "--positive", "hi", "--percentile", "150"], "--percentile"),
        (["search", "{run}", "--positive", "hi", "--percentile", "-1"], "--percentile"),
        (["search", "{run}", "--positive", "hi", "--percentile", "0"], "--percentile"),
        (["steer", "{run}", "--latent", "0", "--prompt", "hi", "--tokens", "100000"], "4096"),
        (["steer", "{run}", "--latent", "0", "--prompt", "hi", "--tokens", "0"], "--tokens"),
        (["features", "{run}", "--max-rows", "0"], "--max-rows"),
        (["features", "{run}", "--max-rows", "-5"], "--max-rows"),
        (
            [
                "analyze",
                "decorrelation",
                "m",
                "--prompts",
                "builtin",
                "--dtype",
                "int8",
                "--out",
                "{out}",
            ],
            "--dtype",
        ),  # noqa: E501
        (
            [
                "analyze",
                "decorrelation",
                "m",
                "--prompts",
                "builtin",
                "--max-prompts",
                "-1",
                "--out",
                "{out}",
            ],
            "--max-prompts",
        ),  # noqa: E501
    ],
)
def test_options_out_of_range(runs, tmp_path, capsys, argv, phrase):
    before = snapshot(runs["run"])
    out = str(tmp_path / "out")
    argv = [a.format(run=runs["run"], out=out) for a in argv]
    fails_cleanly(capsys, argv, phrase)
    assert snapshot(runs["run"]) == before and not os.path.exists(out)


# ---- a run trained on a .npy file has no tokens -------------------------------------------


@pytest.mark.parametrize("command", ["eval", "features", "dashboard"])
def test_npy_run_needs_a_store(runs, capsys, command):
    before = snapshot(runs["npy_run"])
    fails_cleanly(capsys, [command, runs["npy_run"]], ".npy", "--store")
    assert snapshot(runs["npy_run"]) == before


# ---- a full disk ----------------------------------------------------------------------------


def test_disk_full_during_export(runs, tmp_path, capsys, monkeypatch):
    from saejax import io

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(io, "write_json", full)
    out = tmp_path / "exports" / "saelens"
    fails_cleanly(capsys, ["export", runs["run"], "--out", str(out)], "No space left")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path / "exports") if p.startswith(".tmp-")]


def test_safetensors_write_error_is_one_line(runs, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from saejax.train import export

    def failing(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28 })")

    monkeypatch.setattr(export, "save_file", failing)
    out = tmp_path / "exports" / "saelens"
    fails_cleanly(capsys, ["export", runs["run"], "--out", str(out)], "serializing")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path / "exports") if p.startswith(".tmp-")]


# ---- a malformed LLM reply -----------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        {"choices": [{"message": {"content": None}}]},
        {"choices": "x"},
        {"choices": []},
        {"error": {"message": "quota"}},
        [1, 2],
        "not json",
    ],
)
def test_malformed_llm_reply_is_a_failure_not_a_crash(reply, capsys):
    from saejax.interp.dashboard import LLMExplainer

    body = (reply if isinstance(reply, str) else json.dumps(reply)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        explainer = LLMExplainer(f"http://127.0.0.1:{server.server_port}/v1", "m")
        assert explainer.explain(["a [[b]] c"]) is None
        assert explainer.failed and explainer.explain(["again"]) is None  # asks only once
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "Traceback" not in err[0]


# ---- a torn metrics.jsonl ------------------------------------------------------------------


def test_partial_last_metrics_line_is_skipped(tmp_path):
    from saejax.interp.dashboard import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"tokens": 256, "fvu": 0.5}\n{"tokens": 512, "fvu": 0.4}\n{"tokens": 76')
    assert [r["tokens"] for r in read_metrics(str(path))] == [256, 512]


# ---- escape sequences in the corpus --------------------------------------------------------


class ByteTokenizer:
    """Each id is one character (enough to show a context)."""

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def test_corpus_escape_sequences_never_reach_the_terminal():
    from saejax.interp.contexts import marked_context

    text = "ok\x1b]0;pwned\x07\x1b[2J\x9b31mred\x7f\nnext\tend"
    ids = [ord(c) for c in text]
    shown = marked_context(ByteTokenizer(), ids, 2)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown), repr(shown)
    assert shown == "ok[[\\x1b]]]0;pwned\\x07\\x1b[2J\\x9b31mred\\x7f⏎next\\x09end"
    multi = marked_context(ByteTokenizer(), ids, 2, one_line=False)
    assert "\n" in multi and "\x1b" not in multi


def test_features_show_escapes_store_text(runs, capsys):
    """`features --show` prints contexts through marked_context: no raw escape reaches stdout."""
    from saejax.interp.features import latent_report
    from saejax.store import ActivationStore

    store = ActivationStore.open(str(runs["root"] / "store"))

    class Hostile:
        def decode(self, ids):
            return "\x1b]0;title\x07" + "".join(f"<{int(i)}>" for i in ids)

    result = {
        "fire_count": np.array([3]),
        "n_rows": np.int64(len(store)),
        "top_vals": np.array([[2.0, 1.0]]),
        "top_rows": np.array([[10, 20]]),
        "sample_priority": np.array([[0.5]]),
        "sample_vals": np.array([[1.5]]),
        "sample_rows": np.array([[30]]),
    }
    lines = latent_report(result, 0, store, Hostile())
    assert len(lines) == 6
    assert all("\x1b" not in line and "\x07" not in line for line in lines)
    assert "\\x1b]0;title\\x07" in lines[2]


# ---- outputs on object storage -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--set=data.path={store}", "--d-sae", "32", "--out", "s3://bucket/sweep"],
        ["export", "{run}", "--out", "gs://bucket/export"],
        ["dashboard", "{run}", "--out", "gs://bucket/dash"],
    ],
    ids=["sweep", "export", "dashboard"],
)
def test_outputs_on_object_storage_are_refused_before_any_work(runs, capsys, argv, monkeypatch):
    """Outputs that cannot live in a bucket yet are one line before anything starts (a run
    directory on gs:// used to train to the end, then crash with a local `gs:` folder left
    behind; `train` now mirrors it into the bucket: tests/train/test_remote_run.py)."""
    monkeypatch.chdir(runs["root"])
    before = set(os.listdir(runs["root"]))
    names = {"{run}": runs["run"], "{store}": str(runs["root"] / "store")}
    full = []
    for a in argv:
        if a == "{train}":
            full += train_args(runs["root"] / "store", runs["root"] / "unused")
        else:
            full.append(
                a.replace("{store}", names["{store}"]) if "{store}" in a else names.get(a, a)
            )
    fails_cleanly(capsys, full, "object-storage URL")
    assert set(os.listdir(runs["root"])) == before, "no local gs:/s3: folder"
