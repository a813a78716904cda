"""The loader: batch b is a pure function of (seed, b), whatever the threads or the start."""

import numpy as np
import pytest

from saejax.config import DataConfig
from saejax.errors import SaejaxError
from saejax.train.data import ArraySource, BatchPlan, Loader, split_rows


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    # row i holds i in every column, so a batch says which rows it took
    rows = np.repeat(np.arange(3000, dtype=np.float32)[:, None], 4, axis=1)
    path = tmp_path_factory.mktemp("loader") / "rows.npy"
    np.save(path, rows)
    return str(path)


def reference_batches(plan: BatchPlan, n_batches: int) -> list[np.ndarray]:
    """The data order written out plainly: every epoch, its groups in order, each group's
    blocks read and shuffled by the group's permutation, the stream cut into batches."""
    stream, epoch = [], 0
    while len(stream) < n_batches * plan.batch_size:
        for g, blocks in enumerate(plan.groups(epoch)):
            ids = np.concatenate(
                [plan.row_offset + np.arange(*plan.block_range(b)) for b in blocks]
            )
            stream.extend(ids[plan.row_permutation(epoch, g, len(ids))])
        epoch += 1
    stream = np.asarray(stream)
    return [stream[i * plan.batch_size : (i + 1) * plan.batch_size] for i in range(n_batches)]


def take(loader: Loader, n: int) -> list[np.ndarray]:
    try:
        return [next(loader)[:, 0].astype(int) for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.parametrize(
    "batch,block_rows,shuffle_blocks,threads",
    [
        (256, 200, 3, 1),  # batches run across groups
        (256, 100, 1, 3),  # a group smaller than a batch: a batch spans three groups
        (250, 2600, 16, 2),  # one block holds all the training rows
    ],
)
def test_batches_follow_the_plan(rows_path, batch, block_rows, shuffle_blocks, threads):
    cfg = DataConfig(
        path=rows_path,
        validation_tokens=300,
        block_rows=block_rows,
        shuffle_blocks=shuffle_blocks,
        seed=5,
        loader_threads=threads,
    )
    source = ArraySource(rows_path)
    got = take(Loader(source, cfg, batch), 40)  # several epochs
    plan = BatchPlan(split_rows(3000, 300).train_rows, batch, block_rows, shuffle_blocks, 5)
    expected = reference_batches(plan, 40)
    for b, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(g, e, err_msg=f"batch {b}")
    first_epoch = np.concatenate(got)[: plan.epoch_rows]
    assert len(set(first_epoch.tolist())) == plan.epoch_rows  # each row once per epoch
    assert first_epoch.max() < 2700  # the held-out rows are never trained on


def test_a_loader_started_at_batch_b_continues_the_same_stream(rows_path):
    cfg = DataConfig(path=rows_path, validation_tokens=300, block_rows=128, shuffle_blocks=2)
    source = ArraySource(rows_path)
    whole = take(Loader(source, cfg, 192), 30)
    resumed = take(Loader(source, cfg, 192, start_batch=17), 13)
    for a, b in zip(whole[17:], resumed):
        np.testing.assert_array_equal(a, b)


def test_slices_are_read_separately_and_joined(rows_path):
    cfg = DataConfig(path=rows_path, validation_tokens=300, block_rows=100, shuffle_blocks=2)
    source = ArraySource(rows_path)
    both = take(Loader(source, cfg, 200, n_slices=2), 5)
    second = take(Loader(source, cfg, 200, n_slices=2, slices=[1]), 5)
    for joined, own in zip(both, second):
        assert joined[:100].max() < 1350 <= joined[100:].min()  # slice 0 rows, then slice 1's
        np.testing.assert_array_equal(joined[100:], own)


def test_a_nonfinite_row_stops_the_loader_with_its_number(tmp_path):
    rows = np.ones((2000, 4), np.float32)
    rows[1234, 2] = np.nan
    np.save(tmp_path / "bad.npy", rows)
    cfg = DataConfig(validation_tokens=0, block_rows=100, shuffle_blocks=4)
    loader = Loader(ArraySource(str(tmp_path / "bad.npy")), cfg, 100)
    with pytest.raises(SaejaxError, match="row 1234 of .* NaN or Inf"):
        take(loader, 40)


def test_several_hooks_are_read_side_by_side_at_the_same_rows(tmp_path):
    """A multi-hook source (transcoders, multi-hook sweeps) gives each row's hooks side by
    side, so a batch cut apart by `split_columns` is each hook's batch of the same rows."""
    from saejax.train.data import split_columns
    from tests.helpers import make_store

    n = 1200
    ids = np.arange(n, dtype=np.float32)[:, None]
    hooks = {"a": np.repeat(ids, 3, 1), "b": np.repeat(-ids, 5, 1), "c": np.repeat(ids * 2, 2, 1)}
    path = str(tmp_path / "store")
    make_store(path, hooks)
    cfg = DataConfig(path=path, validation_tokens=100, block_rows=64, shuffle_blocks=4, seed=3)

    source = ArraySource(path, "b", also=["c", "a"])
    assert source.widths == [5, 2, 3] and source.row_width == 10 and source.d_in == 5
    np.testing.assert_array_equal(
        source.take(np.array([4, 9])),
        np.concatenate(
            [-ids[[4, 9]].repeat(5, 1), 2 * ids[[4, 9]].repeat(2, 1), ids[[4, 9]].repeat(3, 1)], 1
        ),
    )
    alone = Loader(ArraySource(path, "b"), cfg, 128, start_batch=3)
    together = Loader(source, cfg, 128, start_batch=3)
    try:
        for _ in range(12):  # past an epoch
            b, c, a = split_columns(next(together), source.widths)
            np.testing.assert_array_equal(b, next(alone))
            np.testing.assert_array_equal(a[:, 0], -b[:, 0])
            np.testing.assert_array_equal(c[:, 0], 2 * a[:, 0])
    finally:
        alone.close()
        together.close()

    with pytest.raises(SaejaxError, match="no hook 'z'"):
        ArraySource(path, "a", also=["z"])
    with pytest.raises(SaejaxError, match="twice"):
        ArraySource(path, "a", also=["a"])


def test_shuffle_bytes_gives_the_order_of_the_blocks_it_holds(rows_path):
    """The shuffle buffer stated in bytes: 3.5 blocks of 100 rows × 16 bytes hold three
    whole blocks, so the batches are those of shuffle_blocks 3 (whatever shuffle_blocks
    says); a budget under one block still shuffles one block at a time."""
    from saejax.train.data import shuffle_blocks

    row_bytes = 4 * 4  # four float32 columns
    by_bytes = DataConfig(
        validation_tokens=300,
        block_rows=100,
        shuffle_blocks=9,
        shuffle_bytes=350 * row_bytes,
        seed=2,
    )
    by_blocks = DataConfig(validation_tokens=300, block_rows=100, shuffle_blocks=3, seed=2)
    assert shuffle_blocks(by_bytes, row_bytes) == 3
    assert shuffle_blocks(DataConfig(block_rows=100, shuffle_bytes=1), row_bytes) == 1
    assert shuffle_blocks(DataConfig(shuffle_blocks=5), row_bytes) == 5  # 0: the block count
    source = ArraySource(rows_path)
    got = take(Loader(source, by_bytes, 128), 30)
    for a, b in zip(got, take(Loader(source, by_blocks, 128), 30)):
        np.testing.assert_array_equal(a, b)
    plan = BatchPlan(2700, 128, 100, 3, 2)
    for a, b in zip(got, reference_batches(plan, 30)):
        np.testing.assert_array_equal(a, b)


def test_prefetch_bytes_sets_how_many_batches_wait_ready(rows_path):
    from saejax.train.data import prefetch_batches

    batch_bytes = 100 * 16
    assert prefetch_batches(DataConfig(prefetch=4), batch_bytes) == 4  # 0: the batch count
    assert prefetch_batches(DataConfig(prefetch_bytes=7 * batch_bytes + 5), batch_bytes) == 7
    assert prefetch_batches(DataConfig(prefetch_bytes=1), batch_bytes) == 1  # at least one
    cfg = DataConfig(validation_tokens=300, block_rows=100, prefetch_bytes=2 * batch_bytes)
    loader = Loader(ArraySource(rows_path), cfg, 100)
    assert loader.prefetch == 2
    expected = reference_batches(BatchPlan(2700, 100, 100, 16, 0), 5)
    for a, b in zip(take(loader, 5), expected):
        np.testing.assert_array_equal(a, b)


def test_negative_byte_settings_are_refused():
    from saejax.config import RunConfig, with_values

    for key in ("data.shuffle_bytes", "data.prefetch_bytes"):
        with pytest.raises(SaejaxError, match=f"{key} must be 0 or more, got -1"):
            with_values(RunConfig(), {key: -1})


@pytest.mark.parametrize("transfer", [False, True])
def test_batches_kept_by_the_consumer_stay_intact_while_buffers_are_reused(rows_path, transfer):
    """The loader gathers into a ring of reused arrays: a batch it handed out (the array
    itself, or the device array made from it) must not change as later batches are made,
    well past the ring's length."""
    import jax

    cfg = DataConfig(validation_tokens=300, block_rows=100, shuffle_blocks=2, prefetch=1)
    loader = Loader(
        ArraySource(rows_path), cfg, 100, transform=jax.device_put if transfer else None
    )
    try:
        kept = [next(loader) for _ in range(40)]
    finally:
        loader.close()
    expected = reference_batches(BatchPlan(2700, 100, 100, 2, 0), 40)
    for b, (got, rows) in enumerate(zip(kept, expected)):
        assert isinstance(got, jax.Array) == transfer
        np.testing.assert_array_equal(np.asarray(got)[:, 0].astype(int), rows, err_msg=f"{b}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_nonfinite_value_in_a_store_names_its_row(tmp_path, dtype):
    """The NaN/Inf check reads the stored dtype's exponent bits in cache-sized slices."""
    from saejax.store import DTYPES, check_finite

    rows = np.ones((3000, 40), DTYPES[dtype])
    check_finite(rows, 0, "x")  # all finite: nothing raised
    for value, row in ((np.inf, 2999), (np.nan, 0), (-np.inf, 1717)):
        bad = rows.copy()
        bad[row, 39] = value
        with pytest.raises(SaejaxError, match=f"row {row + 10} of x contains NaN or Inf"):
            check_finite(bad, 10, "x")
        with pytest.raises(SaejaxError, match=f"row {row + 10} of x contains NaN or Inf"):
            check_finite(bad[:, 20:], 10, "x")  # a view of some columns, as a hook's read is
