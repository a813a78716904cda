"""What a run is built from: the SAE's spec, the data statistics, the initial state, the
mesh, and what a checkpoint must agree on. Shared by `train`, `sweep`, `bench` and the
dry run, so they all start a run the same way."""

from __future__ import annotations

import math

import jax
import numpy as np

from saejax.config import MeshConfig, RunConfig, SAEConfig
from saejax.core import sae as S
from saejax.core.architectures import has_l1_penalty, matryoshka_prefixes
from saejax.core.sharding import make_mesh
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.data import ArraySource, sample_rows, split_columns, split_rows
from saejax.train.launch import Launch, resolve_launch
from saejax.train.launch import init_distributed as init_distributed_launch


def open_source(cfg: RunConfig) -> ArraySource:
    """The training rows: data.hook's activations, and for a transcoder data.target_hook's
    beside them at the same rows ([x | y], see `step.scaled_rows`)."""
    target = cfg.data.target_hook
    return ArraySource(cfg.data.path, cfg.data.hook, also=[target] if target else [])


def target_width(source: ArraySource) -> int | None:
    """d_out of a transcoder's source (the target hook's width); None for an SAE's."""
    return source.widths[1] if len(source.widths) > 1 else None


def spec_from_config(cfg: SAEConfig, d_in: int, d_out: int | None = None) -> S.SAESpec:
    """The SAE's spec; `d_out` (the target hook's width) makes it a transcoder."""
    aux_k = cfg.aux_k or max(1, (d_in if d_out is None else d_out) // 2)
    return S.SAESpec(
        cfg.architecture,
        d_in,
        cfg.d_sae,
        cfg.k,
        min(aux_k, cfg.d_sae),
        cfg.jumprelu_bandwidth,
        cfg.dtype,
        cfg.topk_kernel,
        matryoshka_prefixes(cfg.matryoshka_widths, cfg.d_sae)
        if cfg.architecture == "matryoshka_batchtopk"
        else (),
        d_out=d_out or 0,
        transcoder=d_out is not None,
        skip_connection=cfg.skip_connection,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        aux_normalization=cfg.aux_normalization,
    )


def resample_enabled(cfg: RunConfig) -> bool:
    enabled = cfg.train.resample.enabled
    default = has_l1_penalty(cfg.sae.architecture) or cfg.sae.architecture == "jumprelu"
    return default if enabled is None else enabled


def data_slices(cfg: RunConfig) -> int:
    return cfg.data.slices or jax.process_count()


def checkpoint_info(cfg: RunConfig, d_in: int, d_out: int | None = None) -> dict:
    """What a checkpoint must agree on with the config that resumes it (a transcoder's also
    its target hook, d_out and skip; an SAE's keys stay as older checkpoints recorded them)."""
    s = cfg.sae
    transcoder = (
        {
            "target_hook": cfg.data.target_hook,
            "d_out": d_out,
            "skip_connection": s.skip_connection,
        }
        if cfg.data.target_hook
        else {}
    )
    return transcoder | {
        "architecture": s.architecture,
        "d_in": d_in,
        "d_sae": s.d_sae,
        "k": s.k,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
        "data_slices": data_slices(cfg),
    }


def data_statistics(cfg: RunConfig, source: ArraySource) -> tuple:
    """(input scale, initial b_dec) from a seeded sample of training rows. A transcoder's
    scale is (x's, y's), each to its own mean norm sqrt(width), and b_dec comes from y."""
    # every command reads through `open_source`; this guards a library caller that opened
    # data.hook alone, whose statistics would otherwise be an SAE's, not the transcoder's
    if cfg.data.target_hook and len(source.widths) == 1:
        raise SaejaxError(
            f"data.target_hook {cfg.data.target_hook} is set (a transcoder) but the rows read "
            f"hold {source.hook or cfg.data.path} alone; "
            "open them with saejax.train.setup.open_source(cfg)"
        )
    split = split_rows(source.n_rows, cfg.data.validation_tokens, source.store)
    sample = sample_rows(source, 16384, cfg.data.seed, split.train_rows)
    parts = split_columns(sample, source.widths)
    scales = [_scale_of(part, cfg.sae.scale_inputs) for part in parts]
    target = parts[-1] * scales[-1]  # x itself for an SAE
    b_dec = {
        "geometric_median": lambda: S.geometric_median(target[:4096]),
        "mean": lambda: target.mean(0),
        "zeros": lambda: np.zeros(target.shape[1]),
    }[cfg.sae.b_dec_init]()
    return (scales[0] if len(scales) == 1 else tuple(scales)), b_dec


def _scale_of(rows: np.ndarray, scale_inputs: bool) -> float:
    """The factor that brings the rows' mean norm to sqrt(width) (1 when not scaling)."""
    if not scale_inputs:
        return 1.0
    mean_norm = float(np.linalg.norm(rows, axis=1).mean())
    return math.sqrt(rows.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def prepare(cfg: RunConfig, source: ArraySource, stats: tuple | None = None):
    """Input scale, b_dec initialisation and the initial state (deterministic in the seeds).
    `stats` reuses (scale, b_dec) already computed for the same data (sweeps)."""
    spec = spec_from_config(cfg.sae, source.d_in, target_width(source))
    scale, b_dec = stats if stats is not None else data_statistics(cfg, source)
    total_steps = cfg.train.tokens // cfg.train.batch_size
    tx = T.make_optimizer(cfg.train, total_steps, cfg.sae)
    params = S.init_params(
        spec, jax.random.PRNGKey(cfg.train.seed), b_dec, cfg.sae.jumprelu_init_threshold
    )
    state = T.init_state(params, tx, cfg.train.seed, scale)
    return spec, tx, state, total_steps


def init_distributed(cfg: MeshConfig, launch: Launch | None = None) -> None:
    """jax.distributed.initialize() for this process's launch (`train.launch`: flags, SAEJAX_*
    or torchrun variables, read at every start), or JAX's own cluster detection (SLURM, TPU
    pods) with `mesh.distributed: auto`."""
    init_distributed_launch(launch if launch is not None else resolve_launch(), cfg.distributed)


def mesh_for(cfg: MeshConfig):
    return make_mesh(cfg.data, cfg.model)
