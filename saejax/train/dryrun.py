"""`saejax train --dry-run`: memory per device and communication per step, before training.

Counted in float32 master weights (bf16 compute changes activations, not the state):
    parameters   W_enc and W_dec split over "model" (d_in·d_sae/model each), b_enc and the
                 threshold split too, b_dec replicated
    optimizer    Adam's two moments, shaped like the parameters
    counters     tokens-since-fired and the fire counts, per latent (int32, split)
    activations  the step's largest buffers: batch/data rows of the inputs and
                 reconstructions, and of the pre-activations over the device's latents
                 (four such buffers for a dense SAE, one for TopK on the sparse kernels)
Communication, bytes each device sends per step (ring all-reduce ≈ 2·(n−1)/n of the
buffer): the gradient all-reduce over "data", the reconstruction sums over "model" (forward
and backward), and for TopK the candidate exchange over "model".
"""

from __future__ import annotations

from saejax.config import RunConfig

F32 = 4


def _ring(n: int, nbytes: float) -> float:
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def estimate(cfg: RunConfig, d_in: int) -> dict:
    s, data, model = cfg.sae, cfg.mesh.data, cfg.mesh.model
    latents = s.d_sae // model
    rows = cfg.train.batch_size // data
    has_threshold = s.architecture in ("jumprelu", "batchtopk")
    params = F32 * (2 * d_in * latents + latents + d_in + (latents if has_threshold else 0))
    sparse = s.architecture == "topk" and s.topk_kernel == "sparse"
    compute = 2 if s.dtype == "bfloat16" else F32
    activations = (
        rows * d_in * F32 * 4  # inputs, reconstruction, error, its gradient
        + rows * latents * compute * (1 if sparse else 4)
    )
    if s.architecture in ("topk", "batchtopk"):
        activations += rows * s.k * (F32 + 4) * (model if model > 1 else 1)
    per_device = {
        "parameters": params,
        "optimizer": 2 * params,
        "gradients": params,
        "counters": 2 * 4 * latents,
        "activations": activations,
    }
    per_device["total"] = sum(per_device.values())
    communication = {
        "gradient_all_reduce_over_data": _ring(data, params),
        "reconstruction_sum_over_model": 2 * _ring(model, rows * d_in * F32),
        "topk_candidates_over_model": (
            (model - 1) * rows * s.k * (F32 + 4) + _ring(model, 2 * rows * s.k * (F32 + 4))
            if s.architecture in ("topk", "batchtopk") and model > 1
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
    lines.append("sent per device per step")
    for key, value in est["bytes_sent_per_device_per_step"].items():
        lines.append(f"  {key:<33}{_size(value):>14}")
    return "\n".join(lines)
