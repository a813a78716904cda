"""No document feeds both training and validation, and no training row is left out."""

import numpy as np
from helpers import make_store

from saejax.config import DataConfig
from saejax.train.data import ArraySource, BatchPlan, Loader, split_rows, validation_rows


def test_store_split_falls_on_a_sequence_boundary(tmp_path):
    # sequences of 8 rows; 1000 rows with 100 held out would cut sequence 112 at row 900
    rows = np.repeat(np.arange(1000, dtype=np.float32)[:, None], 4, axis=1)
    store = make_store(str(tmp_path / "s"), rows, context=8)
    split = split_rows(len(store), 100, store)
    assert split.train_rows == 896 and split.validation_rows == 104
    doc = store.doc()
    assert doc[split.train_rows - 1, 0] != doc[split.train_rows, 0]
    held = validation_rows(
        ArraySource(str(tmp_path / "s")), DataConfig(path="", validation_tokens=100)
    )
    assert held[0, 0] == 896 and len(held) == 104
    # a .npy file has no sequences: split at the row count, as before
    np.save(tmp_path / "rows.npy", rows)
    assert split_rows(1000, 100).train_rows == 900
    npy = validation_rows(
        ArraySource(str(tmp_path / "rows.npy")), DataConfig(path="", validation_tokens=100)
    )
    assert npy[0, 0] == 900


def test_a_ragged_last_block_is_trained_on(tmp_path):
    rows = np.repeat(np.arange(1000, dtype=np.float32)[:, None], 4, axis=1)
    np.save(tmp_path / "rows.npy", rows)
    cfg = DataConfig(
        path=str(tmp_path / "rows.npy"), validation_tokens=100, block_rows=256, shuffle_blocks=2
    )
    plan = BatchPlan(900, 100, 256, 2, cfg.seed)
    assert plan.epoch_rows == 900 and plan.block_range(plan.n_blocks - 1) == (768, 900)
    loader = Loader(ArraySource(cfg.path), cfg, 100)
    try:
        first_epoch = np.concatenate([next(loader)[:, 0] for _ in range(9)]).astype(int)
    finally:
        loader.close()
    assert sorted(first_epoch.tolist()) == list(range(900))  # every training row, once
