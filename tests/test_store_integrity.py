"""A damaged store is never read as zeros: a missing or damaged chunk is one error line, and
running the same extraction again repairs exactly those rows, bit for bit."""

import filecmp
import os
import shutil

import numpy as np
import pytest
from helpers import make_store

from saejax.cli import main
from saejax.errors import SaejaxError
from saejax.store import ActivationStore

torch = pytest.importorskip("torch")

HOOK = "blocks.1.hook_resid_post"


def extract_args(model_dir, corpus, out):
    return [
        "extract",
        f"--model={model_dir}",
        f"--corpus={corpus}",
        f"--hooks={HOOK}",
        "--tokens=700",
        "--context=32",
        "--batch-size=4",
        "--dtype=float32",
        "--chunk-mib=0.02",
        f"--out={out}",
        "--quiet",
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saejax: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def original(tiny_llama, corpus_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("integrity") / "store")
    assert main(extract_args(tiny_llama, corpus_file, out)) == 0
    return out


def chunk_files(store: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), store)
        for d, _, files in os.walk(store)
        for f in files
        if f != "zarr.json" and f != "meta.json"
    )


def assert_same_store(a: str, b: str) -> None:
    assert chunk_files(a) == chunk_files(b)
    for rel in chunk_files(a):
        assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel


def test_deleted_chunk_fails_info_and_training_then_extract_repairs_it(
    original, tiny_llama, corpus_file, tmp_path, capsys
):
    store = str(tmp_path / "store")
    shutil.copytree(original, store)
    chunk_rows = ActivationStore.open(store).chunk_rows
    os.remove(os.path.join(store, "acts", HOOK, "c", "1", "0"))  # rows chunk_rows..2·chunk_rows

    assert main(["store", "info", store]) == 2
    line = one_error_line(capsys)
    assert f"chunk 1 (rows {chunk_rows}..{2 * chunk_rows - 1})" in line and "missing" in line
    with pytest.raises(SaejaxError, match="missing"):
        ActivationStore.open(store).read(0, 700)  # never zeros

    run = str(tmp_path / "run")
    code = main(
        [
            "train",
            f"--set=data.path={store}",
            f"--set=run_dir={run}",
            "--set=sae.d_sae=32",
            "--set=sae.k=4",
            "--set=train.tokens=1024",
            "--set=train.batch_size=128",
            "--set=data.validation_tokens=128",
            "--set=data.block_rows=64",
            "--set=log.progress=false",
        ]
    )
    assert code == 2
    assert "missing" in one_error_line(capsys)

    assert main(extract_args(tiny_llama, corpus_file, store)) == 0
    capsys.readouterr()
    assert_same_store(original, store)
    assert main(["store", "info", "--verify", store]) == 0
    assert "integrity    ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_doc"])
def test_damaged_chunk_is_one_line_and_repaired(
    damage, original, tiny_llama, corpus_file, tmp_path, capsys
):
    store = str(tmp_path / "store")
    shutil.copytree(original, store)
    if damage == "delete_doc":
        os.remove(os.path.join(store, "doc", "c", "0", "0"))
    else:
        path = os.path.join(store, "tokens", "c", "0")
        data = bytearray(open(path, "rb").read())
        if damage == "truncate":
            data = data[:7]
        else:
            data[5] ^= 1
        open(path, "wb").write(bytes(data))

    assert main(["store", "info", "--verify", store]) == 2
    line = one_error_line(capsys)
    assert "chunk 0 (rows 0.." in line
    assert ("missing" if damage == "delete_doc" else "damaged") in line

    assert main(extract_args(tiny_llama, corpus_file, store)) == 0
    capsys.readouterr()
    assert_same_store(original, store)


def test_all_zero_chunks_are_stored(tmp_path):
    """A chunk equal to the fill value is still written, so a missing chunk always means
    damage."""
    make_store(str(tmp_path / "s"), np.zeros((40, 4), np.float32))
    assert sorted(os.listdir(tmp_path / "s" / "acts" / "h" / "c")) == ["0", "1", "2"]
    assert ActivationStore.open(str(tmp_path / "s")).check(verify=True).ok


def test_repair_of_a_store_with_skipped_positions_and_token_batches(
    tiny_llama, corpus_file, tmp_path, capsys
):
    """Repair re-forms the rows as the extraction formed them: with --skip-positions the
    stored positions start later, and with --batch-tokens a forward holds N // context
    contexts (repair used to assume position 1 on and --batch-size)."""
    args = [a for a in extract_args(tiny_llama, corpus_file, "") if a != "--batch-size=4"]
    args = [a for a in args if not a.startswith("--out=")]
    args += ["--skip-positions=3", "--batch-tokens=96"]
    original, store = str(tmp_path / "original"), str(tmp_path / "store")
    assert main([*args, f"--out={original}"]) == 0
    shutil.copytree(original, store)
    os.remove(os.path.join(store, "acts", HOOK, "c", "2", "0"))
    os.remove(os.path.join(store, "doc", "c", "1", "0"))
    assert main([*args, f"--out={store}"]) == 0
    capsys.readouterr()
    assert_same_store(original, store)
