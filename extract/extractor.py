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
from dataclasses import asdict, dataclass, field

import numpy as np

from extract.corpus import open_corpus
from extract.hooks import Capture, hook_width, parse_hooks, validate_hooks
from extract.models import BUILTIN_MODEL, load_model
from extract.packing import first_stored_position, pack_contexts, stored_positions, token_stream
from saejax import store as st
from saejax.errors import SaejaxError

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
    skip_positions: int = 0  # positions 0..N-1 of each context store no rows


def _check_output_path(path: str) -> None:
    if st.is_remote(path):
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
    if cfg.dtype not in st.DTYPES:
        raise SaejaxError(f"unknown dtype '{cfg.dtype}'; choose one of {', '.join(st.DTYPES)}")
    if cfg.tokens <= 0:
        raise SaejaxError(f"--tokens must be positive, got {cfg.tokens}")
    if cfg.context < 2:
        raise SaejaxError(f"--context must be at least 2, got {cfg.context}")
    if cfg.batch_size <= 0:
        raise SaejaxError(f"--batch-size must be positive, got {cfg.batch_size}")
    if not 0 <= cfg.skip_positions < cfg.context:
        raise SaejaxError(
            f"--skip-positions must be at least 0 and less than --context {cfg.context}, "
            f"got {cfg.skip_positions}"
        )
    parse_hooks(cfg.hooks)
    _check_output_path(cfg.out)


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


def _same_request(recorded: dict | None, cfg: ExtractConfig) -> bool:
    if not recorded:
        return False
    wanted = asdict(cfg)
    return all(recorded.get(k) == v for k, v in wanted.items() if k not in ("out", "tokens"))


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


def run_extract(
    cfg: ExtractConfig,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    loaded=None,
) -> dict:
    """Extract (or resume extracting) activations into `cfg.out`; returns the final meta.

    `loaded` (a LoadedModel for `cfg.model`) skips loading the model again.
    """
    import torch

    _validate_cheap(cfg)
    done = st.read_meta(cfg.out)
    if (
        done
        and done.get("complete")
        and _same_request(done.get("extract_config"), cfg)
        and (done["n_tokens"] >= cfg.tokens or done.get("corpus_exhausted"))
    ):
        return done  # already finished with these arguments: no need to load the model
    corpus = open_corpus(cfg.corpus, cfg.split, cfg.text_column)
    loaded = loaded or load_model(cfg.model, cfg.revision, cfg.trust_remote_code)
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

    contexts = pack_contexts(
        token_stream(corpus.documents(), tok),
        cfg.context,
        cfg.prepend_bos,
        tok.bos_token_id,
        pad_id,
    )
    first = next(contexts, None)
    if first is None:
        raise SaejaxError(f"corpus '{cfg.corpus}' contains no text to extract")
    contexts = itertools.chain([first], contexts)

    existing = st.read_meta(cfg.out)
    if existing is not None:
        _check_compatible(cfg.out, existing, identity)
        meta = existing
        if meta["n_tokens"] >= cfg.tokens or (
            meta.get("complete") and meta.get("corpus_exhausted")
        ):
            return meta
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
        st.write_meta(cfg.out, meta)  # meta first: a crash after this leaves a resumable store

    capacity = math.ceil(cfg.tokens / chunk_rows) * chunk_rows
    try:
        arrays, tokens_arr, doc_arr = st.create_arrays(cfg.out, identity, capacity)
    except ValueError as e:
        raise SaejaxError(f"cannot create the arrays of store {cfg.out}: {e}") from None

    start_row = int(meta["n_tokens"])
    start_ctx, skip_rows = divmod(start_row, rows_per_ctx)
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

    def run_batch(batch) -> None:
        nonlocal buffered, skip_rows
        ids = torch.as_tensor(np.stack([c.ids for c in batch]))
        with torch.inference_mode():
            captured = capture.run(ids)
        for i, ctx in enumerate(batch):
            pos = stored_positions(ctx, drop_bos, cfg.skip_positions)
            if skip_rows:
                pos, skip_rows = pos[skip_rows:], 0
            take = min(len(pos), cfg.tokens - (next_row + buffered))
            pos = pos[:take]
            if take <= 0:
                continue
            for h in cfg.hooks:
                x = captured[h][i, pos].float().numpy()
                buffers[h].append(x.astype(st.DTYPES[cfg.dtype]))
            buf_tokens.append(ctx.ids[pos].astype(np.int32))
            buf_doc.append(np.stack([np.full(take, ctx.index, np.int32), pos.astype(np.int32)], 1))
            buffered += take
        while buffered and next_row + buffered >= boundary_after(next_row):
            flush(boundary_after(next_row) - next_row)

    exhausted = True
    try:
        with Capture(model, points) as capture:
            batch = []
            for ctx in contexts:
                if ctx.index < start_ctx:
                    continue
                batch.append(ctx)
                if len(batch) == cfg.batch_size:
                    run_batch(batch)
                    batch = []
                if next_row + buffered >= cfg.tokens:
                    exhausted = False
                    break
            if batch:
                run_batch(batch)
            if buffered:
                flush(buffered)
        committer.drain()
    except BaseException:
        committer.drain()  # keep every chunk that made it to disk
        raise
    finally:
        if bar is not None:
            bar.close()
    meta["complete"] = True
    meta["corpus_exhausted"] = exhausted and meta["n_tokens"] < cfg.tokens
    st.write_meta(cfg.out, meta)
    return meta
