"""--skip-positions N: the first N positions of each context store no rows (attention sinks),
the rest are the same rows a plain extraction stores; meta.json records N."""

import numpy as np
import pytest

pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from extract.packing import Context, stored_positions  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.errors import SaejaxError  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def test_stored_positions_skip_the_first_n():
    ctx = Context(0, np.arange(8), n_real=8)
    assert stored_positions(ctx, drop_bos=True).tolist() == list(range(1, 8))
    assert stored_positions(ctx, drop_bos=True, skip_positions=3).tolist() == [3, 4, 5, 6, 7]
    assert stored_positions(ctx, drop_bos=False, skip_positions=2).tolist() == list(range(2, 8))
    short = Context(1, np.arange(8), n_real=2)  # the corpus's last, short context
    assert stored_positions(short, drop_bos=True, skip_positions=3).tolist() == []


def extract(model, corpus, out, **kw):
    cfg = dict(hooks=[HOOK], tokens=300, context=16, batch_size=4, dtype="float32")
    return run_extract(
        ExtractConfig(out=str(out), model=model, corpus=corpus, **{**cfg, **kw}), progress=False
    )


def test_skipped_store_holds_the_same_rows_from_position_n(tiny_gpt2, corpus_file, tmp_path):
    plain = extract(tiny_gpt2, corpus_file, tmp_path / "plain", tokens=400)
    meta = extract(tiny_gpt2, corpus_file, tmp_path / "skip", skip_positions=4)
    assert meta["skip_positions"] == 4 and plain["skip_positions"] == 0
    a, b = (
        ActivationStore.open(str(tmp_path / "plain")),
        ActivationStore.open(str(tmp_path / "skip")),
    )
    doc_b = b.doc()
    assert doc_b[:, 1].min() == 4 and len(b) == 300
    where = {(int(s), int(p)): i for i, (s, p) in enumerate(a.doc())}
    rows = [where[(int(s), int(p))] for s, p in doc_b if (int(s), int(p)) in where]
    assert len(rows) > 100
    np.testing.assert_array_equal(a.tokens()[rows], b.tokens()[: len(rows)])
    np.testing.assert_allclose(a.read(0, len(a), HOOK)[rows], b.read(0, len(rows), HOOK))

    # a store is resumed or grown only with the same setting
    with pytest.raises(SaejaxError, match="skip_positions"):
        extract(tiny_gpt2, corpus_file, tmp_path / "skip", skip_positions=2, tokens=600)


def test_skip_positions_out_of_range_is_one_line(capsys, tmp_path):
    code = main(
        ["extract", "--out", str(tmp_path / "s"), "--context", "8", "--skip-positions", "8"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--skip-positions" in err and len(err.strip().splitlines()) == 1
