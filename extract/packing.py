"""Packing tokenized documents into fixed-length model inputs.

Documents are tokenized without special tokens and joined with EOS between them
into one stream; each context takes the next `context_size - 1` tokens after a
BOS (or `context_size` tokens when BOS is not prepended). Only the corpus's last
context can be short; it is right-padded, and its padding rows are dropped
(right padding cannot change earlier positions of a causal model).

`skip_positions` N stores no rows for positions 0..N-1 of each context (SAELens's
`seqpos_slice=(N, None)`): the first tokens after BOS are attention sinks whose
activations have norms many times the rest and can hold most of the variance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Context:
    index: int  # sequence index, as stored in `doc[:, 0]`
    ids: np.ndarray  # int64 [context_size], the exact model input
    n_real: int  # positions < n_real are real tokens; the rest are padding


def token_stream(documents: Iterable[str], tokenizer, batch_docs: int = 64) -> Iterator[int]:
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                yield from ids
                if eos is not None:
                    yield eos

    for doc in documents:
        if doc and doc.strip():
            batch.append(doc)
        if len(batch) >= batch_docs:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def pack_contexts(
    tokens: Iterator[int], context_size: int, prepend_bos: bool, bos_id: int | None, pad_id: int
) -> Iterator[Context]:
    body = context_size - 1 if prepend_bos else context_size
    prefix = [bos_id] if prepend_bos else []
    index, buf = 0, []
    for t in tokens:
        buf.append(t)
        if len(buf) == body:
            yield Context(index, np.asarray(prefix + buf, dtype=np.int64), context_size)
            index, buf = index + 1, []
    if buf:
        n_real = len(prefix) + len(buf)
        ids = np.full(context_size, pad_id, dtype=np.int64)
        ids[:n_real] = prefix + buf
        yield Context(index, ids, n_real)


def first_stored_position(drop_bos: bool, skip_positions: int = 0) -> int:
    """The first position of every context that becomes a store row."""
    return max(1 if drop_bos else 0, skip_positions)


def stored_positions(ctx: Context, drop_bos: bool, skip_positions: int = 0) -> np.ndarray:
    """Positions of a context that become store rows."""
    return np.arange(first_stored_position(drop_bos, skip_positions), ctx.n_real)
