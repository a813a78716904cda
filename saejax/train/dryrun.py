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

Host memory (not on the device): the loader holds two shuffle groups (the one served and
the one read ahead: 2 × shuffle_blocks × block_rows × d_in in the store's dtype) and up to
prefetch + loader_threads ready batches.

Communication, bytes each device sends per step (ring all-reduce ≈ 2·(n−1)/n of the
buffer): the gradient all-reduce over "data", the reconstruction sums over "model" (forward
and backward), and for TopK the candidate exchange over "model".
"""

from __future__ import annotations

import os

from saejax.config import RunConfig
from saejax.core.architectures import has_threshold, selects_top_k

F32 = 4

# step_buffers coefficients (rows·latents·4, parameter bytes, rows·d_in·4), fitted as above
STEP_BUFFERS = {
    ("relu", "float32"): (3.0, 0.0, 2.0),
    ("relu", "bfloat16"): (4.0, 1.0, 2.0),
    ("jumprelu", "float32"): (6.0, 0.0, 2.0),
    ("jumprelu", "bfloat16"): (6.0, 1.0, 2.0),
    ("topk_sparse", "float32"): (1.92, 1.3, 4.37),
    ("topk_sparse", "bfloat16"): (1.92, 1.3, 4.37),
    ("topk_dense", "float32"): (3.83, 1.6, 5.24),
    ("topk_dense", "bfloat16"): (3.83, 3.58, 5.24),  # as batchtopk (f32 alike)
    ("batchtopk", "float32"): (3.83, 1.6, 5.24),
    ("batchtopk", "bfloat16"): (3.83, 3.58, 5.24),
}


def _ring(n: int, nbytes: float) -> float:
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def _step_kind(architecture: str, topk_kernel: str) -> str:
    if architecture == "topk":
        return "topk_dense" if topk_kernel == "dense" else "topk_sparse"
    return "batchtopk" if selects_top_k(architecture) else architecture


def estimate(cfg: RunConfig, d_in: int, store_itemsize: int = F32) -> dict:
    """Bytes per device and per host, and bytes sent per step; `store_itemsize` is the size
    of one stored value (2 for a bfloat16 store, 4 for float32 and .npy float32)."""
    s, data, model = cfg.sae, cfg.mesh.data, cfg.mesh.model
    latents = s.d_sae // model
    rows = cfg.train.batch_size // data
    threshold = has_threshold(s.architecture)
    params = F32 * (2 * d_in * latents + latents + d_in + (latents if threshold else 0))
    b, c, e = STEP_BUFFERS[(_step_kind(s.architecture, s.topk_kernel), s.dtype)]
    per_device = {
        "parameters": params,
        "optimizer": 2 * params,
        "counters": 2 * 4 * latents,
        "input_batch": rows * d_in * store_itemsize,
        "step_buffers": b * rows * latents * F32 + c * params + e * rows * d_in * F32,
    }
    per_device["total"] = sum(per_device.values())
    d = cfg.data
    threads = d.loader_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    host = {
        "shuffle_groups": 2 * d.shuffle_blocks * d.block_rows * d_in * store_itemsize,
        "ready_batches": (d.prefetch + threads) * cfg.train.batch_size * d_in * store_itemsize,
    }
    host["total"] = sum(host.values())
    communication = {
        "gradient_all_reduce_over_data": _ring(data, params),
        "reconstruction_sum_over_model": 2 * _ring(model, rows * d_in * F32),
        "topk_candidates_over_model": (
            (model - 1) * rows * s.k * (F32 + 4) + _ring(model, 2 * rows * s.k * (F32 + 4))
            if selects_top_k(s.architecture) and model > 1
            else 0.0
        ),
    }
    communication["total"] = sum(communication.values())
    return {
        "mesh": {"data": data, "model": model},
        "d_in": d_in,
        "d_sae": s.d_sae,
        "batch_size": cfg.train.batch_size,
        "bytes_per_device": per_device,
        "host_bytes": host,
        "bytes_sent_per_device_per_step": communication,
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
        f"sae          d_in {est['d_in']:,}  d_sae {est['d_sae']:,}  batch {est['batch_size']:,}",
        "per device",
    ]
    for key, value in est["bytes_per_device"].items():
        lines.append(f"  {key:<13}{_size(value):>14}")
    lines.append("per host (the loader's buffers, not on the device)")
    for key, value in est["host_bytes"].items():
        lines.append(f"  {key:<15}{_size(value):>12}")
    lines.append("sent per device per step")
    for key, value in est["bytes_sent_per_device_per_step"].items():
        lines.append(f"  {key:<33}{_size(value):>14}")
    return "\n".join(lines)
