"""`saejax train --dry-run`: memory per device and communication per step, before training.

Device memory of the compiled step, per device (latents split over "model", rows over "data"):
    parameters   W_enc and W_dec split over "model" (d_in·d_sae/model each), b_enc and the
                 threshold split too, b_dec replicated; float32 master weights
    optimizer    Adam's two moments, shaped like the parameters
    counters     tokens-since-fired and the fire counts, per latent (int32, split)
    input_batch  the batch the step receives (rows/data × d_in, in the store's dtype)
    step_buffers what XLA allocates inside the step: the gradients and updates fused into
                 it, and the [rows, latents] buffers - pre-activations, the activation and
                 its gradient, and for TopK the AuxK pass over every latent (a second
                 [rows, d_sae] score buffer and its top aux_k), which the estimate before
                 this one left out (TopK undercounted ≈ 1.45×)
The step_buffers are a b·(rows·latents·4) + c·(parameters) + e·(rows·d_in·4) with (b, c, e) per
architecture and compute dtype, fitted to `jax.jit(step).lower(...).compile()
.memory_analysis()` (temp bytes) of the real step at six shapes on XLA:CPU (within 1% there;
a test holds the total within 15% of argument + output − alias + temp). Other backends fuse
differently: treat the figure as an estimate, and check on the device with one real step.

A transcoder (data.target_hook) counts its decoder in the target's width d_out (W_dec
[d_sae, d_out], b_dec [d_out]), the optional replicated W_skip [d_out, d_in] with its Adam
moments and gradient all-reduce, and input rows d_in + d_out wide (both hooks side by side);
the step_buffers' per-row term takes the mean of the two widths (not refitted for transcoders).

Host memory (not on the device): the loader holds two shuffle groups (the one served and
the one read ahead: 2 × shuffle_blocks × block_rows × d_in in the store's dtype) and up to
prefetch + loader_threads ready batches.

Communication, bytes each device sends per step: every collective the compiled step runs
(`collectives` below), costed as `train.collectives` costs the compiled step's own HLO
(all-gather (n−1)/n of the result, all-reduce 2(n−1)/n of the buffer), and split into bytes
that stay within a process and bytes that cross to another for a layout of processes ×
devices per process (`saejax train --dry-run --num-processes N`, else data.slices, else
1). A test holds the total within 20% of the compiled step's inventory on a (4, 2) mesh for
every architecture.
The rows of a batch are regathered over "model"; the reconstruction (and TopK's selected
values) are summed over "model"; the gradients of the split parameters are all-reduced
over "data"; sparse TopK exchanges [rows, k] candidates per shard over "model"; a k-th
largest over shards (dense TopK per row, BatchTopK's cutoff over the whole mesh) is 32
all-reduces of a count, one per bit. AuxK, which runs only while some latent is dead,
repeats the selection (a k-th largest per row), the reconstruction sum and the gradient
all-reduce (XLA reduces AuxK's gradients apart, inside the lax.cond): it is counted in
the total and shown apart.
"""

from __future__ import annotations

import os

import numpy as np

from saejax.config import RunConfig
from saejax.core.architectures import (
    batch_selects,
    has_l1_penalty,
    is_gated,
    latent_vectors,
    matryoshka_prefixes,
    selects_top_k,
    uses_sparse_kernels,
)
from saejax.train.collectives import Collective, traffic

F32 = 4

# step_buffers coefficients (rows·latents·4, parameter bytes, rows·d_in·4), fitted as above
STEP_BUFFERS = {
    ("relu", "float32"): (3.0, 0.0, 2.0),
    # bf16 refitted when the CPU's weight gradients stopped casting their operands to float32
    ("relu", "bfloat16"): (3.3, 1.0, 2.0),
    ("jumprelu", "float32"): (6.0, 0.0, 2.0),
    ("jumprelu", "bfloat16"): (5.3, 1.0, 2.0),
    ("topk_sparse", "float32"): (1.92, 1.3, 4.37),
    ("topk_sparse", "bfloat16"): (1.92, 1.3, 4.37),
    # refitted when dense TopK and AuxK kept "at least the k-th largest" (no scatter)
    ("topk_dense", "float32"): (3.97, 0.95, 2.61),
    ("topk_dense", "bfloat16"): (4.41, 0.79, 3.21),
    ("batchtopk", "float32"): (3.11, 1.38, 3.84),
    ("batchtopk", "bfloat16"): (3.61, 1.32, 3.99),
    ("gated", "float32"): (5.0, 0.0, 3.0),
    ("gated", "bfloat16"): (5.0, 0.3, 2.0),
    # fitted with the default three prefixes (each inner prefix adds a masked [rows, latents]
    # block and its decode)
    ("matryoshka_batchtopk", "float32"): (5.3, 0.0, 5.0),
    ("matryoshka_batchtopk", "bfloat16"): (6.75, 0.25, 3.0),
}


KTH_ROUNDS = 32  # core.sae.KTH_ROUNDS: a k-th largest over shards is one count per bit


def _groups(data: int, model: int, axis: str) -> tuple:
    """Device groups of one mesh axis ("all": the whole mesh); ids are mesh positions,
    process-major."""
    ids = np.arange(data * model).reshape(data, model)
    if axis == "all":
        return (tuple(range(data * model)),)
    return tuple(tuple(int(v) for v in row) for row in (ids if axis == "model" else ids.T))


def target_width(cfg: RunConfig, d_in: int, d_out: int | None = None) -> int:
    """d_out: as given, else the width of data.target_hook in the store, else d_in (an SAE)."""
    if d_out:
        return d_out
    if not cfg.data.target_hook:
        return d_in
    from saejax.store import ActivationStore

    return ActivationStore.open(cfg.data.path).d_in_of(cfg.data.target_hook)


def _parameter_shapes(cfg: RunConfig, d_in: int, d_out: int, latents: int) -> list:
    """The shapes of one device's parameters (latents split over "model")."""
    s = cfg.sae
    shapes = [(d_in, latents), (latents, d_out), (d_out,)]
    shapes += [(latents,)] * len(latent_vectors(s.architecture))
    return shapes + ([(d_out, d_in)] if s.skip_connection and cfg.data.target_hook else [])


def collectives(cfg: RunConfig, d_in: int, d_out: int | None = None) -> dict:
    """{term: [Collective, ...]}: what the compiled step exchanges per step, as predicted from
    the config (terms whose names start with "auxk" run only while some latent is dead)."""
    s, data, model = cfg.sae, cfg.mesh.data, cfg.mesh.model
    d_out = target_width(cfg, d_in, d_out)
    latents, rows = s.d_sae // model, cfg.train.batch_size // data
    over = {axis: _groups(data, model, axis) for axis in ("data", "model", "all")}

    def op(kind, axis, *shapes):
        shapes = tuple(((dtype, tuple(dims))) for dtype, dims in shapes)
        nbytes = sum(F32 * int(np.prod(dims)) for _, dims in shapes)
        return Collective(kind, shapes, nbytes, over[axis], "predicted", False, False)

    params = [("f32", shape) for shape in _parameter_shapes(cfg, d_in, d_out, latents)]
    gradients = op("all-reduce", "data", *params)
    rows_in = ("f32", (rows, d_in + d_out if cfg.data.target_hook else d_in))  # [x | y]
    recon = op("all-reduce", "model", ("f32", (rows, d_out)))
    terms = {
        "inputs_regathered_over_model": [op("all-gather", "model", rows_in)],
        "reconstruction_sum_over_model": [recon],
        "gradient_all_reduce_over_data": [gradients],
        # per-row sums over the latents: L0 (and relu's or gated's L1 penalty); per-latent
        # fire counts
        "row_sums_over_model": [op("all-reduce", "model", ("s32", (rows,)))]
        + ([op("all-reduce", "model", ("f32", (rows,)))] if has_l1_penalty(s.architecture) else []),
        "fire_counts_over_data": [op("all-reduce", "data", ("s32", (latents,)))],
    }
    sparse = uses_sparse_kernels(s.architecture, s.topk_kernel)

    if s.architecture == "matryoshka_batchtopk":  # each inner prefix's reconstruction
        inner = len(matryoshka_prefixes(s.matryoshka_widths, s.d_sae)) - 1
        terms["matryoshka_prefix_sums_over_model"] = [recon] * inner
        # XLA all-reduces each prefix's share of W_enc's gradient over "data" before adding
        # them (seen in the compiled step's HLO)
        encoder = ("f32", (d_in, latents))
        terms["matryoshka_encoder_gradients_over_data"] = [
            op("all-reduce", "data", encoder)
        ] * inner
    if is_gated(s.architecture):  # the gate's own reconstruction, for the auxiliary loss
        terms["gate_reconstruction_over_model"] = [recon]
    # the k-th largest of each row over the shards: one count per row and bit (dense TopK,
    # and AuxK on every path)
    kth_per_row = [op("all-reduce", "model", ("s32", (rows, 1)))] * KTH_ROUNDS
    if s.architecture == "topk" and sparse:
        # values and indices of every shard's top k, then the selection summed over "model"
        width = min(s.k, latents) * model
        terms["topk_candidates_over_model"] = [
            op("all-gather", "model", ("f32", (rows, width)), ("s32", (rows, width))),
            op("all-reduce", "model", ("f32", (rows, s.k)), ("s32", (rows, s.k))),
        ]
    elif s.architecture == "topk":
        terms["topk_kth_largest_over_model"] = kth_per_row
    if batch_selects(s.architecture):  # the batch's cutoff: one count per bit, whole mesh
        terms["batchtopk_cutoff_over_mesh"] = [op("all-reduce", "all", ("s32", ()))] * KTH_ROUNDS
    if selects_top_k(s.architecture):
        terms["auxk_selection_over_model"] = kth_per_row
        terms["auxk_reconstruction_sum_over_model"] = [recon]
        terms["auxk_gradient_all_reduce_over_data"] = [gradients]
    return terms


def processes_of(cfg: RunConfig) -> int:
    """Processes the dry run lays the devices over when the launch does not say (the process
    count is a launch setting, `saejax train --num-processes`): data.slices (one per process
    by default), else 1."""
    return max(1, cfg.data.slices or 1)


def communication(
    cfg: RunConfig, d_in: int, processes: int | None = None, d_out: int | None = None
) -> dict:
    """Bytes one device sends per step, per term, with the total split into within-host and
    across-host bytes for `processes` processes of mesh.data·mesh.model/processes devices."""
    n = cfg.mesh.data * cfg.mesh.model
    processes = processes or processes_of(cfg)
    per_process = max(1, n // processes)
    terms = collectives(cfg, d_in, d_out)
    out = {name: traffic(ops, n, per_process)["total"] for name, ops in terms.items()}
    split = traffic([c for ops in terms.values() for c in ops], n, per_process)
    out["total"] = split["total"]
    out["of_which_auxk"] = sum(v for k, v in out.items() if k.startswith("auxk"))
    out["within_host"] = split["within_host"]
    out["across_host"] = split["across_host"]
    return out


def _step_kind(architecture: str, topk_kernel: str) -> str:
    if architecture == "topk":
        return "topk_dense" if topk_kernel == "dense" else "topk_sparse"
    if architecture == "matryoshka_batchtopk":
        return architecture
    return "batchtopk" if selects_top_k(architecture) else architecture


def estimate(
    cfg: RunConfig,
    d_in: int,
    store_itemsize: int = F32,
    processes: int | None = None,
    d_out: int | None = None,
) -> dict:
    """Bytes per device and per host, and bytes sent per step; `store_itemsize` is the size
    of one stored value (2 for a bfloat16 store, 4 for float32 and .npy float32);
    `processes` lays the devices over that many processes (default: `processes_of`);
    `d_out` a transcoder's target width (None: from the store when data.target_hook is set)."""
    s, data, model = cfg.sae, cfg.mesh.data, cfg.mesh.model
    d_out = target_width(cfg, d_in, d_out)
    latents = s.d_sae // model
    rows = cfg.train.batch_size // data
    # b_enc (and the threshold) or gated's 3; W_skip for a skip transcoder
    params = F32 * sum(
        int(np.prod(shape)) for shape in _parameter_shapes(cfg, d_in, d_out, latents)
    )
    row_width = d_in + d_out if cfg.data.target_hook else d_in  # both hooks side by side
    b, c, e = STEP_BUFFERS[(_step_kind(s.architecture, s.topk_kernel), s.dtype)]
    per_device = {
        "parameters": params,
        "optimizer": 2 * params,
        "counters": 2 * 4 * latents,
        "input_batch": rows * row_width * store_itemsize,
        "step_buffers": b * rows * latents * F32 + c * params + e * rows * (d_in + d_out) / 2 * F32,
    }
    per_device["total"] = sum(per_device.values())
    d = cfg.data
    threads = d.loader_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    host = {
        "shuffle_groups": 2 * d.shuffle_blocks * d.block_rows * row_width * store_itemsize,
        "ready_batches": (d.prefetch + threads) * cfg.train.batch_size * row_width * store_itemsize,
    }
    host["total"] = sum(host.values())
    processes = processes or processes_of(cfg)
    return {
        "mesh": {"data": data, "model": model},
        "processes": processes,
        "d_in": d_in,
        "d_out": d_out,
        "d_sae": s.d_sae,
        "batch_size": cfg.train.batch_size,
        "bytes_per_device": per_device,
        "host_bytes": host,
        "bytes_sent_per_device_per_step": communication(cfg, d_in, processes, d_out),
    }


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:,.1f} {unit}" if unit != "B" else f"{nbytes:,.0f} B"
        nbytes /= 1024
    return f"{nbytes:,.1f} TiB"


def describe(est: dict) -> str:
    m = est["mesh"]
    lines = [
        f"mesh         data {m['data']} × model {m['model']} = {m['data'] * m['model']} devices",
        f"sae          d_in {est['d_in']:,}  d_sae {est['d_sae']:,}  batch {est['batch_size']:,}"
        + (f"  d_out {est['d_out']:,}" if est.get("d_out", est["d_in"]) != est["d_in"] else ""),
        "per device",
    ]
    for key, value in est["bytes_per_device"].items():
        lines.append(f"  {key:<13}{_size(value):>14}")
    lines.append("per host (the loader's buffers, not on the device)")
    for key, value in est["host_bytes"].items():
        lines.append(f"  {key:<15}{_size(value):>12}")
    n = m["data"] * m["model"]
    p = est["processes"]
    lines.append(f"sent per device per step ({p} process(es) × {max(1, n // p)} devices)")
    for key, value in est["bytes_sent_per_device_per_step"].items():
        if value or key in ("total", "within_host", "across_host"):  # terms that send nothing: off
            lines.append(f"  {key:<36}{_size(value):>12}")
    return "\n".join(lines)
