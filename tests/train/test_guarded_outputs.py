"""Outputs never destroy a folder saejax did not write, nor the run they read: `export` and
`dashboard` into an unrelated folder, into the run itself or into `.` are refused in one line
(exit 2) and leave everything as it was; an earlier output of the same kind is replaced."""

import os

import numpy as np
import pytest
from helpers import small_config, superposition_data

from saejax import io
from saejax.cli import main
from saejax.train.run import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("guarded")
    rows, _ = superposition_data(4000, d=16, m=32, p=0.1, seed=1)
    np.save(base / "rows.npy", rows)
    run_dir = base / "run"
    train(small_config(str(base / "rows.npy"), str(run_dir), "train.tokens=2048"))
    return run_dir


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("saejax: error: refusing"), err
    return err[0]


@pytest.mark.parametrize("command", ["export", "dashboard"])
def test_an_unrelated_folder_is_left_intact(run, tmp_path, capsys, command):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    before = snapshot(run)
    refused(capsys, [command, str(run), "--out", str(notes)])
    assert snapshot(notes) == {"todo.txt": b"buy milk\n"}
    assert snapshot(run) == before
    assert sorted(os.listdir(tmp_path)) == ["notes"]  # no .tmp-* left beside it


@pytest.mark.parametrize("command", ["export", "dashboard"])
@pytest.mark.parametrize("where", ["run", "sae", "inside sae", "parent"])
def test_the_run_itself_is_left_intact(run, capsys, command, where):
    out = {
        "run": run,
        "sae": run / "sae",
        "inside sae": run / "sae" / "export",
        "parent": run.parent,
    }[where]
    before = snapshot(run.parent)
    line = refused(capsys, [command, str(run), "--out", str(out)])
    assert str(out) in line
    assert snapshot(run.parent) == before
    assert not (run / "sae" / "export").exists()


def test_out_dot_is_refused_and_leaves_no_temporary_folder(run, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("\\section{}\n")
    monkeypatch.chdir(work)
    refused(capsys, ["export", str(run), "--out", "."])
    assert os.listdir(work) == ["paper.tex"]
    assert os.listdir(tmp_path) == ["work"]


def test_an_earlier_export_is_replaced(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert io.output_kind(str(out)) == "export"
    (out / "stale.txt").write_text("from before\n")
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "cfg.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder holds nothing to lose
    assert main(["export", str(run), "--out", str(empty)]) == 0
    assert (empty / "cfg.json").exists()


def test_a_folder_of_another_kind_is_not_replaced(tmp_path):
    with io.atomic_dir(str(tmp_path / "dash"), kind="dashboard") as tmp:
        (open(os.path.join(tmp, "index.html"), "w")).close()
    with pytest.raises(io.OutputRefused, match="saejax dashboard folder"):
        with io.atomic_dir(str(tmp_path / "dash"), kind="export"):
            pass
    assert sorted(os.listdir(tmp_path / "dash")) == [io.MARKER, "index.html"]


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_dir(str(tmp_path / "out"), kind="export") as tmp:
            (open(os.path.join(tmp, "half"), "w")).close()
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
