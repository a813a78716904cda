"""Sparse autoencoders in Flax: relu, topk, batchtopk, jumprelu and gated; and transcoders.

Parameters follow the ecosystem's layout: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in], and threshold [d_sae] (jumprelu; batchtopk
keeps its learned inference threshold there too, updated as a running statistic,
not by gradients). Gated SAEs have b_gate, r_mag and b_mag [d_sae] in place of b_enc
(SAELens's names).

A transcoder (`SAESpec.transcoder`) encodes x from one hook and reconstructs y of another:
W_dec [d_sae, d_out], b_dec [d_out], its input is not centred by b_dec (SAELens's and
sparsify's transcoders neither), and with `skip_connection` it adds x·W_skipᵀ, W_skip
[d_out, d_in] (initialised to zeros). All maths is in pure functions of the parameter dict so that
training, evaluation and export share one definition; `SparseAutoencoder` is the
Flax module that declares and initialises the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saejax.core import cpu_kernels, pallas_kernels
from saejax.core.architectures import (
    TOPK_KERNELS,
    TRANSCODER_ARCHITECTURES,
    batch_selects,
    has_threshold,
    is_gated,
    selects_top_k,
    supports_transcoder,
    uses_sparse_kernels,
)
from saejax.core.sharding import LATENT_BLOCK, LATENT_SPECS, ROW_BLOCK, constrain, varying_axes

AUX_NORMALIZATIONS = ("input", "residual")


@dataclass(frozen=True)
class SAESpec:
    """What the pure functions need to know about an SAE (hashable: a jit static)."""

    architecture: str
    d_in: int
    d_sae: int
    k: int = 32
    aux_k: int = 256
    jumprelu_bandwidth: float = 1e-3
    compute_dtype: str = "float32"
    # topk: "dense" (the reference), or the sparse path through "sparse" (the backend's own
    # kernels), "pallas", or "auto" (the measured fastest); see `sparse_kernels`
    topk_kernel: str = "auto"
    # matryoshka_batchtopk: the nested prefix widths, the whole dictionary last
    # (`architectures.matryoshka_prefixes`); a tuple (a JSON list read back is made one)
    matryoshka_widths: tuple = ()
    # transcoders: the target's width (0: d_in, an SAE), whether the input is left uncentred
    # and reconstructs another hook, and the optional linear skip W_skip [d_out, d_in]
    d_out: int = 0
    transcoder: bool = False
    skip_connection: bool = False
    # true: the encoder sees x − b_dec (Towards Monosemanticity); false: x itself (Gemma
    # Scope's JumpReLU; SAELens's cfg field of the same name)
    apply_b_dec_to_input: bool = True
    # AuxK's squared error divided by the total variance of the "input" x, or of the
    # "residual" error it fits (OpenAI's sparse_autoencoder); see `auxk_variance`
    aux_normalization: str = "input"

    def __post_init__(self):
        object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        object.__setattr__(self, "d_out", int(self.d_out or self.d_in))
        if self.topk_kernel not in TOPK_KERNELS:
            raise ValueError(f"topk_kernel must be one of {TOPK_KERNELS}, got {self.topk_kernel!r}")
        if self.transcoder and not supports_transcoder(self.architecture):
            raise ValueError(
                f"transcoders support {', '.join(TRANSCODER_ARCHITECTURES)}, "
                f"not {self.architecture}"
            )
        if not self.transcoder and (self.skip_connection or self.d_out != self.d_in):
            raise ValueError("d_out != d_in and skip_connection need transcoder=True")
        if self.aux_normalization not in AUX_NORMALIZATIONS:
            raise ValueError(
                f"aux_normalization must be one of {AUX_NORMALIZATIONS}, "
                f"got {self.aux_normalization!r}"
            )

    @property
    def uses_sparse_kernels(self) -> bool:
        return uses_sparse_kernels(self.architecture, self.topk_kernel)

    @property
    def kernels(self) -> str:
        """The sparse kernels a trace uses: "cpp", "pallas" or "xla" (see `sparse_kernels`)."""
        return sparse_kernels(self.topk_kernel)

    @property
    def has_threshold(self) -> bool:
        return has_threshold(self.architecture)


def sparse_kernels(topk_kernel: str) -> str:
    """Which implementation stands behind the sparse TopK step on the default backend.

    "pallas": saejax.core.pallas_kernels (interpret mode on the CPU, Triton on a GPU).
    "sparse" and "auto": the C++ kernels on the CPU when they build, else XLA's primitives
    (top_k, gathers, scatter-add). "auto" is the measured fastest: on the CPU the C++
    kernels (BENCHMARKS.md); on a GPU XLA's primitives stay the default until someone
    measures the Pallas kernels there (benchmarks/gpu/ does); on TPU Pallas has no kernels
    (no vector gathers in Mosaic). Returns "cpp", "pallas" or "xla".
    """
    if topk_kernel == "pallas":
        return "pallas"
    return "cpp" if cpu_kernels.enabled() else "xla"


def _kernel_module(kernels: str):
    """The module with top_k/gather_rows/row_dots/scatter_rows for `kernels`; None for XLA."""
    return {"cpp": cpu_kernels, "pallas": pallas_kernels}.get(kernels)


class SparseAutoencoder(nn.Module):
    """Declares the parameters; `init_params` below is the usual entry point."""

    spec: SAESpec
    init_threshold: float = 1e-3

    @nn.compact
    def __call__(self, x):
        s = self.spec

        def unit_rows(key, shape, dtype=jnp.float32):
            w = jax.random.normal(key, shape, dtype)
            return w / jnp.linalg.norm(w, axis=-1, keepdims=True)

        W_dec = self.param("W_dec", unit_rows, (s.d_sae, s.d_out))
        if s.transcoder:  # input and output live in different spaces: nothing to tie
            W_enc = self.param("W_enc", lambda key: unit_rows(key, (s.d_sae, s.d_in)).T)
        else:  # tied initialisation: each encoder column starts as its decoder row
            W_enc = self.param("W_enc", lambda key: W_dec.T)
        b_dec = self.param("b_dec", nn.initializers.zeros, (s.d_out,))
        params = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
        if s.skip_connection:
            params["W_skip"] = self.param("W_skip", nn.initializers.zeros, (s.d_out, s.d_in))
        if is_gated(s.architecture):  # both paths start as a ReLU SAE's encoder
            for name in ("b_gate", "r_mag", "b_mag"):
                params[name] = self.param(name, nn.initializers.zeros, (s.d_sae,))
            return forward(params, x, s)[0]
        params["b_enc"] = self.param("b_enc", nn.initializers.zeros, (s.d_sae,))
        if s.has_threshold:
            params["threshold"] = self.param(
                "threshold", nn.initializers.constant(self.init_threshold), (s.d_sae,)
            )
        return forward(params, x, s)[0]


def init_params(
    spec: SAESpec, key, b_dec: np.ndarray | None = None, init_threshold: float = 1e-3
) -> dict:
    module = SparseAutoencoder(spec, init_threshold)
    params = dict(module.init(key, jnp.zeros((1, spec.d_in)))["params"])
    if b_dec is not None:
        params["b_dec"] = jnp.asarray(b_dec, jnp.float32)
    return params


# ---- JumpReLU with straight-through threshold gradients ---------------------------
def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, threshold, bandwidth):
    return z * (z > threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, residual, g):
    z, threshold = residual
    dz = g * (z > threshold)
    dthreshold = -(threshold / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return dz, dthreshold.reshape(-1, threshold.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_fn(z, threshold, bandwidth):
    """Heaviside H(z - threshold), with the straight-through gradient for threshold."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step_fn(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, residual, g):
    z, threshold = residual
    dthreshold = -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return jnp.zeros_like(z), dthreshold.reshape(-1, threshold.shape[-1]).sum(0)


step_fn.defvjp(_step_fwd, _step_bwd)


# ---- sparse TopK kernels: after the encoder matmul, cost grows with k, not d_sae ----
# Each dispatch point takes `kernels` ("cpp", "pallas" or "xla", from SAESpec.kernels): the
# C++ and Pallas modules share one signature per operation; "xla" is the pure-JAX reference.
@partial(jax.custom_vjp, nondiff_argnums=(6,))
def selected_preacts(x, b_dec, W_enc, b_enc, idx, values, kernels):
    """Pre-activations `values` [B, k] of the latents `idx` [B, k], with sparse gradients.

    The forward pass returns `values` unchanged: they come from the dense encoder matmul,
    which selection needs anyway. The backward pass touches only the selected encoder
    columns and biases, O(B·k·d_in) instead of O(B·d_sae·d_in):
        dW_enc[:, j] = Σ_{(b,i): idx=j} g[b,i]·(x[b] − b_dec)     (scatter-add)
        db_enc[j]    = Σ_{(b,i): idx=j} g[b,i]
        db_dec       = −W_enc · db_enc
    `x` is data: it gets no gradient.
    """
    return values


def _match_varying_axes(cotangent, primal):
    """Under shard_map, sum a cotangent over the mesh axes its primal does not vary over
    (e.g. a weight gradient over "data"); outside shard_map this does nothing."""
    extra = tuple(sorted(set(varying_axes(cotangent)) - set(varying_axes(primal))))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def _selected_preacts_fwd(x, b_dec, W_enc, b_enc, idx, values, kernels):
    return values, (x, b_dec, W_enc, b_enc, idx)


def _selected_preacts_bwd(kernels, residual, g):
    x, b_dec, W_enc, b_enc, idx = residual
    d_sae = W_enc.shape[1]
    g = g.astype(jnp.float32)
    xc = x - b_dec
    module = _kernel_module(kernels)
    if module is not None:  # written as [d_in, d_sae] directly
        dW_enc, db_enc = module.scatter_rows(g, idx, xc, d_sae, transposed=True)
    else:
        flat = idx.reshape(-1)
        updates = (g[:, :, None] * xc[:, None, :]).reshape(-1, xc.shape[-1])
        dW_enc_t = jnp.zeros((d_sae, xc.shape[-1]), jnp.float32).at[flat].add(updates)
        db_enc = jnp.zeros(d_sae, jnp.float32).at[flat].add(g.reshape(-1))
        dW_enc = dW_enc_t.T
    db_dec = -(W_enc @ db_enc)
    return (
        None,
        _match_varying_axes(db_dec, b_dec),
        _match_varying_axes(dW_enc, W_enc),
        _match_varying_axes(db_enc, b_enc),
        None,
        None,
    )


selected_preacts.defvjp(_selected_preacts_fwd, _selected_preacts_bwd)


def _gather_rows_weighted(weights, idx, table, kernels):
    """Σ_j weights[:, j, None]·table[idx[:, j]] as a scan over j.

    One [B]-row gather per j fuses with the multiply-add; gathering all [B, k] rows at
    once would materialise a [B, k, d] array (gigabytes at scale) first.
    """
    module = _kernel_module(kernels)
    if module is not None:
        return module.gather_rows(weights, idx, table)

    def add_one(total, column):
        w, i = column
        return total + w[:, None] * table[i], None

    # the first term seeds the carry (rather than zeros) so that under shard_map the carry
    # has the same varying-axes type as the terms added to it
    first = weights[:, 0, None] * table[idx[:, 0]]
    return jax.lax.scan(add_one, first, (weights[:, 1:].T, idx[:, 1:].T))[0]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def sparse_decode(acts, idx, W_dec, kernels):
    """Σ_i acts[b, i]·W_dec[idx[b, i]]: only the k selected decoder rows of each input.

    Backward: d acts[b, i] = g[b]·W_dec[idx[b, i]] (a gather per i) and
    dW_dec[j] = Σ_{(b,i): idx=j} acts[b, i]·g[b] (a scatter-add into the selected rows).
    """
    return _gather_rows_weighted(acts, idx, W_dec, kernels)


def _sparse_decode_fwd(acts, idx, W_dec, kernels):
    return _gather_rows_weighted(acts, idx, W_dec, kernels), (acts, idx, W_dec)


def _sparse_decode_bwd(kernels, residual, g):
    acts, idx, W_dec = residual
    module = _kernel_module(kernels)
    if module is not None:
        d_acts = module.row_dots(g, idx, W_dec)
        dW_dec = module.scatter_rows(acts, idx, g, W_dec.shape[0])[0]
    else:

        def dot_one(_, i):
            return None, jnp.sum(g * W_dec[i], axis=-1)

        d_acts = jax.lax.scan(dot_one, None, idx.T)[1].T
        updates = (acts[:, :, None] * g[:, None, :]).reshape(-1, g.shape[-1])
        dW_dec = jnp.zeros_like(W_dec).at[idx.reshape(-1)].add(updates)
    return _match_varying_axes(d_acts, acts), None, _match_varying_axes(dW_dec, W_dec)


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


# ---- matmuls in the compute dtype, accumulated and returned in float32 ----------------
def matmul(a, b, compute_dtype: str = "float32"):
    """a @ b → float32, with both operands in `compute_dtype`.

    float32: a plain float32 dot. bfloat16: bf16 × bf16 with float32 accumulation and output
    (`preferred_element_type`), the fast form on CPUs with bf16 dot instructions (about 2.5x
    the bf16 → bf16 dot on XLA:CPU, whose output rounding also costs accuracy) and on
    GPU/TPU. Its gradients go through a custom_vjp (jax.grad of a dot with
    preferred_element_type would upcast both operands and run float32 dots): g · bᵀ in the
    same form, aᵀ · g (the weight gradient, contracting the batch) as `_weight_grad` says.
    """
    if jnp.dtype(compute_dtype) == jnp.float32:
        return a.astype(jnp.float32) @ b.astype(jnp.float32)
    return _mixed_matmul(a, b, compute_dtype)


def _dot_f32(a, b, dims, compute_dtype):
    dt = jnp.dtype(compute_dtype)
    return jax.lax.dot_general(
        a.astype(dt), b.astype(dt), (dims, ((), ())), preferred_element_type=jnp.float32
    )


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(a, b, compute_dtype):
    return _dot_f32(a, b, ((1,), (0,)), compute_dtype)


def _mixed_matmul_fwd(a, b, compute_dtype):
    return _mixed_matmul(a, b, compute_dtype), (a, b)


def _weight_grad(a, g, compute_dtype):
    """aᵀ · g → float32 (the weight gradient, contracting the batch), a [rows, m], g [rows, n].

    XLA rewrites a dot of a transpose into a dot contracting axis 0 of both operands, a form
    XLA:CPU's bf16 dot does not take: it casts both to float32 and runs a float32 dot
    (measured 15-20% slower than float32 operands, 2.2x slower than bf16 in the canonical
    form; BENCHMARKS.md). On one CPU device the C++ kernels' transpose, opaque to XLA, feeds
    the canonical form instead (the narrower operand is transposed: fewer bytes moved). GPUs
    and TPUs take the batch-contracting form in bf16 as it is."""
    dt = jnp.dtype(compute_dtype)
    if dt == jnp.float32 or not _cpu_transpose_helps():
        return _dot_f32(a, g, ((0,), (0,)), dt if jax.default_backend() != "cpu" else jnp.float32)
    a, g = a.astype(dt), g.astype(dt)
    T = cpu_kernels.transpose
    if a.shape[1] <= g.shape[1]:
        return _dot_f32(T(a), g, ((1,), (0,)), dt)
    return T(_dot_f32(T(g), a, ((1,), (0,)), dt))


def _cpu_transpose_helps() -> bool:
    """One CPU device with the C++ kernels. On a mesh the kernel's opaque output would have no
    sharding rule (a plain jit would gather it), so meshes of CPU devices (tests) keep the
    float32 form."""
    return jax.device_count() == 1 and cpu_kernels.enabled()


def _mixed_matmul_bwd(compute_dtype, residual, g):
    a, b = residual
    da = _dot_f32(g, b, ((1,), (1,)), compute_dtype)  # g · bᵀ
    db = _weight_grad(a, g, compute_dtype)  # aᵀ · g
    return da.astype(a.dtype), db.astype(b.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


# ---- the forward pass -------------------------------------------------------------
def encoder_scores(params, x, spec: SAESpec):
    """(x − b_dec)·W_enc in float32: the pre-activations before the encoder bias; x·W_enc
    when `spec.apply_b_dec_to_input` is false (b_dec then gets no gradient from the encoder).
    On a mesh the [rows, d_sae] result stays split over ("data", "model") (`constrain`).

    b_dec's gradient through the encoder, −W_enc·Σ_rows g, comes from a term whose value is
    exactly zero, (sg(b_dec) − b_dec)·sg(W_enc): differentiating (x − b_dec) itself would
    form g·W_encᵀ for every row, a third [rows, d_sae] × [d_sae, d_in] matmul, only to sum
    it over the rows, and on a latent-split mesh all-reduce that [rows, d_in] block over
    "model" first.
    """
    if spec.transcoder:  # no centring: b_dec lives in the output space
        return constrain(matmul(x, params["W_enc"], spec.compute_dtype), LATENT_BLOCK)
    b_dec, W_enc = params["b_dec"], params["W_enc"]
    if not spec.apply_b_dec_to_input:
        return constrain(matmul(x, W_enc, spec.compute_dtype), LATENT_BLOCK)
    fixed_b_dec = jax.lax.stop_gradient(b_dec)
    scores = matmul(x - fixed_b_dec, W_enc, spec.compute_dtype)
    zero = (fixed_b_dec - b_dec) @ jax.lax.stop_gradient(W_enc)
    return constrain(scores + zero, LATENT_BLOCK)


def pre_activations(params, x, spec: SAESpec):
    return constrain(encoder_scores(params, x, spec) + params["b_enc"], LATENT_BLOCK)


def topk_activation(pre, k: int, kernels: str = "xla"):
    """Keep each row's k largest pre-activations (ReLU'd), zero the rest.

    Kept as "at least the row's k-th largest", which a latent-split mesh computes without
    gathering the row (`_kth_largest_per_row`); an exact tie at the k-th value keeps every
    tied entry (the ReLU makes ties at zero or −inf, AuxK's masked latents, harmless)."""
    kth = _kth_largest_per_row(jax.lax.stop_gradient(pre), k, kernels)
    return constrain(jnp.where(pre >= kth, jax.nn.relu(pre), 0.0), LATENT_BLOCK)


def _row_top_values(block, k: int, kernels: str):
    """Each row's k largest values, descending. The C++ kernel where it is built: XLA:CPU's
    top_k sorts (AuxK's k = 512 over 16k latents: 22 s per 4096 rows, against 0.4 s)."""
    if kernels == "cpp":
        return cpu_kernels.top_k(block, k, None)[0]
    return jax.lax.top_k(block, k)[0]


def _kth_largest_per_row(pre, k: int, kernels: str = "xla"):
    """[rows, 1]: each row's k-th largest entry. With latents split over "model" each shard
    takes its top min(k, width) (the row's k largest are among them) and the k-th largest of
    the union is found by `kth_largest_across`, without moving the candidates."""
    if _model_shards() == 1:
        # the C++ kernel has no sharding rule: on a data-split mesh XLA would gather the rows
        mesh = jax.sharding.get_abstract_mesh()
        local = mesh.empty or mesh.size == 1
        return _row_top_values(pre, k, kernels if local else "xla")[:, -1:]
    from jax.sharding import PartitionSpec as P

    def local(block):
        top = _row_top_values(block, min(k, block.shape[1]), kernels)
        return kth_largest_across(top, k, "model")

    # the psums make the result equal on every "model" shard, which check_vma cannot see
    # through the bit arithmetic
    return jax.shard_map(local, in_specs=LATENT_BLOCK, out_specs=P("data", None), check_vma=False)(
        pre
    )


KTH_ROUNDS = 32  # one all-reduce of a per-row count per bit of a float32


def _sortable(values):
    """float32 → uint32 in the same order (−inf lowest; the caller has no NaNs)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unsortable(keys):
    bits = jnp.where(keys >> 31 == 1, keys ^ jnp.uint32(0x80000000), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def kth_largest_across(values, k: int, axes):
    """Inside shard_map: [rows, 1], the k-th largest of each row of `values` [rows, c] taken
    over every shard of the mesh `axes` (the union of the shards' rows), exactly; `axes`
    None: of `values` alone, outside shard_map.

    Built bit by bit from the top as the largest key T whose count of values ≥ T over all
    shards is still ≥ k: KTH_ROUNDS all-reduces of a [rows] count, where gathering the
    candidates would move [rows, c] from every shard (AuxK on a 64-way split of 16M latents:
    4 GiB per device per step, against 1 MiB here)."""
    keys = _sortable(values)
    answer = jnp.zeros((values.shape[0], 1), jnp.uint32)
    for bit in range(KTH_ROUNDS - 1, -1, -1):
        trial = answer | jnp.uint32(1 << bit)
        count = jnp.sum(keys >= trial, axis=1, keepdims=True, dtype=jnp.int32)
        if axes is not None:
            count = jax.lax.psum(count, axes)
        answer = jnp.where(count >= k, trial, answer)
    return _unsortable(answer)


# BatchTopK looks for its cutoff among each row's CANDIDATE_FACTOR·k largest entries first
CANDIDATE_FACTOR = 4


def batchtopk_activation(pre, k: int, kernels: str = "xla"):
    """Keep the batch's k x batch largest ReLU'd pre-activations, wherever they fall."""
    cutoff = _batchtopk_cutoff(jax.lax.stop_gradient(jax.nn.relu(pre)), k, kernels)
    return jnp.where((pre >= cutoff) & (pre > 0), pre, 0.0)


def _batchtopk_cutoff(relu_pre, k: int, kernels: str = "xla"):
    """The (k·rows)-th largest entry of the whole (global) batch, exactly.

    A sort-based top_k over the flattened batch costs seconds per step at 4096 × 16k latents
    on the CPU (and a full sort on a GPU); a row holds at most a few times k of the kept
    entries, so the cutoff is searched among each row's CANDIDATE_FACTOR·k largest first
    (`_cutoff_among_candidates`). On a mesh every device does this on its own block and the
    counts are summed over the mesh (`kth_largest_across`): no pre-activation moves.
    """
    n_keep = k * relu_pre.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _cutoff_among_candidates(relu_pre, n_keep, k, None, kernels)
    from jax.sharding import PartitionSpec as P

    def local(block):
        return _cutoff_among_candidates(block, n_keep, k, ("data", "model"), kernels)

    cutoff = jax.shard_map(local, in_specs=P("data", "model"), out_specs=P(), check_vma=False)(
        relu_pre
    )
    return cutoff


def _cutoff_among_candidates(block, n_keep: int, k: int, axes, kernels: str):
    """The n_keep-th largest of `block` (of every shard's block over `axes`).

    Exact: the n_keep-th largest t of the rows' top-c candidates is the answer unless some
    row's c-th largest is above t (that row may hold more entries above t than it offered);
    then the count runs over the whole block (a batch where one row holds more than c of the
    kept entries: at initialisation, or rows of far larger norm than the rest; still ~13x
    faster than the sort on the CPU, BENCHMARKS.md)."""
    c = min(block.shape[1], CANDIDATE_FACTOR * k)
    if c == block.shape[1]:
        return kth_largest_across(block.reshape(1, -1), n_keep, axes)[0, 0]
    top = _row_top_values(block, c, kernels)
    cutoff = kth_largest_across(top.reshape(1, -1), n_keep, axes)[0, 0]
    saturated = jnp.sum(top[:, -1] > cutoff, dtype=jnp.int32)
    if axes is not None:
        saturated = jax.lax.psum(saturated, axes)
    return jax.lax.cond(
        saturated > 0,
        lambda: kth_largest_across(block.reshape(1, -1), n_keep, axes)[0, 0],
        lambda: cutoff,
    )


def activate(params, pre, spec: SAESpec, training: bool = True):
    return constrain(_activate(params, pre, spec, training), LATENT_BLOCK)


def _activate(params, pre, spec: SAESpec, training: bool):
    a = spec.architecture
    if a == "relu":
        return jax.nn.relu(pre)
    if a == "topk":
        return topk_activation(pre, spec.k, spec.kernels)
    if batch_selects(a):  # batchtopk, matryoshka_batchtopk
        if training:
            return batchtopk_activation(pre, spec.k, spec.kernels)
        return jnp.where(pre > params["threshold"], pre, 0.0)  # inference: the learned threshold
    return jumprelu(pre, params["threshold"], spec.jumprelu_bandwidth)


# ---- gated SAE (Rajamanoharan et al. 2024) -------------------------------------------
def gated_pre_activations(params, x, spec: SAESpec):
    """(π_gate, π_mag): one encoder matmul serves both paths. The magnitude path uses the
    gate's directions rescaled per latent by exp(r_mag), with its own bias b_mag."""
    scores = encoder_scores(params, x, spec)
    pi_gate = constrain(scores + params["b_gate"], LATENT_BLOCK)
    pi_mag = constrain(scores * jnp.exp(params["r_mag"]) + params["b_mag"], LATENT_BLOCK)
    return pi_gate, pi_mag


def gated_activate(pi_gate, pi_mag):
    """1[π_gate > 0]·ReLU(π_mag). The Heaviside passes no gradient: the gate learns from the
    sparsity penalty and the auxiliary reconstruction (`gated_loss_fn`)."""
    return constrain(jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0), LATENT_BLOCK)


def gated_loss_fn(params, x, spec: SAESpec, sparsity_coefficient):
    """Rajamanoharan et al.'s loss, in `loss_fn`'s return form:
        ||x − x̂||² + λ·Σ_i ReLU(π_gate)_i·||W_dec[i]|| + ||x − x̂_frozen(ReLU(π_gate))||²
    (squared norms are per-row means). The L1 term is weighted by the decoder row norms (as
    the paper's L1 on an unconstrained decoder; with unit-norm rows it is the plain L1), and
    x̂_frozen decodes the gate's ReLU through stop-gradient copies of W_dec and b_dec, so the
    auxiliary loss trains only the gate (W_enc, b_gate, and b_dec through the encoder input).
    """
    pi_gate, pi_mag = gated_pre_activations(params, x, spec)
    f = gated_activate(pi_gate, pi_mag)
    x_hat = decode(params, f, spec)
    err = x - x_hat
    rows = x.shape[0]
    sq = jnp.sum(jnp.square(err))
    gate = jax.nn.relu(pi_gate)
    dec_norms = jnp.linalg.norm(params["W_dec"], axis=-1)
    frozen = {"W_dec": jax.lax.stop_gradient(params["W_dec"])}
    frozen["b_dec"] = jax.lax.stop_gradient(params["b_dec"])
    x_gate = decode(frozen, gate, spec)
    active = f > 0
    parts = {
        "mse": sq / rows,
        "fvu": sq / jnp.maximum(total_variance(x), 1e-12),
        "fvu_without_outliers": fvu_without_outliers(x, err),
        "l0": jnp.mean(jnp.sum(active, axis=-1)),
        "aux_loss": jnp.sum(jnp.square(x - x_gate)) / rows,
        "sparsity_loss": jnp.mean(gate @ dec_norms),
    }
    loss = parts["mse"] + sparsity_coefficient * parts["sparsity_loss"] + parts["aux_loss"]
    parts["loss"] = loss
    fires = jnp.sum(active, axis=0, dtype=jnp.int32)
    smallest = jnp.min(jnp.where(active, f, jnp.inf))
    pre = jax.lax.stop_gradient(pi_mag)
    return loss, (parts, fires, smallest, pre, jax.lax.stop_gradient(err))


def decode(params, f, spec: SAESpec):
    """f·W_dec + b_dec (a skip transcoder's x·W_skipᵀ is added by `output`). On a mesh:
    per-shard partial reconstructions summed over "model" (`constrain`)."""
    return constrain(matmul(f, params["W_dec"], spec.compute_dtype), ROW_BLOCK) + params["b_dec"]


def skip_term(params, x, spec: SAESpec):
    """x·W_skipᵀ [rows, d_out]: a skip transcoder's linear path (W_skip is replicated)."""
    return constrain(matmul(x, params["W_skip"].T, spec.compute_dtype), ROW_BLOCK)


def output(params, x, f, spec: SAESpec):
    """The reconstruction of the target from latents f of input x: decode, plus the skip."""
    out = decode(params, f, spec)
    return out + skip_term(params, x, spec) if spec.skip_connection else out


def encode(params, x, spec: SAESpec, training: bool = False):
    if is_gated(spec.architecture):
        return gated_activate(*gated_pre_activations(params, x, spec))
    return activate(params, pre_activations(params, x, spec), spec, training)


def forward(params, x, spec: SAESpec, training: bool = False):
    """(reconstruction, latents, pre-activations); gated: the magnitude path's π_mag."""
    if is_gated(spec.architecture):
        pi_gate, pi_mag = gated_pre_activations(params, x, spec)
        f = gated_activate(pi_gate, pi_mag)
        return decode(params, f, spec), f, pi_mag
    pre = pre_activations(params, x, spec)
    f = activate(params, pre, spec, training)
    return output(params, x, f, spec), f, pre


# ---- losses -----------------------------------------------------------------------
def total_variance(x):
    return jnp.sum(jnp.square(x - x.mean(0)))


OUTLIER_NORM_RATIO = 10.0  # a row is an outlier when its norm exceeds this × the median norm


def fvu_without_outliers(x, err):
    """FVU over the rows of the batch whose norm is at most OUTLIER_NORM_RATIO × the batch's
    median row norm (attention-sink rows can carry most of the variance). Elementwise work
    and a sort of the row norms only: no matmul."""
    row_sq = jnp.sum(jnp.square(x), axis=-1)
    norms = jnp.sqrt(row_sq)
    inlier = norms <= OUTLIER_NORM_RATIO * jnp.median(norms)
    m = jnp.maximum(jnp.sum(inlier), 1)
    mean = jnp.sum(jnp.where(inlier[:, None], x, 0.0), axis=0) / m
    # Σ‖x − mean‖² over the inliers as Σ‖x‖² − m‖mean‖²: one pass over x fewer
    variance = jnp.sum(jnp.where(inlier, row_sq, 0.0)) - m * jnp.sum(jnp.square(mean))
    sq = jnp.sum(jnp.where(inlier, jnp.sum(jnp.square(err), axis=-1), 0.0))
    return sq / jnp.maximum(variance, 1e-12)


def _auxk_dense(params, x, residual, dead, spec: SAESpec, variance):
    """The reference: the encoder recomputed and differentiated densely."""
    pre = pre_activations(params, x, spec)
    dead_pre = jnp.where(dead[None, :], pre, -jnp.inf)
    f_aux = topk_activation(dead_pre, spec.aux_k, spec.kernels)
    residual_hat = constrain(matmul(f_aux, params["W_dec"], spec.compute_dtype), ROW_BLOCK)
    return jnp.sum(jnp.square(residual_hat - residual)) / variance


def _auxk_sparse(params, x, scores, residual, dead, spec: SAESpec, variance):
    """`scores` without b_enc (select_and_decode adds it): −inf + b_enc stays −inf."""
    dead_scores = jnp.where(dead[None, :], scores, -jnp.inf)
    residual_hat = decode_top_k(params, x, dead_scores, spec.aux_k, spec)
    return jnp.sum(jnp.square(residual_hat - residual)) / variance


def auxk_variance(x, residual, spec: SAESpec):
    """What AuxK's squared error is divided by: the batch's total variance of the input x
    ("input", as the main loss's FVU), or of the residual error that AuxK fits ("residual":
    OpenAI's sparse_autoencoder, whose `normalized_mse` divides by the MSE of the target's
    batch mean, so the AuxK term stays of order 1 however good the main reconstruction is).
    A constant: the residual carries no gradient."""
    source = residual if spec.aux_normalization == "residual" else x
    return jnp.maximum(total_variance(jax.lax.stop_gradient(source)), 1e-12)


def auxk_loss(params, x, pre, residual, dead, spec: SAESpec, variance):
    """AuxK: reconstruct the main residual from the top aux_k dead latents, scaled by
    min(n_dead / aux_k, 1). `pre` and `residual` are constants (no gradient); on the sparse
    kernels `pre` is the encoder scores without b_enc, as `loss_fn` returns them."""
    scale = jnp.minimum(dead.sum() / spec.aux_k, 1.0)
    if spec.uses_sparse_kernels:
        return scale * _auxk_sparse(params, x, pre, residual, dead, spec, variance)
    return scale * _auxk_dense(params, x, residual, dead, spec, variance)


def _model_shards() -> int:
    """Size of the "model" axis of the mesh being traced under (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "model" not in mesh.axis_names else mesh.shape["model"]


def _top_k(pre, k: int, bias=None, kernels: str = "xla"):
    """lax.top_k(pre + bias) (the C++ and Pallas kernels form the sum as they scan).

    XLA's top_k sits behind an optimisation barrier: without it XLA:CPU fuses the selection into
    the gathers that consume it and redoes it per element (60x slower at small shapes).
    A third operand keeps XLA from folding the barrier's operands back into the TopK tuple
    (which its TopK decomposer cannot handle under SPMD)."""
    if bias is not None:  # selection only: gradients flow through selected_preacts
        bias = jax.lax.stop_gradient(bias)
    module = _kernel_module(kernels)
    if module is not None:
        return module.top_k(pre, k, bias)
    values, idx = jax.lax.top_k(pre if bias is None else pre + bias, k)
    values, idx, _ = jax.lax.optimization_barrier((values, idx, jnp.zeros((), jnp.int32)))
    return values, idx


def _select_and_decode_local(params, x, scores, k: int, kernels: str):
    """One device's share: Σ over the selected latents of acts·W_dec rows (no b_dec)."""
    values, idx = _top_k(scores, k, params["b_enc"], kernels)
    values = selected_preacts(
        x, params["b_dec"], params["W_enc"], params["b_enc"], idx, values, kernels
    )
    acts = jax.nn.relu(values)
    return sparse_decode(acts, idx, params["W_dec"], kernels), acts, idx


def _select_and_decode_sharded(params, x, scores, k: int, kernels: str):
    """Inside shard_map, latents split over "model": each shard's top k, the global top k
    of the candidates, then each shard decodes the selected latents it holds and the
    partial reconstructions are summed over "model".

    A shard narrower than k (or AuxK's aux_k) offers all its latents: min(k, width)
    candidates per shard is exact, since no shard can place more than its width in the
    global top k, and there are k or more candidates whenever d_sae >= k."""
    shard = jax.lax.axis_index("model")
    width = scores.shape[1]
    local_values, local_idx = _top_k(scores, min(k, width), params["b_enc"], kernels)
    candidates = jax.lax.all_gather(local_values, "model", axis=1, tiled=True)
    candidate_idx = jax.lax.all_gather(local_idx + shard * width, "model", axis=1, tiled=True)
    values, pick = _top_k(candidates, k, kernels=kernels)
    idx = jnp.take_along_axis(candidate_idx, pick, axis=1)  # global latent indices
    mine = (idx >= shard * width) & (idx < (shard + 1) * width)
    local = jnp.clip(idx - shard * width, 0, width - 1)
    values = selected_preacts(
        x,
        params["b_dec"],
        params["W_enc"],
        params["b_enc"],
        local,
        jnp.where(mine, values, 0.0),
        kernels,
    )
    acts_mine = jnp.where(mine, jax.nn.relu(values), 0.0)
    partial = sparse_decode(acts_mine, local, params["W_dec"], kernels)
    # each selected latent lives on exactly one shard: these sums assemble the full values
    # (and give them the replicated type shard_map's out_specs ask for)
    acts = jax.lax.psum(acts_mine, "model")
    idx = jax.lax.psum(jnp.where(mine, idx, 0), "model")
    return jax.lax.psum(partial, "model"), acts, idx


def select_and_decode(params, x, scores, k: int, spec: SAESpec):
    """(Σ_i acts·W_dec[idx], acts [B, k], idx [B, k]) for the top k of scores + b_enc per row.

    `scores` are the encoder scores without b_enc (`encoder_scores`): the bias is added as
    the selection scans them, so pre-activations are never stored whole. On a mesh whose
    "model" axis splits the latents, runs per shard under shard_map (a replicated TopK
    would gather every pre-activation onto every device).
    """
    scores = jax.lax.stop_gradient(scores)
    kernels = spec.kernels
    params = _selection_params(params, spec)
    if _model_shards() == 1:
        return _select_and_decode_local(params, x, scores, k, kernels)
    from jax.sharding import PartitionSpec as P

    specs = {name: LATENT_SPECS[name] for name in params}
    return jax.shard_map(
        partial(_select_and_decode_sharded, k=k, kernels=kernels),
        in_specs=(specs, P("data", None), P("data", "model")),
        out_specs=(P("data", None), P("data", None), P("data", None)),
        # Pallas's interpreter cannot type-check blocks that vary over mesh axes (see
        # pallas_kernels._call): on the CPU that path runs unchecked, and shard_map's own
        # transpose then sums the weight gradients over "data"
        check_vma=not (kernels == "pallas" and pallas_kernels.interpret_default()),
    )(params, x, scores)


def _decode_above_kth_sharded(params, x, scores, k: int, kernels: str):
    """Inside shard_map, latents split over "model": the row's k-th largest from every
    shard's own top k (`kth_largest_across`), then each shard decodes its candidates at or
    above it and the partial reconstructions are summed over "model". No candidate moves:
    what AuxK needs, whose aux_k is large and whose selection is used only to decode."""
    width = scores.shape[1]
    values, idx = _top_k(scores, min(k, width), params["b_enc"], kernels)
    keep = values >= kth_largest_across(values, k, "model")
    values = selected_preacts(
        x,
        params["b_dec"],
        params["W_enc"],
        params["b_enc"],
        idx,
        jnp.where(keep, values, 0.0),
        kernels,
    )
    acts = jnp.where(keep, jax.nn.relu(values), 0.0)
    return jax.lax.psum(sparse_decode(acts, idx, params["W_dec"], kernels), "model")


def decode_top_k(params, x, scores, k: int, spec: SAESpec):
    """Σ_i acts·W_dec[idx] over the top k of scores + b_enc per row: `select_and_decode`'s
    reconstruction alone (an exact tie at the k-th value keeps every tied latent)."""
    scores = jax.lax.stop_gradient(scores)
    kernels = spec.kernels
    params = _selection_params(params, spec)
    if _model_shards() == 1:
        return _select_and_decode_local(params, x, scores, k, kernels)[0]
    from jax.sharding import PartitionSpec as P

    specs = {name: LATENT_SPECS[name] for name in params}
    return jax.shard_map(
        partial(_decode_above_kth_sharded, k=k, kernels=kernels),
        in_specs=(specs, P("data", None), P("data", "model")),
        out_specs=P("data", None),
        check_vma=not (kernels == "pallas" and pallas_kernels.interpret_default()),
    )(params, x, scores)


def _selection_params(params, spec: SAESpec) -> dict:
    """The parameters the sparse selection and decode read. Their "b_dec" is only the centre
    subtracted from the input; an input that is not centred (a transcoder's, or
    apply_b_dec_to_input false) gets a zero centre of width d_in: `selected_preacts` then forms
    its encoder gradient from x itself, and the real b_dec is added by the caller."""
    chosen = {name: value for name, value in params.items() if name in LATENT_SPECS}
    if spec.transcoder or not spec.apply_b_dec_to_input:
        chosen["b_dec"] = jnp.zeros(spec.d_in, jnp.float32)
    return chosen


def _sparse_forward(params, x, spec: SAESpec):
    """TopK through the sparse kernels: (reconstruction, values [B,k], idx [B,k], scores),
    scores being the pre-activations without b_enc."""
    scores = jax.lax.stop_gradient(encoder_scores(params, x, spec))
    decoded, acts, idx = select_and_decode(params, x, scores, spec.k, spec)
    out = decoded + params["b_dec"]
    if spec.skip_connection:
        out = out + skip_term(params, x, spec)
    return out, acts, idx, scores


def matryoshka_loss(params, x, f, spec: SAESpec, variance, fvu):
    """Matryoshka BatchTopK (Bussmann et al. 2025): the mean over the nested prefixes m of
    ||x − (f[:, :m]·W_dec[:m] + b_dec)||² / total variance, from the one BatchTopK selection
    `f` over the whole dictionary. Equal weights, so the last term is BatchTopK's own FVU and
    the loss keeps its scale (AuxK's weight means the same). Each prefix is the latents below
    its width kept by a mask, which a latent-split mesh applies per shard; it costs one
    decoder matmul per inner prefix (`fvu`, the whole dictionary's, is already known)."""
    latent = jnp.arange(spec.d_sae)
    total = fvu
    for width in spec.matryoshka_widths[:-1]:
        prefix = constrain(jnp.where(latent[None, :] < width, f, 0.0), LATENT_BLOCK)
        total = total + jnp.sum(jnp.square(x - decode(params, prefix, spec))) / variance
    return total / len(spec.matryoshka_widths)


def loss_fn(params, x, spec: SAESpec, sparsity_coefficient, y=None):
    """The main training loss (AuxK apart, see `loss_and_grads`). `x` is in training units;
    `y` is a transcoder's target (None: x itself), which the errors and FVU are measured on.

    Returns (loss, (parts, fires, smallest_active, pre, err)): fires [d_sae] counts the
    rows in which each latent is active; smallest_active is the smallest positive
    activation (BatchTopK's threshold statistic); pre and err feed AuxK (on the sparse
    kernels pre is without b_enc, which the selection adds itself).
    """
    if is_gated(spec.architecture):
        return gated_loss_fn(params, x, spec, sparsity_coefficient)
    if spec.uses_sparse_kernels:
        x_hat, acts, idx, pre = _sparse_forward(params, x, spec)
        active = acts > 0
        fires = (
            jnp.zeros(spec.d_sae, jnp.int32)
            .at[idx.reshape(-1)]
            .add(active.reshape(-1).astype(jnp.int32))
        )
        smallest = jnp.min(jnp.where(active, acts, jnp.inf))
    else:
        x_hat, f, pre = forward(params, x, spec, training=True)
        active = f > 0
        fires = jnp.sum(active, axis=0, dtype=jnp.int32)
        smallest = jnp.min(jnp.where(active, f, jnp.inf))
    target = x if y is None else y
    err = target - x_hat
    sq = jnp.sum(jnp.square(err))
    variance = jnp.maximum(total_variance(target), 1e-12)
    parts = {
        "mse": sq / x.shape[0],
        "fvu": sq / variance,
        "fvu_without_outliers": fvu_without_outliers(target, err),
        "l0": jnp.mean(jnp.sum(active, axis=-1)),
        "aux_loss": jnp.float32(0.0),
        "sparsity_loss": jnp.float32(0.0),
    }
    a = spec.architecture
    if a == "relu":
        dec_norms = jnp.linalg.norm(params["W_dec"], axis=-1)
        parts["sparsity_loss"] = jnp.mean(f @ dec_norms)
        loss = parts["mse"] + sparsity_coefficient * parts["sparsity_loss"]
    elif a == "jumprelu":
        l0 = step_fn(pre, params["threshold"], spec.jumprelu_bandwidth).sum(-1).mean()
        parts["sparsity_loss"] = l0
        loss = parts["mse"] + sparsity_coefficient * l0
    elif a == "matryoshka_batchtopk":
        loss = matryoshka_loss(params, x, f, spec, variance, parts["fvu"])
    else:
        loss = parts["fvu"]
    parts["loss"] = loss
    return loss, (parts, fires, smallest, jax.lax.stop_gradient(pre), jax.lax.stop_gradient(err))


def loss_and_grads(params, x, spec: SAESpec, dead, sparsity_coefficient, aux_coefficient, y=None):
    """(parts, fires, smallest_active, grads) of the full loss, AuxK included; `y` is a
    transcoder's target (None: x). AuxK reconstructs the residual y − ŷ from x's dead latents.

    AuxK has its own gradient inside a lax.cond that runs only while some latent is dead:
    differentiating through the cond instead would keep both branches' residuals alive and
    cost as much as the AuxK pass itself on every step.
    """
    x = constrain(x, ROW_BLOCK)  # on a mesh: the rows regathered over "model" once, here
    y = None if y is None else constrain(y, ROW_BLOCK)
    (_, (parts, fires, smallest, pre, err)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, spec, sparsity_coefficient, y
    )
    if not selects_top_k(spec.architecture):
        return parts, fires, smallest, grads
    variance = auxk_variance(x if y is None else y, err, spec)

    def with_aux(grads):
        aux, aux_grads = jax.value_and_grad(auxk_loss)(params, x, pre, err, dead, spec, variance)
        return aux, jax.tree_util.tree_map(lambda g, a: g + aux_coefficient * a, grads, aux_grads)

    aux, grads = jax.lax.cond(jnp.any(dead), with_aux, lambda g: (jnp.float32(0.0), g), grads)
    parts = {**parts, "aux_loss": aux, "loss": parts["loss"] + aux_coefficient * aux}
    return parts, fires, smallest, grads


# ---- initialisation helpers ---------------------------------------------------------
def geometric_median(points: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm, in float64."""
    x = np.asarray(points, np.float64)
    median = x.mean(0)
    for _ in range(iters):
        dist = np.maximum(np.linalg.norm(x - median, axis=1), 1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(new - median) <= tol * max(1.0, np.linalg.norm(median)):
            return new
        median = new
    return median
