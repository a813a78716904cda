"""The activation store: the contract between `extract/` and the trainer.

A store is a directory (or a gs:// / s3:// prefix) holding

    meta.json      what was extracted, and `n_tokens`: how many rows are complete
    acts/<hook>    zarr3 [n_rows_allocated, d_in] activations, chunked along rows
    tokens         zarr3 int32 [n_rows_allocated] token id of each row
    doc            zarr3 int32 [n_rows_allocated, 2] (sequence index, position)

Arrays may be allocated beyond `n_tokens`; only the first `n_tokens` rows are
valid. `meta.json` is replaced atomically, and only after the rows it counts are
flushed, so a reader never sees a torn row and a writer can resume from it.

A store written by extraction workers (extract/workers.py) holds no arrays of its own: its
meta.json (layout "worker-parts") lists parts, each an ordinary store under parts/, and
`ActivationStore.open` returns a `PartedStore` that reads their rows concatenated in order
(see its docstring for which rows count).

This module needs NumPy and TensorStore only (no JAX, no torch).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tensorstore as ts

from saejax.errors import SaejaxError
from saejax.io import json_text, write_text

STORE_FORMAT_VERSION = 1
PARTS_LAYOUT = "worker-parts"  # top meta.json of a store written by extraction workers
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def is_remote(path: str) -> bool:
    return path.startswith(("gs://", "s3://"))


REMOTE_MAX_DELAY = "4s"


def remote_retries() -> int:
    """How often each object-storage request is retried (with backoff up to REMOTE_MAX_DELAY)
    before it fails: a missing endpoint is one error line in seconds, not a silent wait.
    SAEJAX_REMOTE_RETRIES overrides the default 5."""
    return int(os.environ.get("SAEJAX_REMOTE_RETRIES", "5"))


def kvstore_spec(path: str) -> dict:
    """The TensorStore kvstore spec for a local directory or a bucket prefix.

    Buckets are reached the way their own tools are configured: GCS through Google's
    application-default credentials (TensorStore's `TENSORSTORE_GCS_HTTP_URL` points it at an
    emulator); S3 through the AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    `AWS_REGION`), with `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for an S3-compatible
    server (MinIO, R2, a local test server)."""
    for scheme, driver in (("gs://", "gcs"), ("s3://", "s3")):
        if path.startswith(scheme):
            bucket, _, prefix = path[len(scheme) :].partition("/")
            retries = {"max_retries": remote_retries(), "max_delay": REMOTE_MAX_DELAY}
            spec = {
                "driver": driver,
                "bucket": bucket,
                "path": prefix.rstrip("/") + "/",
                "context": {f"{driver}_request_retries": retries},
            }
            if driver == "s3":
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                    "AWS_ENDPOINT_URL"
                )
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if endpoint:
                    spec["endpoint"] = endpoint
                if region:
                    spec["aws_region"] = region
            return spec
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def remote_failure(path: str, error: Exception) -> SaejaxError:
    """One line for an object-storage request that failed: which store and why, in words."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "NoSuchBucket" in text or ("NOT_FOUND" in text and "404" in text):
        reason = "the bucket does not exist (or these credentials cannot see it)"
    elif any(w in text for w in ("retry attempts failed", "UNAVAILABLE", "Could not connect")):
        reason = f"its endpoint cannot be reached (gave up after {remote_retries()} retries)"
    elif any(w in text for w in ("PERMISSION_DENIED", "UNAUTHENTICATED", "403", "401")):
        reason = "the credentials were refused"
    else:
        reason = text[:300]
    return SaejaxError(f"store {path}: {reason}")


def probe_remote(path: str) -> None:
    """Write and delete a small object under `path`: a missing bucket, refused credentials
    or an unreachable endpoint fail here, before a model is loaded or anything is written."""
    try:
        kv = ts.KvStore.open(kvstore_spec(path)).result()
        kv.write(".saejax-write-probe", b"").result()
        kv.write(".saejax-write-probe", None).result()  # None deletes
    except ValueError as e:
        raise remote_failure(path, e) from None


def _join(spec: dict, sub: str) -> dict:
    return {**spec, "path": spec["path"] + sub}


def read_meta(path: str) -> dict | None:
    """meta.json of the store at `path`, or None when there is none."""
    if not is_remote(path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            return None
        with open(meta_path) as f:
            text = f.read()
    else:
        try:
            result = ts.KvStore.open(kvstore_spec(path)).result().read("meta.json").result()
        except ValueError as e:
            raise remote_failure(path, e) from None
        if result.state != "value":
            return None
        text = bytes(result.value).decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SaejaxError(f"{path}/meta.json is corrupt ({e}); the store cannot be read") from None


def write_meta(path: str, meta: dict) -> None:
    """Replace meta.json atomically (a local file is fsynced before the rename)."""
    text = json_text(meta, indent=2, sort_keys=True)
    if is_remote(path):
        try:  # object writes are atomic
            ts.KvStore.open(kvstore_spec(path)).result().write("meta.json", text.encode()).result()
        except ValueError as e:
            raise remote_failure(path, e) from None
        return
    write_text(os.path.join(path, "meta.json"), text, fsync=True)


def _array_spec(path: str, name: str, write: bool = False) -> dict:
    """Readers never see a missing chunk as zeros (the arrays' fill value); writers store
    every chunk, even one equal to the fill value, so a missing chunk always means damage."""
    spec = {"driver": "zarr3", "kvstore": _join(kvstore_spec(path), name)}
    if write:
        spec["store_data_equal_to_fill_value"] = True
    else:
        spec["fill_missing_data_reads"] = False
    return spec


def create_array(path: str, name: str, shape: list[int], chunk_shape: list[int], dtype: str):
    """Create one zarr3 array of the store, or reopen it and grow it to at least `shape`."""
    try:
        existing = ts.open(
            _array_spec(path, name, write=True), open=True, read=True, write=True
        ).result()
    except ValueError:
        existing = None
    if existing is not None:
        if list(existing.shape[1:]) != list(shape[1:]) or existing.dtype.name != dtype:
            raise SaejaxError(
                f"store {path}: array '{name}' has shape {list(existing.shape)} "
                f"{existing.dtype.name}, expected [*, {shape[1:]}] {dtype}"
            )
        if existing.shape[0] < shape[0]:
            existing = existing.resize(exclusive_max=shape, expand_only=True).result()
        return existing
    spec = _array_spec(path, name, write=True)
    spec["metadata"] = {
        "shape": shape,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
        "chunk_key_encoding": {"name": "default"},
        "data_type": dtype,
        "fill_value": 0,
        # crc32c: every chunk carries its checksum, so a damaged chunk fails to read
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    }
    try:
        return ts.open(spec, create=True, open=True).result()
    except ValueError as e:
        if is_remote(path):
            raise remote_failure(path, e) from None
        raise


def new_meta(
    model: str, hook_d_in: dict[str, int], dtype: str, context_size: int, chunk_rows: int, **fields
) -> dict:
    """meta.json of a new, empty store (every writer of stores builds it here). `fields` adds
    what the writer knows besides: revision, corpus, BOS handling, tokenizer ids, ..."""
    hooks = list(hook_d_in)
    return {
        "format_version": STORE_FORMAT_VERSION,
        "model": model,
        "hooks": hooks,
        "hook_d_in": dict(hook_d_in),
        "d_in": int(hook_d_in[hooks[0]]),
        "dtype": dtype,
        "context_size": context_size,
        "chunk_rows": chunk_rows,
        "prepend_bos": False,
        "bos_dropped": False,
        "n_tokens": 0,
        **fields,
    }


def create_arrays(path: str, meta: dict, capacity: int):
    """({hook: acts array}, tokens, doc): the store's arrays with room for `capacity` rows,
    created or reopened and grown (extraction resumes and grows stores through this)."""
    chunk = int(meta["chunk_rows"])
    acts = {
        hook: create_array(path, hook_array_name(hook), [capacity, d], [chunk, d], meta["dtype"])
        for hook, d in meta["hook_d_in"].items()
    }
    tokens = create_array(path, "tokens", [capacity], [chunk], "int32")
    doc = create_array(path, "doc", [capacity, 2], [chunk, 2], "int32")
    return acts, tokens, doc


def open_array(path: str, name: str, write: bool = False):
    try:
        return ts.open(_array_spec(path, name, write), read=True, write=write).result()
    except ValueError as e:
        raise SaejaxError(f"store {path}: array '{name}' is missing or unreadable ({e})") from None


def hook_array_name(hook: str) -> str:
    return f"acts/{hook}"


# Exponent bits of each float format: a value is NaN or Inf exactly when they are all set.
_EXPONENT_MASKS = {
    "bfloat16": (np.uint16, 0x7F80),
    "float16": (np.uint16, 0x7C00),
    "float32": (np.uint32, 0x7F800000),
    "float64": (np.uint64, 0x7FF0000000000000),
}


def nonfinite_rows(rows: np.ndarray) -> np.ndarray:
    """Boolean [n]: which rows hold a NaN or Inf. Tests the exponent bits as integers: no
    float32 copy of bfloat16 rows, ≈ 1.9× the rows/s of `np.isfinite` on one (8,192-row read
    blocks, benchmarks/bench_loader.py); the loader runs this on every row it reads."""
    mask = _EXPONENT_MASKS.get(rows.dtype.name)
    if mask is None:
        return ~np.isfinite(rows.astype(np.float32, copy=False)).all(axis=1)
    int_type, bits = mask
    exponent = rows.view(int_type) & int_type(bits)  # a same-size view: any strides
    return (exponent == int_type(bits)).any(axis=1)


def any_nonfinite(rows: np.ndarray) -> bool:
    """Whether any value is NaN or Inf: the largest masked exponent, taken over slices of
    about 1 MiB so the masked copy stays in cache and no per-row array is made (≈ 4.7x the
    rows/s of `nonfinite_rows` on an 8,192-row bfloat16 block at d_in 4096)."""
    mask = _EXPONENT_MASKS.get(rows.dtype.name)
    if mask is None or rows.ndim != 2 or not len(rows):
        return bool(len(rows)) and bool(nonfinite_rows(rows).any())
    int_type, bits = mask
    values = rows.view(int_type)
    step = max(1, (1 << 20) // max(1, values.strides[0]))
    scratch = np.empty((min(step, len(values)), values.shape[1]), int_type)
    for lo in range(0, len(values), step):
        part = values[lo : lo + step]
        masked = np.bitwise_and(part, int_type(bits), out=scratch[: len(part)])
        if masked.max() == bits:
            return True
    return False


def check_finite(rows: np.ndarray, first_row, path: str) -> None:
    """Raise with the row number of the first non-finite row. `first_row` is the row number
    of rows[0] (contiguous rows) or an array with the row number of every row."""
    if not any_nonfinite(rows):
        return
    bad = nonfinite_rows(rows)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        bad_row = int(first_row[i]) if isinstance(first_row, np.ndarray) else first_row + i
        raise SaejaxError(
            f"row {bad_row} of {path} contains NaN or Inf; fix or re-extract the data"
        )


@dataclass
class IntegrityReport:
    n_tokens: int
    mean_norm: dict[str, float]
    bad_rows: dict[str, list[int]]  # first few non-finite rows per hook
    bad_chunks: list  # BadChunk: missing or damaged chunks
    checksummed: bool = True  # chunks carry crc32c checksums

    @property
    def ok(self) -> bool:
        return not any(self.bad_rows.values()) and not self.bad_chunks


def _failure_reason(text: str) -> str:
    if "is missing" in text:
        return "the chunk is missing"
    if "Digest mismatch" in text or "Not enough data" in text or "DATA_LOSS" in text:
        return "the chunk is damaged (wrong length or checksum)"
    return "it cannot be read"


def read_failure(path: str, name: str, start: int, stop: int, chunk_rows: int, error) -> str:
    """One line saying which store, array and rows could not be read, and why."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    m = re.search(r"chunk \{(\d+)", text)
    if m:
        i = int(m.group(1))
        start, stop = i * chunk_rows, (i + 1) * chunk_rows
        what = f"chunk {i} (rows {start}..{stop - 1})"
    else:
        what = f"rows [{start}, {stop})"
    reason = _failure_reason(text)
    return (
        f"store {path}: {name} {what}: {reason} ({text}); run the same `saejax extract` "
        "again to repair it"
    )


class StoreRead:
    """A pending TensorStore read whose failure is one SaejaxError line, never a zero-filled
    array or a TensorStore traceback."""

    def __init__(self, future, store: ActivationStore, name: str, start: int, stop: int):
        self.future, self.store, self.name, self.start, self.stop = future, store, name, start, stop

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> np.ndarray:
        try:
            return self.future.result()
        except ValueError as e:
            raise SaejaxError(
                self.store.read_failure(self.name, self.start, self.stop, e)
            ) from None


@dataclass
class BadChunk:
    array: str  # "acts/<hook>", "tokens" or "doc"
    index: int  # chunk number along rows
    start: int  # first row
    stop: int  # one past the last row
    reason: str

    def describe(self) -> str:
        return (
            f"{self.array} chunk {self.index} (rows {self.start}..{self.stop - 1}): {self.reason}"
        )


class ActivationStore:
    """Read-only view of a store: rows, slices, chunked iteration and token contexts."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.meta = meta
        self._acts = {}
        self._tokens = None
        self._doc = None

    @classmethod
    def open(cls, path: str) -> ActivationStore:
        path = str(path)
        if not is_remote(path) and not os.path.isdir(path):
            raise SaejaxError(f"no activation store at {path} (not a directory)")
        meta = read_meta(path)
        if meta is None:
            raise SaejaxError(f"{path} is not an activation store (no meta.json)")
        if meta.get("layout") == PARTS_LAYOUT:
            return PartedStore.from_top(path, meta)
        for key in ("hooks", "d_in", "dtype", "n_tokens"):
            if key not in meta:
                raise SaejaxError(f"{path}/meta.json lacks '{key}'; the store is corrupt")
        return cls(path, meta)

    # ---- shape ---------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_tokens(self) -> int:
        return len(self)

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def d_in(self) -> int:
        """Width of the first hook (all hooks of a residual-stream store share it)."""
        return int(self.meta["d_in"])

    def d_in_of(self, hook: str | None = None) -> int:
        hook = self.default_hook(hook)
        return int((self.meta.get("hook_d_in") or {}).get(hook, self.meta["d_in"]))

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def chunk_rows(self) -> int:
        return int(self.meta.get("chunk_rows", 4096))

    def default_hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hooks) != 1:
                raise SaejaxError(f"store {self.path} has hooks {self.hooks}; name one (data.hook)")
            return self.hooks[0]
        if hook not in self.hooks:
            raise SaejaxError(f"store {self.path} has no hook '{hook}'; it has {self.hooks}")
        return hook

    # ---- arrays --------------------------------------------------------------
    def _open(self, name: str):
        """The array `name` over this store's rows (a store of worker parts concatenates)."""
        return open_array(self.path, name)

    def read_failure(self, name: str, start: int, stop: int, error) -> str:
        """The one line a failed read of rows [start, stop) of array `name` raises."""
        return read_failure(self.path, name, start, stop, self.chunk_rows, error)

    def acts_array(self, hook: str | None = None):
        hook = self.default_hook(hook)
        if hook not in self._acts:
            arr = self._open(hook_array_name(hook))
            if arr.shape[0] < len(self) or arr.shape[1] != self.d_in_of(hook):
                raise SaejaxError(
                    f"store {self.path}: acts/{hook} has shape {list(arr.shape)} but meta.json "
                    f"counts {len(self)} rows of width {self.d_in_of(hook)}; the store is corrupt"
                )
            self._acts[hook] = arr
        return self._acts[hook]

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise SaejaxError(f"rows [{start}, {stop}) are outside the store's {len(self)} rows")

    def read(self, start: int, stop: int, hook: str | None = None) -> np.ndarray:
        """Rows [start, stop) in the stored dtype."""
        return self.read_async(start, stop, hook).result()

    def read_async(self, start: int, stop: int, hook: str | None = None) -> StoreRead:
        """A pending read of rows [start, stop) (`.result()` gives them): lets loaders
        overlap reads."""
        self._check_range(start, stop)
        hook = self.default_hook(hook)
        name = hook_array_name(hook)
        return StoreRead(self.acts_array(hook)[start:stop].read(), self, name, start, stop)

    def read_into(self, start: int, stop: int, out: np.ndarray, hook: str | None = None):
        """A pending read of rows [start, stop) written straight into `out` (a NumPy view
        [stop - start, d_in] in the stored dtype, strides allowed): the loader reuses its
        buffers instead of allocating, filling and concatenating a new array per read.
        `.result()` waits (and raises the one-line error a failed read gives)."""
        self._check_range(start, stop)
        hook = self.default_hook(hook)
        target = ts.array(out, copy=False, write=True)
        rows = self.acts_array(hook)[start:stop].translate_to[0, 0]
        return StoreRead(target.write(rows), self, hook_array_name(hook), start, stop)

    def take(self, rows, hook: str | None = None) -> np.ndarray:
        """The given rows (any order), in the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise SaejaxError(f"row indices outside the store's {len(self)} rows")
        hook = self.default_hook(hook)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((rows.size, self.d_in_of(hook)), dtype=DTYPES[self.dtype])
        first, last = (int(sorted_rows[0]), int(sorted_rows[-1]) + 1) if rows.size else (0, 0)
        future = self.acts_array(hook)[sorted_rows].read()
        out[order] = StoreRead(future, self, hook_array_name(hook), first, last).result()
        return out

    def iter_chunks(
        self,
        chunk_rows: int | None = None,
        hook: str | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first_row, rows) over [start, stop) in chunks, reading one chunk ahead."""
        chunk_rows = chunk_rows or self.chunk_rows
        stop = len(self) if stop is None else stop
        self._check_range(start, stop)
        bounds = [(s, min(s + chunk_rows, stop)) for s in range(start, stop, chunk_rows)]
        pending = self.read_async(*bounds[0], hook) if bounds else None
        for i, (s, _) in enumerate(bounds):
            current = pending.result()
            if i + 1 < len(bounds):
                pending = self.read_async(*bounds[i + 1], hook)
            yield s, current

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = len(self) if stop is None else stop
        self._check_range(start, stop)
        if self._tokens is None:
            self._tokens = self._open("tokens")
        return StoreRead(self._tokens[start:stop].read(), self, "tokens", start, stop).result()

    def doc(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(sequence index, position in the context) of rows [start, stop)."""
        stop = len(self) if stop is None else stop
        self._check_range(start, stop)
        if self._doc is None:
            self._doc = self._open("doc")
        return StoreRead(self._doc[start:stop].read(), self, "doc", start, stop).result()

    def context(self, row: int, before: int = 16, after: int = 4) -> tuple[np.ndarray, int]:
        """Token ids around `row` within its own sequence, and the row's index in them.

        Rows of one sequence are contiguous in the store, so this reads a small window.
        """
        self._check_range(row, row + 1)
        lo, hi = max(0, row - before), min(len(self), row + after + 1)
        doc = self.doc(lo, hi)
        toks = self.tokens(lo, hi)
        same = doc[:, 0] == doc[row - lo, 0]
        return toks[same], int(np.sum(same[: row - lo]))

    def sequence_input(self, sequence: int, near_row: int) -> np.ndarray:
        """The exact model input of one sequence (BOS restored when it was dropped)."""
        ctx = int(self.meta["context_size"])
        lo, hi = max(0, near_row - ctx), min(len(self), near_row + ctx)
        doc, toks = self.doc(lo, hi), self.tokens(lo, hi)
        mine = doc[:, 0] == sequence
        ids = toks[mine][np.argsort(doc[mine, 1])]
        if self.meta.get("prepend_bos") and self.meta.get("bos_dropped", True):
            ids = np.concatenate([[self.meta["bos_token_id"]], ids]).astype(np.int32)
        return ids

    # ---- checks --------------------------------------------------------------
    def chunks(
        self, name: str, window: int = 8
    ) -> Iterator[tuple[int, np.ndarray | None, BadChunk | None]]:
        """(first row, rows or None, BadChunk or None) for each stored chunk of array `name`
        that holds counted rows, read `window` chunks ahead; a chunk that is missing or
        fails its checksum is reported, not raised."""
        arr = open_array(self.path, name)
        if arr.shape[0] < len(self):
            raise SaejaxError(
                f"store {self.path}: {name} has {arr.shape[0]} rows but meta.json counts "
                f"{len(self)}; the store is corrupt"
            )
        c, n = int(arr.chunk_layout.read_chunk.shape[0]), len(self)
        bounds = [(i, i * c, min((i + 1) * c, n)) for i in range(math.ceil(n / c))]
        pending = collections.deque()
        for j in range(len(bounds) + window):
            if j < len(bounds):
                i, lo, hi = bounds[j]
                pending.append((i, lo, hi, arr[lo:hi].read()))
            if len(pending) > window or (j >= len(bounds) and pending):
                i, lo, hi, future = pending.popleft()
                try:
                    yield lo, future.result(), None
                except ValueError as e:
                    yield lo, None, BadChunk(name, i, lo, hi, _failure_reason(str(e)))

    def check(self, max_bad: int = 10, verify: bool = False) -> IntegrityReport:
        """Read every counted row of every hook and the tokens: all chunks present and
        intact, all values finite, tokens in the vocabulary; recompute mean norms.
        `verify` also reads the doc array, so every chunk of the store is checked."""
        mean_norm, bad_rows, bad_chunks = {}, {}, []
        for hook in self.hooks:
            total, bad = 0.0, []
            for first, rows, problem in self.chunks(hook_array_name(hook)):
                if problem is not None:
                    bad_chunks.append(problem)
                    continue
                finite = ~nonfinite_rows(rows)
                rows = rows.astype(np.float32)
                if not finite.all() and len(bad) < max_bad:
                    bad.extend((first + np.flatnonzero(~finite)[: max_bad - len(bad)]).tolist())
                total += float(np.linalg.norm(np.where(finite[:, None], rows, 0), axis=1).sum())
            mean_norm[hook] = total / max(1, len(self))
            bad_rows[hook] = bad
        vocab = self.meta.get("vocab_size")
        bad_tokens = []
        for first, toks, problem in self.chunks("tokens"):
            if problem is not None:
                bad_chunks.append(problem)
            elif vocab is not None and len(bad_tokens) < max_bad:
                wrong = first + np.flatnonzero((toks < 0) | (toks >= vocab))
                bad_tokens.extend(wrong[: max_bad - len(bad_tokens)].tolist())
        if bad_tokens:
            bad_rows["tokens"] = bad_tokens
        if verify:
            bad_chunks.extend(problem for _, _, problem in self.chunks("doc") if problem)
        return IntegrityReport(len(self), mean_norm, bad_rows, bad_chunks, self.checksummed())

    def checksummed(self) -> bool:
        """Whether the store's chunks carry crc32c checksums (stores made since they do)."""
        codecs = open_array(self.path, "tokens").codec.to_json().get("codecs", [])
        return any(c.get("name") == "crc32c" for c in codecs)

    def bad_chunk_indices(self) -> set[int]:
        """Chunk numbers (along rows) where any array has a missing or damaged chunk."""
        names = [hook_array_name(h) for h in self.hooks] + ["tokens", "doc"]
        return {p.index for name in names for _, _, p in self.chunks(name) if p is not None}


@dataclass
class Part:
    """One extraction worker's part of a store, as the whole store's meta.json lists it."""

    path: str  # the part's own store
    name: str  # its folder within the store: parts/<segment>/worker-<i>-of-<n>
    worker: int
    workers: int
    contexts: tuple[int, int]  # the corpus's contexts first..stop-1
    target: int  # rows the part holds when complete
    meta: dict | None  # the part's meta.json; None until its worker begins
    complete: bool


def part_path(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name if is_remote(path) else os.path.join(path, name)


def read_parts(path: str, top: dict) -> list[Part]:
    """Every part of a store written by extraction workers, in row order."""
    if not isinstance(top.get("segments"), list) or "target_tokens" not in top:
        raise SaejaxError(f"{path}/meta.json lists no worker parts; the store is corrupt")
    parts = []
    for segment in top["segments"]:
        for worker, p in enumerate(segment["parts"]):
            where = part_path(path, p["path"])
            meta = read_meta(where) if p["rows"] else None
            rows = int(meta["n_tokens"]) if meta else 0
            complete = p["rows"] == 0 or bool(
                meta
                and meta.get("complete")
                and (rows >= p["rows"] or meta.get("corpus_exhausted"))
            )
            parts.append(
                Part(
                    where,
                    p["path"],
                    worker,
                    int(segment["workers"]),
                    tuple(p["contexts"]),
                    int(p["rows"]),
                    meta,
                    complete,
                )
            )
    return parts


class PartedStore(ActivationStore):
    """A store written by extraction workers, read as one dataset.

    Each worker writes an ordinary store under parts/<segment>/worker-<i>-of-<n>/ holding a
    contiguous range of the corpus's contexts; the top meta.json (layout "worker-parts")
    lists the parts in corpus order. Rows are the parts' rows concatenated in that order,
    which is exactly the row order of a one-process extraction. What counts is the longest
    prefix of that order whose rows are written: every part up to the first incomplete one,
    plus that part's counted rows, cut at the store's target. So a store some workers are
    still writing reads (and trains) like a one-process store that is still being written,
    and a later part's rows appear once every part before it is complete. The arrays are
    TensorStore virtual concatenations (`ts.concat`) of the parts' counted rows.
    """

    def __init__(self, path: str, meta: dict, pieces: list[tuple[Part, int]]):
        super().__init__(path, meta)
        self.pieces = pieces  # (part, rows of it counted), in row order

    @classmethod
    def from_top(cls, path: str, top: dict) -> PartedStore:
        parts = read_parts(path, top)
        begun = [p for p in parts if p.meta is not None]
        if not begun:
            raise SaejaxError(
                f"store {path}: none of its {len(parts)} extraction worker parts has begun"
            )
        cap, total, pieces = int(top["target_tokens"]), 0, []
        for part in parts:
            take = min(int(part.meta["n_tokens"]) if part.meta else 0, cap - total)
            if take > 0:
                pieces.append((part, take))
                total += take
            if not part.complete or total >= cap:
                break
        meta = {k: v for k, v in begun[0].meta.items() if k != "context_range"}
        rows = sum(int(p.meta["n_tokens"]) for p, _ in pieces)
        norm = {
            h: sum(p.meta["norm_sum"][h] for p, _ in pieces) / max(1, rows)
            for h in meta.get("norm_sum", {})
        }
        complete = all(p.complete for p in parts)
        meta.update(
            layout=PARTS_LAYOUT,
            n_tokens=total,
            target_tokens=cap,
            complete=complete,
            corpus_exhausted=complete and total < cap,
            mean_norm=norm,
            norm_sum={h: v * total for h, v in norm.items()},
            parts=[
                {
                    "part": p.name,
                    "worker": p.worker,
                    "workers": p.workers,
                    "contexts": list(p.contexts),
                    "rows": int(p.meta["n_tokens"]) if p.meta else 0,
                    "target": p.target,
                    "complete": p.complete,
                }
                for p in parts
            ],
        )
        for key in ("hooks", "d_in", "dtype", "n_tokens"):
            if key not in meta:
                raise SaejaxError(f"{begun[0].path}/meta.json lacks '{key}'; the store is corrupt")
        return cls(path, meta, pieces)

    def _open(self, name: str):
        arrays = [open_array(part.path, name)[:rows] for part, rows in self.pieces]
        if arrays:
            return ts.concat(arrays, axis=0)
        width = {"tokens": (), "doc": (2,)}.get(name)
        if width is None:
            width, dtype = (self.d_in_of(name.removeprefix("acts/")),), DTYPES[self.dtype]
        else:
            dtype = np.int32
        return ts.array(np.zeros((0, *width), dtype))

    def read_failure(self, name: str, start: int, stop: int, error) -> str:
        """Names the part whose chunk failed, with that part's own row numbers."""
        for part, _ in self.pieces:
            if os.path.abspath(part.path) in str(error) or part.path in str(error):
                chunk_rows = int(part.meta.get("chunk_rows", self.chunk_rows))
                return read_failure(part.path, name, start, stop, chunk_rows, error)
        return read_failure(self.path, name, start, stop, self.chunk_rows, error)

    def chunks(self, name: str, window: int = 8):
        """Each counted part's chunks in turn, with row numbers of the whole store."""
        offset = 0
        for part, rows in self.pieces:
            own = ActivationStore(part.path, {**part.meta, "n_tokens": rows})
            for first, data, bad in own.chunks(name, window):
                if bad is not None:
                    bad = BadChunk(
                        bad.array,
                        bad.index,
                        bad.start + offset,
                        bad.stop + offset,
                        f"{bad.reason} (chunk {bad.index} of part {part.name})",
                    )
                yield first + offset, data, bad
            offset += rows

    def checksummed(self) -> bool:
        return all(ActivationStore(p.path, p.meta).checksummed() for p, _ in self.pieces)

    def bad_chunk_indices(self) -> set[int]:
        raise SaejaxError(
            f"store {self.path} is written by extraction workers; each worker repairs its own part"
        )


def describe(store: ActivationStore) -> str:
    """Human-readable summary for `saejax store info`."""
    m = store.meta
    size = (
        len(store)
        * np.dtype(DTYPES[store.dtype]).itemsize
        * sum(store.d_in_of(h) for h in store.hooks)
    )
    lines = [
        f"store        {store.path}",
        f"model        {m.get('model')} (revision {m.get('revision') or '-'})",
        f"hooks        {', '.join(store.hooks)}",
        f"rows         {len(store):,} complete (target {m.get('target_tokens', '?'):,})"
        if isinstance(m.get("target_tokens"), int)
        else f"rows         {len(store):,}",
        f"d_in         {store.d_in}   dtype {store.dtype}   size {size / 2**20:,.1f} MiB",
        f"context      {m.get('context_size')} tokens, prepend_bos={m.get('prepend_bos')}, "
        f"bos rows dropped={m.get('bos_dropped')}",
        f"corpus       {m.get('corpus')}",
    ]
    for hook, norm in (m.get("mean_norm") or {}).items():
        lines.append(f"mean norm    {hook}: " + ("not finite" if norm is None else f"{norm:.4g}"))
    for p in m.get("parts") or []:
        state = "complete" if p["complete"] else "in progress"
        first, stop = p["contexts"]
        span = f"contexts {first}..{stop - 1}" if stop > first else "no contexts"
        lines.append(
            f"worker {p['worker']}/{p['workers']}   {p['part']}: {p['rows']:,} of {p['target']:,} "
            f"rows, {span}, {state}"
        )
    if m.get("parts") and not m.get("complete"):
        lines.append(
            "note         rows shown: the parts before the first incomplete one, and its "
            "written rows; later parts show once it completes"
        )
    return "\n".join(lines)


def rows_per_chunk(context_rows: int, target_bytes: int, row_bytes: int) -> int:
    """A chunk holds whole sequences, about `target_bytes` of one hook's rows."""
    contexts = max(1, math.ceil(target_bytes / max(1, row_bytes * context_rows)))
    return contexts * context_rows
