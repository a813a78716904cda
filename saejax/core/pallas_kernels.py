"""Pallas kernels for the sparse TopK step: top-k, row gathers, row dots, row scatter-adds.

The same four operations as the C++ CPU kernels (`saejax.core.cpu_kernels`), with the same
signatures, output shapes and dtypes, so that either stands behind the four dispatch
points of `saejax/core/sae.py` (`sae.topk_kernel: pallas` picks these):

    _top_k                      -> top_k(x, k, bias)
    _gather_rows_weighted       -> gather_rows(weights, idx, table)
    backward of sparse_decode   -> row_dots(g, idx, W_dec), scatter_rows(acts, idx, g, d_sae)
    backward of selected_preacts-> scatter_rows(g, idx, x - b_dec, d_sae, transposed=True)

Every function takes `interpret`: None (the default) runs the
kernels in Pallas interpret mode when JAX's default backend is the CPU and compiles them
otherwise; True or False forces it. `available(backend)` says where they can run.

Targets. The kernel bodies are written for the Triton lowering of Pallas on GPUs: blocks
are powers of two, rows of a table are read with vector gathers (`ref[index_vector, :]`), and
every output element is written by exactly one program, so no atomics are needed. TPU (Mosaic)
is not a target yet: Mosaic has no vector gather from a ref, so gather_rows, row_dots and
scatter_rows would need a scalar-prefetch/DMA version; `available("tpu")` is False. What runs
here, on the CPU in interpret mode, is checked against lax and NumPy by
tests/core/test_pallas_kernels.py. The GPU lowering and the speed of these kernels are
unmeasured until someone runs them on a GPU.

The kernels:

- top_k: each program takes a [rows, cols] block of x (+ bias), maps every value to an int32
  key that is monotone in lax.top_k's total order (-NaN < -inf < ... < -0 < +0 < ... < +inf
  < NaN), and picks the block's best `kb` = min(next power of two >= k, cols) entries by
  kb rounds of max-and-mask (the lowest index among equal keys first). The [B, blocks·kb]
  candidates are then merged by lax.top_k on their keys. Candidates are laid out block by
  block, each block's in rank order, so among equal keys a lower position is a lower latent
  index: the merge's tie rule (lower position) is lax.top_k's (lower index), and the result
  equals lax.top_k(x + bias, k) bit for bit, NaN and signed zeros included. Cost per row is
  about N·kb compare-selects in the kernel plus a lax.top_k over N·kb/cols candidates; for a
  large k (AuxK's k of hundreds) a radix select would be the better kernel.
- gather_rows: a program per (row block, column block) loops over the k selected latents,
  gathers the k table rows for its rows and adds them, weighted, in float32 (in the order
  i = 0..k-1).
- row_dots: a program per row block loops over the k selected latents and over column
  chunks, and writes out[:, i] = Σ_d g[:, d]·table[idx[:, i], d].
- scatter_rows: deterministic. The B·k entries (b, i) are sorted by latent with a stable
  sort (so equal latents keep the order b·k + i), and the sorted entries of each block of
  latents form one contiguous range. A program per (latent block, column block) zeroes its
  block and adds its range's entries into it, one after another. Each output element is
  written by one program in a fixed order: the result does not depend on the block sizes or
  on scheduling, and equals a sequential float32 sum over (b, i) in row-major order. No
  atomics (a GPU atomic-add version would be faster for spread-out latents and
  non-deterministic). A latent chosen by many rows makes its block's program long.

Under jax.shard_map the operands are cast to vary over the same mesh axes and the results
typed to vary over them, so the compiled kernels trace under check_vma=True (tested: the
trace, not a GPU run). Interpret mode there needs check_vma=False: JAX's Pallas interpreter
re-evaluates a kernel traced without mesh axes on varying blocks and rejects them, so
the functions raise NotImplementedError instead; sae.py's model-sharded shard_map therefore
runs with check_vma=False when these kernels are interpreted (`interpret_default()`).

Shapes that do not divide the blocks are padded up (only then: dimensions that are powers of
two, or multiples of a smaller power-of-two block, are not copied) and results are sliced
back. Indices outside [0, N) follow XLA's conventions instead of the C++ kernels' error:
gathers clamp them, the scatter drops them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Default block sizes (powers of two; arguments of each function override them).
TOPK_BLOCK_ROWS = 8
TOPK_BLOCK_COLS = 512
GATHER_BLOCK_ROWS = 16
GATHER_BLOCK_COLS = 128
ROW_DOTS_BLOCK_ROWS = 16
ROW_DOTS_CHUNK = 128
SCATTER_BLOCK_LATENTS = 32
SCATTER_BLOCK_COLS = 128

_SMALLEST_BLOCK = 8  # a dimension is padded rather than split into blocks smaller than this
_INT_MIN = np.iinfo(np.int32).min
_INT_MAX = np.iinfo(np.int32).max


def available(backend: str) -> bool:
    """True when these kernels can run on `backend` ("cpu", "gpu"/"cuda"/"rocm", "tpu") in
    this process: on the CPU in interpret mode; on a GPU through Pallas's Triton lowering
    when JAX has GPU devices; never on TPU yet (see the module docstring)."""
    backend = backend.lower()
    if backend == "cpu":
        return True
    if backend in ("gpu", "cuda", "rocm"):
        try:
            import jax.experimental.pallas.triton  # noqa: F401

            return bool(jax.devices(backend))
        except (ImportError, RuntimeError):
            return False
    return False


def interpret_default() -> bool:
    """True when the kernels run in interpret mode unless told otherwise (a CPU backend)."""
    return jax.default_backend() == "cpu"


# ---- helpers ------------------------------------------------------------------------
def _interpret(interpret) -> bool:
    return interpret_default() if interpret is None else bool(interpret)


def _check_block(name: str, block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two, got {block}")


def _block(dim: int, preferred: int) -> tuple[int, int]:
    """(block, padded dim): a power-of-two block for a dimension of `dim` elements.

    A dimension up to `preferred` is one block (rounded up to a power of two); a larger one
    takes the largest power of two <= preferred that divides it (down to _SMALLEST_BLOCK),
    else `preferred` with padding."""
    if dim <= preferred:
        block = pl.next_power_of_2(max(dim, 1))
        return block, block
    block = preferred
    while block > _SMALLEST_BLOCK and dim % block:
        block //= 2
    if dim % block:
        block = preferred
    return block, pl.cdiv(dim, block) * block


def _pad(a, shape, value=0):
    """`a` padded at the end of each axis up to `shape` (no copy when it already has it)."""
    if tuple(a.shape) == tuple(shape):
        return a
    return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape)], constant_values=value)


def _pad_back(a, shape):
    """The leading `shape` of a padded result (no copy when nothing was padded)."""
    return a if tuple(a.shape) == tuple(shape) else a[tuple(slice(0, s) for s in shape)]


def _varying_axes(*values) -> tuple:
    """Mesh axes (under shard_map) over which any of `values` varies; () outside it."""
    axes = set()
    for value in values:
        manual = getattr(jax.typeof(value), "manual_axis_type", None)
        axes |= set(getattr(manual, "varying", ()) or ())
    return tuple(sorted(axes))


def _call(kernel, *, out_shape, grid, in_specs, out_specs, interpret, name):
    """pallas_call that types its results under shard_map with check_vma=True (as sae.py
    uses it): the operands are cast to vary over the same mesh axes (a weight replicated
    over "data" next to a batch split over it) and the outputs vary over those axes.
    `out_shape` is a tuple of (shape, dtype) pairs."""

    def run(*operands):
        axes = _varying_axes(*operands)
        manual = None
        if axes:
            if interpret:
                raise NotImplementedError(
                    "Pallas interpret mode cannot run under shard_map with check_vma=True "
                    f"(JAX {jax.__version__} re-evaluates the kernel on blocks that vary over "
                    f"{axes} and rejects them); use check_vma=False, or on the CPU the C++ or "
                    "XLA kernels"
                )
            operands = [_vary(o, axes) for o in operands]
            manual = jax.typeof(operands[0]).manual_axis_type
        shapes = tuple(
            jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
            for shape, dtype in out_shape
        )
        return pl.pallas_call(
            kernel,
            out_shape=shapes,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=interpret,
            name=name,
        )(*operands)

    return run


def _vary(value, axes):
    missing = tuple(a for a in axes if a not in _varying_axes(value))
    return lax.pcast(value, missing, to="varying") if missing else value


def _order_key(values):
    """float32 -> int32, monotone in the total order lax.top_k sorts by (signed zeros and
    NaNs included): negative floats have their magnitude bits flipped."""
    bits = lax.bitcast_convert_type(values, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_value(keys):
    """The inverse of _order_key."""
    return lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ 0x7FFFFFFF, keys), jnp.float32)


# ---- top_k --------------------------------------------------------------------------
def _topk_block_kernel(*refs, n: int, kb: int, has_bias: bool):
    """The best kb entries of one [rows, cols] block: keys and global indices, in rank order."""
    if has_bias:
        x_ref, bias_ref, key_ref, idx_ref = refs
        values = x_ref[...] + bias_ref[...]
    else:
        x_ref, key_ref, idx_ref = refs
        values = x_ref[...]
    rows, cols = x_ref.shape
    col = pl.program_id(1) * cols + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    key = jnp.where(col < n, _order_key(values), _INT_MIN)  # padding ranks last
    slot = lax.broadcasted_iota(jnp.int32, (rows, kb), 1)

    def pick(r, carry):
        free, keys, idxs = carry
        best = jnp.max(jnp.where(free, key, _INT_MIN), axis=1, keepdims=True)
        at = jnp.min(jnp.where(free & (key == best), col, _INT_MAX), axis=1, keepdims=True)
        return (
            free & (col != at),
            jnp.where(slot == r, best, keys),
            jnp.where(slot == r, at, idxs),
        )

    init = (
        jnp.ones((rows, cols), jnp.bool_),
        jnp.zeros((rows, kb), jnp.int32),
        jnp.zeros((rows, kb), jnp.int32),
    )
    _, keys, idxs = lax.fori_loop(0, kb, pick, init)
    key_ref[...] = keys
    idx_ref[...] = idxs


def top_k(
    x,
    k: int,
    bias=None,
    *,
    interpret=None,
    block_rows: int = TOPK_BLOCK_ROWS,
    block_cols: int = TOPK_BLOCK_COLS,
):
    """lax.top_k(x + bias, k) (descending, ties to the lower index), bit for bit, without
    storing x + bias: (values [B, k] float32, indices [B, k] int32)."""
    _check_block("block_rows", block_rows)
    _check_block("block_cols", block_cols)
    rows, n = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"top_k needs 1 <= k <= {n}, got k={k}")
    br, rows_p = _block(rows, block_rows)
    bc, n_p = _block(n, block_cols)
    kb = min(pl.next_power_of_2(k), bc)
    blocks = n_p // bc
    # padding is NaN (the largest key) so that a kernel which failed to mask it would show
    operands = [_pad(x.astype(jnp.float32), (rows_p, n_p), np.nan)]
    in_specs = [pl.BlockSpec((br, bc), lambda r, c: (r, c))]
    if bias is not None:
        operands.append(_pad(bias.astype(jnp.float32).reshape(1, n), (1, n_p), np.nan))
        in_specs.append(pl.BlockSpec((1, bc), lambda r, c: (0, c)))
    out = ((blocks, rows_p, kb), jnp.int32)
    out_spec = pl.BlockSpec((pl.squeezed, br, kb), lambda r, c: (c, r, 0))
    keys, idx = _call(
        partial(_topk_block_kernel, n=n, kb=kb, has_bias=bias is not None),
        out_shape=(out, out),
        grid=(rows_p // br, blocks),
        in_specs=in_specs,
        out_specs=(out_spec, out_spec),
        interpret=_interpret(interpret),
        name="saejax_top_k",
    )(*operands)
    # [blocks, B, kb] -> [B, blocks·kb]: block-major, so position order is index order
    keys = keys.transpose(1, 0, 2).reshape(rows_p, blocks * kb)[:rows]
    idx = idx.transpose(1, 0, 2).reshape(rows_p, blocks * kb)[:rows]
    best, pick = lax.top_k(keys, k)
    return _key_value(best), jnp.take_along_axis(idx, pick, axis=1)


# ---- gather_rows --------------------------------------------------------------------
def _gather_kernel(w_ref, idx_ref, table_ref, out_ref):
    def add(i, acc):
        return acc + w_ref[:, i][:, None] * table_ref[idx_ref[:, i], :]

    out_ref[...] = lax.fori_loop(0, w_ref.shape[1], add, jnp.zeros(out_ref.shape, jnp.float32))


def gather_rows(
    weights,
    idx,
    table,
    *,
    interpret=None,
    block_rows: int = GATHER_BLOCK_ROWS,
    block_cols: int = GATHER_BLOCK_COLS,
):
    """out[b] = Σ_i weights[b, i]·table[idx[b, i]]: [B, D] float32."""
    _check_block("block_rows", block_rows)
    _check_block("block_cols", block_cols)
    rows, k = idx.shape
    n, d = table.shape
    br, rows_p = _block(rows, block_rows)
    bd, d_p = _block(d, block_cols)
    weights = _pad(weights.astype(jnp.float32), (rows_p, k))
    idx = _pad(jnp.clip(idx.astype(jnp.int32), 0, n - 1), (rows_p, k))
    table = _pad(table.astype(jnp.float32), (n, d_p))
    out = _call(
        _gather_kernel,
        out_shape=(((rows_p, d_p), jnp.float32),),
        grid=(rows_p // br, d_p // bd),
        in_specs=[
            pl.BlockSpec((br, k), lambda r, c: (r, 0)),
            pl.BlockSpec((br, k), lambda r, c: (r, 0)),
            pl.BlockSpec((n, bd), lambda r, c: (0, c)),
        ],
        out_specs=(pl.BlockSpec((br, bd), lambda r, c: (r, c)),),
        interpret=_interpret(interpret),
        name="saejax_gather_rows",
    )(weights, idx, table)[0]
    return _pad_back(out, (rows, d))


# ---- row_dots -----------------------------------------------------------------------
def _row_dots_kernel(g_ref, idx_ref, table_ref, out_ref, *, chunk: int):
    rows, d = g_ref.shape

    def one_latent(i, carry):
        latents = idx_ref[:, i]

        def add_chunk(c, acc):
            cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
            return acc + jnp.sum(g_ref[:, cols] * table_ref[latents, cols], axis=1)

        out_ref[:, i] = lax.fori_loop(0, d // chunk, add_chunk, jnp.zeros((rows,), jnp.float32))
        return carry

    lax.fori_loop(0, idx_ref.shape[1], one_latent, 0)


def row_dots(
    g,
    idx,
    table,
    *,
    interpret=None,
    block_rows: int = ROW_DOTS_BLOCK_ROWS,
    chunk: int = ROW_DOTS_CHUNK,
):
    """out[b, i] = ⟨g[b], table[idx[b, i]]⟩: [B, k] float32."""
    _check_block("block_rows", block_rows)
    _check_block("chunk", chunk)
    rows, k = idx.shape
    n, d = table.shape
    br, rows_p = _block(rows, block_rows)
    bd, d_p = _block(d, chunk)
    g = _pad(g.astype(jnp.float32), (rows_p, d_p))
    idx = _pad(jnp.clip(idx.astype(jnp.int32), 0, n - 1), (rows_p, k))
    table = _pad(table.astype(jnp.float32), (n, d_p))
    out = _call(
        partial(_row_dots_kernel, chunk=bd),
        out_shape=(((rows_p, k), jnp.float32),),
        grid=(rows_p // br,),
        in_specs=[
            pl.BlockSpec((br, d_p), lambda r: (r, 0)),
            pl.BlockSpec((br, k), lambda r: (r, 0)),
            pl.BlockSpec((n, d_p), lambda r: (0, 0)),
        ],
        out_specs=(pl.BlockSpec((br, k), lambda r: (r, 0)),),
        interpret=_interpret(interpret),
        name="saejax_row_dots",
    )(g, idx, table)[0]
    return _pad_back(out, (rows, k))


# ---- scatter_rows -------------------------------------------------------------------
def _scatter_kernel(
    bounds_ref, latent_ref, source_ref, w_ref, rows_ref, out_ref, wsum_ref, *, transposed: bool
):
    j = pl.program_id(0)
    block_n = wsum_ref.shape[0]
    first = j * block_n
    start, stop = bounds_ref[j], bounds_ref[j + 1]
    out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

    def add_row(e, carry):
        local = latent_ref[e] - first
        update = w_ref[e] * rows_ref[source_ref[e], :]
        if transposed:
            out_ref[:, local] += update
        else:
            out_ref[local, :] += update
        return carry

    lax.fori_loop(start, stop, add_row, 0)

    @pl.when(pl.program_id(1) == 0)  # the weight sums once per latent block
    def _():
        wsum_ref[...] = jnp.zeros(wsum_ref.shape, jnp.float32)

        def add_weight(e, carry):
            local = latent_ref[e] - first
            wsum_ref[local] += w_ref[e]
            return carry

        lax.fori_loop(start, stop, add_weight, 0)


def scatter_rows(
    weights,
    idx,
    rows,
    n: int,
    transposed: bool = False,
    *,
    interpret=None,
    block_latents: int = SCATTER_BLOCK_LATENTS,
    block_cols: int = SCATTER_BLOCK_COLS,
):
    """(out [n, D], wsum [n]): out[j] = Σ_{idx[b,i]=j} weights[b, i]·rows[b]; wsum the Σ
    weights. transposed=True returns out as [D, n], written in that layout. Deterministic."""
    _check_block("block_latents", block_latents)
    _check_block("block_cols", block_cols)
    batch, k = idx.shape
    d = rows.shape[1]
    bn, n_p = _block(n, block_latents)
    bd, d_p = _block(d, block_cols)
    latent = idx.astype(jnp.int32).reshape(-1)
    order = jnp.argsort(latent, stable=True).astype(jnp.int32)  # by latent, then b·k + i
    latent = latent[order]
    source = order // k
    w = weights.astype(jnp.float32).reshape(-1)[order]
    # sorted entries [bounds[j], bounds[j + 1]) belong to latent block j; out-of-range
    # latents fall outside [bounds[0], bounds[-1]) and are dropped
    bounds = jnp.searchsorted(
        latent, jnp.arange(n_p // bn + 1, dtype=jnp.int32) * bn, side="left"
    ).astype(jnp.int32)
    rows = _pad(rows.astype(jnp.float32), (batch, d_p))
    if transposed:
        out_shape = ((d_p, n_p), jnp.float32)
        out_spec = pl.BlockSpec((bd, bn), lambda j, c: (c, j))
    else:
        out_shape = ((n_p, d_p), jnp.float32)
        out_spec = pl.BlockSpec((bn, bd), lambda j, c: (j, c))
    scalars = [pl.BlockSpec((s,), lambda j, c: (0,)) for s in (n_p // bn + 1, batch * k)]
    out, wsum = _call(
        partial(_scatter_kernel, transposed=transposed),
        out_shape=(out_shape, ((n_p,), jnp.float32)),
        grid=(n_p // bn, d_p // bd),
        in_specs=[
            scalars[0],
            scalars[1],
            scalars[1],
            scalars[1],
            pl.BlockSpec((batch, bd), lambda j, c: (0, c)),
        ],
        out_specs=(out_spec, pl.BlockSpec((bn,), lambda j, c: (j,))),
        interpret=_interpret(interpret),
        name="saejax_scatter_rows",
    )(bounds, latent, source, w, rows)
    return _pad_back(out, (d, n) if transposed else (n, d)), _pad_back(wsum, (n,))
