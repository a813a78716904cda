"""The store reader API, `saejax store info`, and its integrity check."""

import json

import numpy as np
import pytest
from helpers import make_store

from saejax.cli import main
from saejax.errors import SaejaxError


def test_reader_api(tmp_path):
    rows = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    store = make_store(str(tmp_path / "s"), rows)
    assert len(store) == 50 and store.d_in == 6 and store.hooks == ["h"]
    np.testing.assert_array_equal(store.read(10, 20), rows[10:20])
    np.testing.assert_array_equal(store.take([7, 3, 41]), rows[[7, 3, 41]])
    chunks = list(store.iter_chunks(16))
    assert [c[0] for c in chunks] == [0, 16, 32, 48]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), rows)
    tokens, at = store.context(19, before=5, after=5)
    np.testing.assert_array_equal(
        tokens, np.arange(16, 24)
    )  # row 19 lies in sequence 2 = rows 16..23
    assert tokens[at] == 19
    with pytest.raises(SaejaxError, match="outside"):
        store.read(40, 60)


def test_store_info_reports_and_checks(tmp_path, capsys):
    rows = np.ones((40, 4), np.float32)
    make_store(str(tmp_path / "s"), rows)
    assert main(["store", "info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "40 rows read, mean norm 2" in out and "integrity    ok" in out


def test_store_info_finds_nan_rows(tmp_path, capsys):
    rows = np.ones((40, 4), np.float32)
    rows[33, 2] = np.nan
    make_store(str(tmp_path / "s"), rows)
    assert main(["store", "info", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "rows [33]" in err and "failed its integrity check" in err


def test_partial_store_is_reported(tmp_path, capsys):
    make_store(str(tmp_path / "s"), np.ones((40, 4), np.float32))
    meta = json.load(open(tmp_path / "s" / "meta.json"))
    meta["n_tokens"] = 400  # meta claims rows the arrays do not hold
    json.dump(meta, open(tmp_path / "s" / "meta.json", "w"))
    assert main(["store", "info", str(tmp_path / "s")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_corrupt_meta_and_missing_store(tmp_path, capsys):
    assert main(["store", "info", str(tmp_path / "nope")]) == 2
    assert "no activation store" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    assert main(["store", "info", str(tmp_path / "bad")]) == 2
    assert "corrupt" in capsys.readouterr().err
