"""Training data: a store hook or a .npy file, shuffled, batched and prefetched.

The training rows are cut into blocks of `block_rows` contiguous rows (one large
read each). Every epoch visits the blocks in a seeded random order, `shuffle_blocks`
at a time; the rows of each such group are shuffled together and cut into batches.
Batch `b` is therefore a pure function of (seed, b): a resumed run regenerates
exactly the batches an uninterrupted run would have seen. A background thread
reads the next group (TensorStore reads overlap), checks it for NaN/Inf, and
prepares batches ahead of the training step.

What decides the data order: the data itself, `seed`, `validation_tokens`, `block_rows`,
`shuffle_blocks` (or `shuffle_bytes` with the row's width in bytes), the batch size and
`slices`. What does not: `prefetch`, `prefetch_bytes`, `loader_threads`.

Each byte read is touched a few times only: reads land straight in a reused group
buffer, the NaN/Inf check scans it in cache-sized pieces, a batch's rows are gathered
into a reused batch array, and the device transfer copies it once (benchmarks/
bench_loader.py and BENCHMARKS.md measure it: host CPU per batch at d_in 4096).

The last `validation_tokens` rows are held out and never trained on. In a store (which
knows each row's sequence) the split moves back to the start of the sequence that would
straddle it, so no document feeds both training and validation; a .npy file is split at
the row count. Every training row is trained on once per epoch: the last block may be
shorter than `block_rows` (its group is then shorter too).
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from saejax.config import DataConfig
from saejax.errors import SaejaxError
from saejax.store import DTYPES, ActivationStore, check_finite


class ArraySource:
    """Rows of a store hook or of a .npy file, behind one small interface.

    `also` names further hooks of the same store read at the same rows: each row is then the
    hooks' activations side by side, `[d_in | width of also[0] | ...]` (`widths`), so the loader,
    its shuffling and resume work unchanged and every hook's row i stays aligned with the
    others' by construction. Transcoders read (input hook, target hook) this way and a
    multi-hook sweep reads all its hooks in one pass; `split_columns` cuts a batch back apart.
    """

    def __init__(self, path: str, hook: str | None = None, also: tuple[str, ...] | list = ()):
        self.path = path
        if path.endswith(".npy"):
            if also:
                raise SaejaxError(
                    f"{path} is a plain array with no hooks; several hooks need a store"
                )
            if not os.path.isfile(path):
                raise SaejaxError(f"data file not found: {path}")
            try:
                self._array = np.load(path, mmap_mode="r")
            except ValueError as e:
                raise SaejaxError(f"{path} is not a readable .npy array ({e})") from None
            if self._array.ndim != 2:
                raise SaejaxError(
                    f"{path} must hold a 2-d array [n, d_in], got shape {self._array.shape}"
                )
            self.store = None
            self.hook = None
            self.n_rows, self.d_in = self._array.shape
            self.meta = {"model": None, "hooks": [], "mean_norm": {}}
            self.hooks = []
            self.widths = [self.d_in]
            self.dtype = self._array.dtype
        else:
            self.store = ActivationStore.open(path)
            self.hook = self.store.default_hook(hook)
            self.hooks = [self.hook] + [self.store.default_hook(h) for h in also]
            if len(set(self.hooks)) != len(self.hooks):
                raise SaejaxError(f"hooks {self.hooks} name one hook twice")
            self.n_rows, self.d_in = len(self.store), self.store.d_in_of(self.hook)
            self.widths = [self.store.d_in_of(h) for h in self.hooks]
            self.meta = self.store.meta
            self.dtype = np.dtype(DTYPES[self.store.dtype])
        if self.n_rows == 0:
            raise SaejaxError(f"{path} holds no rows (an empty store?)")

    @property
    def row_width(self) -> int:
        """Columns of a row as read: d_in, or the sum of the hooks' widths."""
        return sum(self.widths)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_async(start, stop)()

    def read_async(self, start: int, stop: int) -> Callable[[], np.ndarray]:
        if self.store is None:
            return lambda: np.asarray(self._array[start:stop])
        futures = [self.store.read_async(start, stop, h) for h in self.hooks]
        if len(futures) == 1:
            return futures[0].result
        return lambda: np.concatenate([f.result() for f in futures], axis=1)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> Callable[[], None]:
        """Start reading rows [start, stop) into `out` ([stop - start, row_width], this
        source's dtype); the returned function waits for them. Each hook's read lands in
        its own columns of `out`, so nothing is concatenated."""
        if self.store is None:
            return lambda: np.copyto(out, self._array[start:stop])
        bounds = np.cumsum([0] + self.widths)
        reads = [
            self.store.read_into(start, stop, out[:, int(lo) : int(hi)], hook)
            for hook, lo, hi in zip(self.hooks, bounds[:-1], bounds[1:])
        ]
        return lambda: [r.result() for r in reads] and None

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted indices), in the stored dtype."""
        if self.store is None:
            return np.asarray(self._array[rows])
        parts = [self.store.take(rows, h) for h in self.hooks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def split_columns(rows, widths: list[int]) -> list:
    """A multi-hook batch `[n, sum(widths)]` cut back into one array per hook (works on NumPy
    and JAX arrays)."""
    bounds = np.cumsum([0] + list(widths))
    return [rows[:, int(lo) : int(hi)] for lo, hi in zip(bounds[:-1], bounds[1:])]


@dataclass
class Split:
    train_rows: int
    validation_rows: int


def split_rows(n_rows: int, validation_tokens: int, store: ActivationStore | None = None) -> Split:
    """The last `validation_tokens` rows (at most a fifth) are held out; with a `store`, the
    cut moves back to the first row of the sequence it would otherwise cut through."""
    held = min(validation_tokens, n_rows // 5)
    cut = n_rows - held
    if store is not None and 0 < cut < n_rows:
        cut = sequence_start(store, cut)
    return Split(cut, n_rows - cut)


def sequence_start(store: ActivationStore, row: int) -> int:
    """The first row of the sequence that holds `row` (rows of a sequence are contiguous);
    `row` itself when that sequence began at row 0 (nothing would be left to train on)."""
    lo = max(0, row - int(store.meta.get("context_size") or 0) - 1)
    seqs = store.doc(lo, row + 1)[:, 0]
    other = np.flatnonzero(seqs != seqs[-1])
    start = lo + int(other[-1]) + 1 if len(other) else lo
    return start if start > 0 else row


class BatchPlan:
    """Which rows form batch b: a pure function of (seed, b)."""

    def __init__(
        self,
        train_rows: int,
        batch_size: int,
        block_rows: int,
        shuffle_blocks: int,
        seed: int,
        row_offset: int = 0,
        stream: int | None = None,
    ):
        if train_rows < batch_size:
            raise SaejaxError(
                f"the data has {train_rows} training rows, fewer than one batch of {batch_size}"
            )
        self.train_rows, self.batch_size = train_rows, batch_size
        self.block_rows = min(block_rows, train_rows)
        self.shuffle_blocks, self.seed = shuffle_blocks, seed
        self.row_offset = row_offset  # first row of this plan's slice of the store
        self._key = [seed] if stream is None else [seed, 1_000_003, stream]
        self.n_blocks = -(-train_rows // self.block_rows)  # the last block may be short
        self.epoch_rows = train_rows

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows [start, stop) of a block, relative to `row_offset`."""
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.train_rows)

    def groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng(self._key + [epoch]).permutation(self.n_blocks)
        return [
            order[i : i + self.shuffle_blocks] for i in range(0, self.n_blocks, self.shuffle_blocks)
        ]

    def row_permutation(self, epoch: int, group: int, n: int) -> np.ndarray:
        return np.random.default_rng(self._key + [epoch, group, 1]).permutation(n)

    def locate(self, batch_index: int) -> tuple[int, int, int]:
        """(epoch, group, offset within the group's shuffled rows) of a batch's first row."""
        position = batch_index * self.batch_size
        epoch, offset = divmod(position, self.epoch_rows)
        for group, blocks in enumerate(self.groups(epoch)):
            rows = sum(stop - start for start, stop in map(self.block_range, blocks))
            if offset < rows:
                return epoch, group, offset
            offset -= rows
        raise AssertionError("unreachable: offset < epoch_rows")


def shuffle_blocks(cfg: DataConfig, row_bytes: int) -> int:
    """Blocks per shuffle group: `data.shuffle_bytes` // (block_rows × row_bytes), at least
    one, or `data.shuffle_blocks` when shuffle_bytes is 0. Part of the data order (so with
    shuffle_bytes the order also depends on the row's width in bytes: d_in, every hook read,
    and the stored dtype)."""
    if cfg.shuffle_bytes <= 0:
        return cfg.shuffle_blocks
    return max(1, cfg.shuffle_bytes // (cfg.block_rows * row_bytes))


def prefetch_batches(cfg: DataConfig, batch_bytes: int) -> int:
    """Batches made ready ahead of the step: `data.prefetch_bytes` // batch_bytes, at least
    one, or `data.prefetch` when prefetch_bytes is 0. Not part of the data order."""
    if cfg.prefetch_bytes <= 0:
        return max(1, cfg.prefetch)
    return max(1, cfg.prefetch_bytes // batch_bytes)


class GroupBuffer:
    """One shuffle group's rows, read straight into an array that is reused group after group.
    `users` counts the planned batches that still gather from it; it is refilled only once
    they are done."""

    def __init__(self, rows: int, width: int, dtype):
        self.array = np.empty((rows, width), dtype)
        self.users = 0
        self._idle = threading.Condition()

    def hold(self) -> None:
        with self._idle:
            self.users += 1

    def release(self) -> None:
        with self._idle:
            self.users -= 1
            self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self.users == 0)


class GroupBuffers:
    """The group buffers of one stream: two in steady state (the group being served and the
    one being read); a third only while one batch spans more groups than that (a group
    shorter than a batch, e.g. an epoch's short last group)."""

    def __init__(self, rows: int, width: int, dtype):
        self.rows, self.width, self.dtype = rows, width, dtype
        self.buffers: list[GroupBuffer] = []

    def acquire(self, busy: list[GroupBuffer]) -> GroupBuffer:
        """A buffer not in `busy` (the ones the producer still plans from), once the batches
        already handed to the gather threads are done with it; a new one if there is none."""
        for buffer in self.buffers:
            if all(buffer is not b for b in busy):
                buffer.wait_idle()
                return buffer
        buffer = GroupBuffer(self.rows, self.width, self.dtype)
        self.buffers.append(buffer)
        return buffer


class BatchSlot:
    """A reused output array for one batch in `ring` (a batch is gathered into it with
    np.take(out=...), no new array per batch). The array is reused only once the transfer
    made from it is complete, and never when `transform` handed out the array itself, or a
    device array that aliases it (then the consumer owns it and the slot makes a new one:
    so it goes with JAX on the CPU, which takes aligned arrays without a copy)."""

    def __init__(self):
        self.array: np.ndarray | None = None
        self.sent = None  # what `transform` made of the array, until it is known complete

    def take(self, shape: tuple[int, int], dtype) -> np.ndarray:
        if self.sent is not None:
            deleted = getattr(self.sent, "is_deleted", lambda: False)()  # donated: consumed
            ready = getattr(self.sent, "block_until_ready", None)
            if ready is not None and not deleted:
                ready()
            self.sent = None
        if self.array is None or self.array.shape != shape:
            self.array = aligned_empty(shape, dtype)
        return self.array

    def handed_out(self, result) -> None:
        if aliases(result, self.array):
            self.array = None
        else:
            self.sent = result


def aligned_empty(shape: tuple[int, int], dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary. JAX on the CPU
    then takes it without a copy (device_put aliases 64-byte-aligned host arrays): at d_in
    4096 the gather and transfer of a batch cost 10 instead of 23 ms of CPU, though such an
    array is never reused (the device array owns it). Other devices copy, and the array is
    reused."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aliases(result, array: np.ndarray) -> bool:
    """Whether `result` (a NumPy array or a JAX array) may share memory with `array`. Only
    host (CPU) device buffers can; anything unknown counts as sharing."""
    if isinstance(result, np.ndarray):
        return np.may_share_memory(result, array)
    shards = getattr(result, "addressable_shards", None)
    if shards is None:
        return True
    lo, hi = array.ctypes.data, array.ctypes.data + array.nbytes
    for shard in shards:
        if shard.device.platform != "cpu":
            continue
        try:
            pointer = shard.data.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - no pointer: assume the worst
            return True
        if lo <= pointer < hi:
            return True
    return False


Piece = tuple[GroupBuffer, np.ndarray]  # (a group's rows in read order, indices into them)


class Loader:
    """Iterates batches (float arrays [batch, source.row_width] in the stored dtype) from
    `start_batch`.

    With `n_slices` > 1 the training rows are cut into that many contiguous slices, each
    with its own shuffled stream, and a batch is the concatenation of batch/n_slices rows
    from each; `slices` picks which of them this loader reads (a process reads only its own).

    One producer thread plans batches as index lists into the groups it has read. A group's
    blocks are read straight into a reused group buffer (all of its reads in flight at
    once, which is what object storage's latency needs; TensorStore's own
    `gcs_request_concurrency` / `s3_request_concurrency`, 32 by default, bounds the
    requests), and the next group's reads start as soon as the current group's first batch
    is planned. A pool of `data.loader_threads` gathers each batch's rows into a reused
    batch array (`np.take(out=...)` releases the GIL) and hands it to `transform` (the
    device transfer: asynchronous; the array is reused only once it is complete), in order.
    Memory: two group buffers (`data.shuffle_bytes`) and about prefetch + threads + 3
    batches (`data.prefetch_bytes`).
    """

    def __init__(
        self,
        source: ArraySource,
        cfg: DataConfig,
        batch_size: int,
        start_batch: int = 0,
        transform: Callable[[np.ndarray], object] | None = None,
        n_slices: int = 1,
        slices: list[int] | None = None,
    ):
        self.source, self.cfg = source, cfg
        split = split_rows(source.n_rows, cfg.validation_tokens, source.store)
        row_bytes = source.row_width * source.dtype.itemsize
        blocks = shuffle_blocks(cfg, row_bytes)
        if n_slices == 1:
            self.plans = [BatchPlan(split.train_rows, batch_size, cfg.block_rows, blocks, cfg.seed)]
        else:
            per = split.train_rows // n_slices
            self.plans = [
                BatchPlan(
                    per,
                    batch_size // n_slices,
                    cfg.block_rows,
                    blocks,
                    cfg.seed,
                    row_offset=s * per,
                    stream=s,
                )
                for s in (range(n_slices) if slices is None else slices)
            ]
        self.plan = self.plans[0]
        self.batch_rows = sum(p.batch_size for p in self.plans)
        self.start_batch = start_batch
        self.transform = transform or (lambda b: b)
        self.threads = cfg.loader_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.prefetch = prefetch_batches(cfg, self.batch_rows * row_bytes)
        self._ring = [BatchSlot() for _ in range(self.prefetch + self.threads + 3)]
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _start_group(self, plan: BatchPlan, epoch: int, group: int, buffer: GroupBuffer):
        """Issue the reads of one shuffle group into `buffer`; `_finish_group` waits on them."""
        reads, at = [], 0
        for block in plan.groups(epoch)[group]:
            start, stop = plan.block_range(block)
            first = plan.row_offset + start
            into = buffer.array[at : at + stop - start]
            reads.append((first, into, self.source.read_into(first, first + stop - start, into)))
            at += stop - start
        return buffer, at, reads

    def _finish_group(self, pending) -> tuple[GroupBuffer, int]:
        buffer, n_rows, reads = pending
        for first, rows, wait in reads:
            wait()
            check_finite(rows, first, self.source.path)
        return buffer, n_rows

    def _plan_batches(self, plan: BatchPlan) -> Iterator[list[Piece]]:
        """Each batch as pieces of shuffled groups: the rows of a group are taken in the
        order of its permutation, and a batch may run on from one group into the next.
        A yielded batch is handed to the gather threads before this generator resumes."""
        group_rows = min(plan.shuffle_blocks * plan.block_rows, plan.train_rows)
        buffers = GroupBuffers(group_rows, self.source.row_width, self.source.dtype)
        epoch, group, offset = plan.locate(self.start_batch)
        pending = self._start_group(plan, epoch, group, buffers.acquire([]))
        try:
            pieces, have = [], 0
            while not self._stop.is_set():
                buffer, n_rows = self._finish_group(pending)
                order = plan.row_permutation(epoch, group, n_rows)[offset:]
                offset = 0
                epoch, group = (
                    (epoch, group + 1) if group + 1 < len(plan.groups(epoch)) else (epoch + 1, 0)
                )
                pending = None
                at = 0
                while at < len(order):
                    n = min(plan.batch_size - have, len(order) - at)
                    buffer.hold()
                    pieces.append((buffer, order[at : at + n]))
                    have, at = have + n, at + n
                    if have == plan.batch_size:
                        yield pieces
                        pieces, have = [], 0
                        if pending is None:  # read ahead while this group is served
                            pending = self._start_group(
                                plan, epoch, group, buffers.acquire([buffer])
                            )
                if pending is None:  # this group did not fill a batch: its rows are still needed
                    busy = [buffer] + [b for b, _ in pieces]
                    pending = self._start_group(plan, epoch, group, buffers.acquire(busy))
        finally:  # closed or failed: let the reads in flight finish, never abandon them
            self._settle(pending)

    def _settle(self, pending) -> None:
        """Wait for a group's reads whatever their outcome, so that no read is still writing
        into a group buffer once the loader has let go of it."""
        for _, _, wait in pending[2] if pending else ():
            try:
                wait()
            except Exception:  # noqa: BLE001 - only waiting; the error was or is not ours
                pass

    def _batches(self) -> Iterator[list[Piece]]:
        if len(self.plans) == 1:
            yield from self._plan_batches(self.plans[0])
            return
        for parts in zip(*(self._plan_batches(p) for p in self.plans)):
            yield [piece for part in parts for piece in part]

    def _make_batch(self, pieces: list[Piece], slot: BatchSlot):
        try:
            out = slot.take((self.batch_rows, self.source.row_width), self.source.dtype)
            at = 0
            for buffer, index in pieces:
                # mode="clip": the indices are in range, and "raise" would buffer the output
                np.take(buffer.array, index, axis=0, out=out[at : at + len(index)], mode="clip")
                at += len(index)
        finally:
            for buffer, _ in pieces:
                buffer.release()
        result = self.transform(out)
        slot.handed_out(result)
        return result

    def _put(self, item) -> None:
        """Queue an item, giving up when the loader is closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="saejax-loader") as pool:
                in_flight: collections.deque = collections.deque()
                for count, pieces in enumerate(self._batches()):
                    slot = self._ring[count % len(self._ring)]
                    in_flight.append(pool.submit(self._make_batch, pieces, slot))
                    if len(in_flight) > self.threads:  # the oldest batch goes out, in order
                        self._put(("batch", in_flight.popleft().result()))
                    if self._stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._queue.put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        kind, item = self._queue.get()
        if kind == "error":
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


def validation_rows(source: ArraySource, cfg: DataConfig, limit: int | None = None) -> np.ndarray:
    split = split_rows(source.n_rows, cfg.validation_tokens, source.store)
    stop = source.n_rows if limit is None else min(source.n_rows, split.train_rows + limit)
    rows = source.read(split.train_rows, stop)
    check_finite(rows, split.train_rows, source.path)
    return rows


def sample_rows(source: ArraySource, n: int, seed: int, train_rows: int) -> np.ndarray:
    """A seeded random sample of training rows (for b_dec and input-scale estimates)."""
    n = min(n, train_rows)
    idx = np.sort(np.random.default_rng([seed, 7]).choice(train_rows, n, replace=False))
    rows = source.take(idx).astype(np.float32)
    check_finite(rows, idx, source.path)
    return rows
