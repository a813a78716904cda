"""`saejax extract`: language-model activations into a TensorStore store.

The loop runs the model (truncated after the deepest hook) on batches of packed
contexts, buffers rows into whole store chunks, and hands each chunk to
TensorStore as an asynchronous write, so the next forward pass overlaps the
I/O. `meta.json` advances only over the prefix of chunks whose writes have
completed, so a run killed at any moment resumes from the last complete chunk
and ends with exactly the rows an uninterrupted run writes.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from extract.corpus import open_corpus
from extract.hooks import Capture, hook_width, parse_hooks, validate_hooks
from extract.models import BUILTIN_MODEL, load_model, resolve_device, resolve_model_dtype
from extract.packing import first_stored_position, pack_contexts, stored_positions, token_stream
from saejax import store as st
from saejax.errors import SaejaxError, disk_full

# Fields that define a store: a resumed run must agree on all of them.
IDENTITY_KEYS = (
    "format_version",
    "model",
    "revision",
    "hooks",
    "hook_d_in",
    "dtype",
    "context_size",
    "prepend_bos",
    "bos_dropped",
    "skip_positions",
    "corpus",
    "chunk_rows",
)


@dataclass
class ExtractConfig:
    out: str
    model: str = BUILTIN_MODEL
    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    corpus: str = "builtin"
    split: str = "train"
    text_column: str = "text"
    tokens: int = 250_000
    context: int = 128
    batch_size: int = 16
    dtype: str = "bfloat16"
    prepend_bos: bool = True
    keep_bos: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    chunk_mib: float = 4.0
    device: str | None = None  # torch device; None: cuda when torch sees a GPU, else cpu
    model_dtype: str | None = None  # the model's weights; None: bfloat16 on a GPU, else float32
    batch_tokens: int | None = None  # tokens per forward; when set, replaces batch_size
    skip_positions: int = 0  # positions 0..N-1 of each context store no rows


def contexts_per_forward(cfg: ExtractConfig) -> int:
    """Contexts per forward pass: batch_tokens // context when batch_tokens is set."""
    return cfg.batch_tokens // cfg.context if cfg.batch_tokens else cfg.batch_size


class HostCopies:
    """One forward's captured activations on their way from the model's device to the host.

    With `pinned` (the model is on a CUDA GPU) each tensor is copied into a pinned host
    buffer with a non-blocking copy and an event is recorded behind the copies; the loop
    launches the next forward before it waits on the event, so this batch's transfer and
    store write overlap the next batch's compute. The buffers come from torch's caching
    host allocator, which hands a block out again only once the copies using it are done.
    Without `pinned` (CPU, MPS) it is a plain copy.
    """

    def __init__(self, captured: dict, pinned: bool = False):
        import torch

        self.event = None
        if pinned:
            self.tensors = {}
            for name, t in captured.items():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self.tensors[name] = host
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = {name: t.to("cpu") for name, t in captured.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """float32 arrays [batch, positions, width], once the copies are complete."""
        if self.event is not None:
            self.event.synchronize()
        return {name: t.float().numpy() for name, t in self.tensors.items()}


def _check_output_path(path: str) -> None:
    if st.is_remote(path):
        st.probe_remote(path)
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise SaejaxError(f"output {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and st.read_meta(path) is None:
        raise SaejaxError(f"output {path} is a non-empty directory that is not a saejax store")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    probe = path if os.path.isdir(path) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise SaejaxError(f"output {path} cannot be written (no write permission on {probe})")


def _validate_cheap(cfg: ExtractConfig) -> None:
    """Checks that need no model: fail in a second, not after loading weights."""
    check_request(cfg)
    _check_output_path(cfg.out)


def check_request(cfg: ExtractConfig) -> None:
    """The request's own settings (no model, no output folder): one line for a bad one."""
    if cfg.dtype not in st.DTYPES:
        raise SaejaxError(f"unknown dtype '{cfg.dtype}'; choose one of {', '.join(st.DTYPES)}")
    if cfg.tokens <= 0:
        raise SaejaxError(f"--tokens must be positive, got {cfg.tokens}")
    if cfg.context < 2:
        raise SaejaxError(f"--context must be at least 2, got {cfg.context}")
    if cfg.batch_size <= 0:
        raise SaejaxError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.batch_tokens is not None and cfg.batch_tokens < cfg.context:
        raise SaejaxError(
            f"--batch-tokens {cfg.batch_tokens} is less than one context ({cfg.context} tokens)"
        )
    if not 0 <= cfg.skip_positions < cfg.context:
        raise SaejaxError(
            f"--skip-positions must be at least 0 and less than --context {cfg.context}, "
            f"got {cfg.skip_positions}"
        )
    parse_hooks(cfg.hooks)


def _identity(
    cfg: ExtractConfig, loaded, hook_d_in: dict, chunk_rows: int, corpus_desc: str
) -> dict:
    """The new store's meta; its IDENTITY_KEYS must match to resume or grow a store."""
    return st.new_meta(
        loaded.model_id,
        hook_d_in,
        cfg.dtype,
        cfg.context,
        chunk_rows,
        revision=cfg.revision,
        prepend_bos=cfg.prepend_bos,
        bos_dropped=cfg.prepend_bos and not cfg.keep_bos,
        skip_positions=cfg.skip_positions,
        corpus=corpus_desc,
    )


def _check_compatible(path: str, existing: dict, wanted: dict) -> None:
    diffs = [
        f"{k}: store has {existing.get(k)!r}, this run asks {wanted[k]!r}"
        for k in IDENTITY_KEYS
        if existing.get(k, 0 if k == "skip_positions" else None) != wanted[k]
    ]
    if diffs:
        raise SaejaxError(
            f"store {path} was made with another configuration ({'; '.join(diffs)}); "
            "use a new --out or delete the old store"
        )


# ExtractConfig fields that change how fast rows are made, never what they hold
_EXECUTION_ONLY = ("out", "tokens", "device", "batch_size", "batch_tokens")


def _recorded_model_dtype(recorded: dict | None) -> str:
    """The model dtype a store was extracted with (stores from before the field: float32)."""
    return (recorded or {}).get("model_dtype") or "float32"


def _same_request(recorded: dict | None, cfg: ExtractConfig) -> bool:
    if not recorded:
        return False
    recorded = {**recorded, "model_dtype": _recorded_model_dtype(recorded)}
    wanted = asdict(cfg)
    return all(recorded.get(k) == v for k, v in wanted.items() if k not in _EXECUTION_ONLY)


def _check_model_dtype(path: str, done: dict | None, cfg: ExtractConfig) -> None:
    """A store is continued with the model in the dtype that began it (rows stay alike)."""
    if done is None or done.get("extract_config") is None:
        return
    was = _recorded_model_dtype(done["extract_config"])
    if was != cfg.model_dtype:
        raise SaejaxError(
            f"store {path} was extracted with the model in {was}; this run asks "
            f"{cfg.model_dtype} (pass --model-dtype {was} to continue it, or use a new --out)"
        )


def _resolve_devices(cfg: ExtractConfig, loaded) -> ExtractConfig:
    """cfg with its device and model dtype resolved (a given model's own, when one is given)."""
    if loaded is not None:
        for field_name, have in (("device", loaded.device), ("model_dtype", loaded.dtype)):
            asked = getattr(cfg, field_name)
            if asked is not None and asked != have:
                raise SaejaxError(f"{field_name} {asked} asked, but the given model is in {have}")
        return replace(cfg, device=loaded.device, model_dtype=loaded.dtype)
    device = resolve_device(cfg.device)
    return replace(cfg, device=device, model_dtype=resolve_model_dtype(cfg.model_dtype, device))


class _ChunkCommitter:
    """Tracks in-flight chunk writes; advances meta.json over the completed prefix."""

    def __init__(self, path: str, meta: dict, max_in_flight: int = 4):
        self.path, self.meta, self.max_in_flight = path, meta, max_in_flight
        self.pending: collections.deque = collections.deque()

    def submit(self, end_row: int, futures: list, norm_sums: dict) -> None:
        self.pending.append((end_row, futures, norm_sums))
        self.advance(block=len(self.pending) > self.max_in_flight)

    def advance(self, block: bool = False) -> None:
        committed = False
        while self.pending:
            end_row, futures, norm_sums = self.pending[0]
            if not block and not all(f.done() for f in futures):
                break
            for f in futures:
                f.result()  # re-raises I/O errors (disk full, permissions)
            self.pending.popleft()
            self.meta["n_tokens"] = end_row
            for hook, s in norm_sums.items():
                self.meta["norm_sum"][hook] += s
            block = False
            committed = True
        if committed:
            n = max(1, self.meta["n_tokens"])
            self.meta["mean_norm"] = {h: s / n for h, s in self.meta["norm_sum"].items()}
            st.write_meta(self.path, self.meta)

    def drain(self) -> None:
        while self.pending:
            self.advance(block=True)

    def settle(self) -> None:
        """After a failure: advance meta.json over the writes that completed, up to the first
        that failed (its rows and the later ones are written again on resume)."""
        try:
            self.drain()
        except Exception:  # that write failed; meta.json stays before it
            pass


def _out_of_space(cfg: ExtractConfig, meta: dict, error: BaseException) -> SaejaxError | None:
    """A write that failed for want of space, as one line saying what is kept."""
    failure = disk_full(error)
    if failure is None:
        return None
    return SaejaxError(
        f"cannot write to the store {cfg.out} ({failure.strerror}); its first "
        f"{int(meta.get('n_tokens', 0)):,} rows are kept: free some space and run the same command "
        "again to continue"
    )


def _damaged_chunks(path: str, meta: dict | None) -> set[int]:
    """Chunk numbers of an existing store where some array's chunk is missing or damaged
    (reads every chunk once: far cheaper than the model passes that made them)."""
    if not meta or not meta.get("n_tokens"):
        return set()
    return st.ActivationStore.open(path).bad_chunk_indices()


def _repair(cfg, meta, bad, contexts, capture, arrays, tokens_arr, doc_arr, drop_rows) -> None:
    """Re-extract exactly the rows of the chunks in `bad` and write them back.

    Contexts are deterministic and a context's rows start at index × rows_per_ctx, so the
    rows are found again; batches are formed as an uninterrupted run forms them (contexts
    b·batch_size onward), so the model sees the same batches and the rows come back bit for bit.
    """
    import torch

    c, n = int(meta["chunk_rows"]), int(meta["n_tokens"])
    rpc, bs = drop_rows["rows_per_ctx"], contexts_per_forward(cfg)
    first = drop_rows.get("first_ctx", 0)  # a worker's part starts at its first context
    spans = {i: (i * c, min((i + 1) * c, n)) for i in sorted(bad) if i * c < n}
    dtype = st.DTYPES[cfg.dtype]
    out = {
        i: (
            {h: np.zeros((hi - lo, arrays[h].shape[1]), dtype) for h in cfg.hooks},
            np.zeros(hi - lo, np.int32),
            np.zeros((hi - lo, 2), np.int32),
        )
        for i, (lo, hi) in spans.items()
    }
    wanted = {j for lo, hi in spans.values() for j in range(lo // rpc, (hi - 1) // rpc + 1)}
    wanted_batches = {j // bs for j in wanted}

    def run(batch) -> None:
        ids = torch.as_tensor(np.stack([ctx.ids for ctx in batch]))
        with torch.inference_mode():
            captured = capture.run(ids)
        for k, ctx in enumerate(batch):
            pos = stored_positions(ctx, drop_rows["drop_bos"], cfg.skip_positions)
            rows = (ctx.index - first) * rpc + np.arange(len(pos))
            for i, (lo, hi) in spans.items():
                sel = (rows >= lo) & (rows < hi)
                if not sel.any():
                    continue
                at, p = rows[sel] - lo, pos[sel]
                acts, toks, doc = out[i]
                for h in cfg.hooks:
                    acts[h][at] = captured[h][k, p].float().numpy().astype(dtype)
                toks[at] = ctx.ids[p].astype(np.int32)
                doc[at] = np.stack([np.full(len(p), ctx.index, np.int32), p.astype(np.int32)], 1)

    batch = []
    last = max(wanted_batches)
    for ctx in contexts:
        if ctx.index < first:
            continue
        if batch and (ctx.index - first) // bs != (batch[0].index - first) // bs:
            if (batch[0].index - first) // bs in wanted_batches:
                run(batch)
            batch = []
            if (ctx.index - first) // bs > last:
                break
        batch.append(ctx)
    if batch and (batch[0].index - first) // bs in wanted_batches:
        run(batch)
    futures = []
    for i, (lo, hi) in spans.items():
        acts, toks, doc = out[i]
        futures += [arrays[h][lo:hi].write(acts[h]).commit for h in cfg.hooks]
        futures += [tokens_arr[lo:hi].write(toks).commit, doc_arr[lo:hi].write(doc).commit]
    for f in futures:
        f.result()


def run_extract(
    cfg: ExtractConfig,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    loaded=None,
    context_range: tuple[int, int] | None = None,
) -> dict:
    """Extract (or resume extracting) activations into `cfg.out`; returns the final meta.

    `loaded` (a LoadedModel for `cfg.model`) skips loading the model again. The device and
    model dtype used are recorded in meta.json's extract_config. `context_range` (first,
    stop) extracts only the corpus's contexts first..stop-1 (an extraction worker's part,
    extract/workers.py): row 0 is context `first`'s first row, and `doc` keeps the corpus's
    own context index, so parts concatenated in order are the one-process store.
    """
    import torch

    _validate_cheap(cfg)
    cfg = _resolve_devices(cfg, loaded)
    done = st.read_meta(cfg.out)
    bad = _damaged_chunks(cfg.out, done)
    _check_model_dtype(cfg.out, done, cfg)
    if (
        done
        and not bad
        and done.get("complete")
        and _same_request(done.get("extract_config"), cfg)
        and (done["n_tokens"] >= cfg.tokens or done.get("corpus_exhausted"))
    ):
        return done  # already finished with these arguments: no need to load the model
    corpus = open_corpus(cfg.corpus, cfg.split, cfg.text_column)
    loaded = loaded or load_model(
        cfg.model, cfg.revision, cfg.trust_remote_code, dtype=cfg.model_dtype, device=cfg.device
    )
    model, tok = loaded.model, loaded.tokenizer
    points = parse_hooks(cfg.hooks)
    validate_hooks(points, model)
    if loaded.max_context is not None and cfg.context > loaded.max_context:
        raise SaejaxError(
            f"--context {cfg.context} is longer than the model allows "
            f"({loaded.max_context} positions)"
        )
    if cfg.prepend_bos and tok.bos_token_id is None:
        raise SaejaxError("the tokenizer has no BOS token; pass --no-prepend-bos")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    hook_d_in = {p.name: hook_width(p, model) for p in points}
    item = np.dtype(st.DTYPES[cfg.dtype]).itemsize
    drop_bos = cfg.prepend_bos and not cfg.keep_bos
    rows_per_ctx = cfg.context - first_stored_position(drop_bos, cfg.skip_positions)
    chunk_rows = st.rows_per_chunk(
        rows_per_ctx, int(cfg.chunk_mib * 2**20), max(hook_d_in.values()) * item
    )
    identity = _identity(cfg, loaded, hook_d_in, chunk_rows, corpus.description)

    def new_contexts():
        return pack_contexts(
            token_stream(corpus.documents(), tok),
            cfg.context,
            cfg.prepend_bos,
            tok.bos_token_id,
            pad_id,
        )

    contexts = new_contexts()
    first = next(contexts, None)
    if first is None:
        raise SaejaxError(f"corpus '{cfg.corpus}' contains no text to extract")
    contexts = itertools.chain([first], contexts)

    existing = st.read_meta(cfg.out)
    if existing is not None:
        _check_compatible(cfg.out, existing, identity)
        meta = existing
        finished = meta["n_tokens"] >= cfg.tokens or (
            meta.get("complete") and meta.get("corpus_exhausted")
        )
        if finished and not bad:
            return meta
        if not finished:
            meta["target_tokens"] = cfg.tokens
            meta["complete"] = False
    else:
        try:
            os.makedirs(cfg.out, exist_ok=True) if not st.is_remote(cfg.out) else None
        except OSError as e:
            raise SaejaxError(f"output {cfg.out} cannot be created: {e.strerror}") from None
        meta = {
            **identity,
            "target_tokens": cfg.tokens,
            "complete": False,
            "tokenizer": loaded.model_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": pad_id,
            "vocab_size": int(model.config.vocab_size),
            "norm_sum": {h: 0.0 for h in cfg.hooks},
            "mean_norm": {h: 0.0 for h in cfg.hooks},
            "extract_config": asdict(cfg),
        }
        if context_range is not None:
            meta["context_range"] = list(context_range)
        st.write_meta(cfg.out, meta)  # meta first: a crash after this leaves a resumable store

    capacity = math.ceil(cfg.tokens / chunk_rows) * chunk_rows
    try:
        arrays, tokens_arr, doc_arr = st.create_arrays(cfg.out, identity, capacity)
    except ValueError as e:
        raise _out_of_space(cfg, meta, e) or SaejaxError(
            f"cannot create the arrays of store {cfg.out}: {e}"
        ) from None
    first_ctx = context_range[0] if context_range is not None else 0
    drop_rows = {"drop_bos": drop_bos, "rows_per_ctx": rows_per_ctx, "first_ctx": first_ctx}
    if bad:
        if progress:
            print(
                f"repairing {len(bad)} missing or damaged chunk(s) of {cfg.out}: "
                "re-extracting their rows",
                file=sys.stderr,
            )
        with Capture(model, points) as capture:
            _repair(cfg, meta, bad, new_contexts(), capture, arrays, tokens_arr, doc_arr, drop_rows)
        if existing is not None and finished:
            return meta

    start_row = int(meta["n_tokens"])
    start_ctx, skip_rows = divmod(start_row, rows_per_ctx)
    start_ctx += first_ctx
    committer = _ChunkCommitter(cfg.out, meta)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.tokens,
            initial=start_row,
            unit="tok",
            unit_scale=True,
            desc="extract",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15,
        )

    buffers = {h: [] for h in cfg.hooks}
    buf_tokens, buf_doc = [], []
    buffered = 0
    next_row = start_row  # first row not yet handed to a write
    chunks_written = 0
    delay = float(os.environ.get("SAEJAX_TEST_CHUNK_DELAY_S", "0"))  # tests: widen the kill window

    def flush(n_rows: int) -> None:
        nonlocal buffered, next_row, chunks_written
        futures, norm_sums = [], {}
        for h in cfg.hooks:
            block = np.concatenate(buffers[h])
            chunk, rest = block[:n_rows], block[n_rows:]
            buffers[h] = [rest] if len(rest) else []
            futures.append(arrays[h][next_row : next_row + n_rows].write(chunk).commit)
            norm_sums[h] = float(
                np.linalg.norm(chunk.astype(np.float32), axis=1).astype(np.float64).sum()
            )
        for arr, bufs in ((tokens_arr, buf_tokens), (doc_arr, buf_doc)):
            block = np.concatenate(bufs)
            bufs[:] = [block[n_rows:]] if len(block) > n_rows else []
            futures.append(arr[next_row : next_row + n_rows].write(block[:n_rows]).commit)
        next_row += n_rows
        buffered -= n_rows
        committer.submit(next_row, futures, norm_sums)
        chunks_written += 1
        if bar is not None:
            bar.update(n_rows)
        if delay:
            time.sleep(delay)
        if on_chunk is not None:
            on_chunk(chunks_written)

    def boundary_after(row: int) -> int:
        return min((row // chunk_rows + 1) * chunk_rows, cfg.tokens)

    planned = start_row  # rows claimed by the batches run so far, consumed or pending
    pending = None  # the last batch run: (its rows, its activations on their way to the host)
    pinned = loaded.device.startswith("cuda")

    def plan(batch) -> list:
        """(index in batch, context, positions) of the rows a batch adds, in store order."""
        nonlocal skip_rows, planned
        rows = []
        for i, ctx in enumerate(batch):
            pos = stored_positions(ctx, drop_bos, cfg.skip_positions)
            if skip_rows:
                pos, skip_rows = pos[skip_rows:], 0
            pos = pos[: max(0, cfg.tokens - planned)]
            if len(pos):
                rows.append((i, ctx, pos))
                planned += len(pos)
        return rows

    def consume(rows, copies) -> None:
        nonlocal buffered
        acts = copies.arrays()
        for i, ctx, pos in rows:
            for h in cfg.hooks:
                buffers[h].append(acts[h][i, pos].astype(st.DTYPES[cfg.dtype]))
            buf_tokens.append(ctx.ids[pos].astype(np.int32))
            n = len(pos)
            buf_doc.append(np.stack([np.full(n, ctx.index, np.int32), pos.astype(np.int32)], 1))
            buffered += n
        while buffered and next_row + buffered >= boundary_after(next_row):
            flush(boundary_after(next_row) - next_row)

    def run_batch(batch) -> None:
        """Launch a batch's forward and copies, then store the previous batch meanwhile."""
        nonlocal pending
        ids = torch.as_tensor(np.stack([c.ids for c in batch])).to(loaded.device)
        with torch.inference_mode():
            copies = HostCopies(capture.run(ids), pinned)
        rows = plan(batch)
        if pending is not None:
            consume(*pending)
        pending = (rows, copies)

    per_forward = contexts_per_forward(cfg)
    exhausted = True
    try:
        with Capture(model, points) as capture:
            batch = []
            for ctx in contexts:
                if ctx.index < start_ctx:
                    continue
                if context_range is not None and ctx.index >= context_range[1]:
                    exhausted = False
                    break
                batch.append(ctx)
                if len(batch) == per_forward:
                    run_batch(batch)
                    batch = []
                if planned >= cfg.tokens:
                    exhausted = False
                    break
            if batch:
                run_batch(batch)
            if pending is not None:
                consume(*pending)
            if buffered:
                flush(buffered)
        committer.drain()
    except BaseException as e:
        committer.settle()  # keep every chunk that made it to disk
        out_of_space = _out_of_space(cfg, meta, e)
        if out_of_space is not None:
            raise out_of_space from None
        raise
    finally:
        if bar is not None:
            bar.close()
    meta["complete"] = True
    meta["corpus_exhausted"] = exhausted and meta["n_tokens"] < cfg.tokens
    st.write_meta(cfg.out, meta)
    return meta
