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
from saejax.train import step as T
from saejax.train.data import ArraySource, sample_rows, split_rows
from saejax.train.launch import Launch, resolve_launch
from saejax.train.launch import init_distributed as init_distributed_launch


def spec_from_config(cfg: SAEConfig, d_in: int) -> S.SAESpec:
    aux_k = cfg.aux_k or max(1, d_in // 2)
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
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        aux_normalization=cfg.aux_normalization,
    )


def resample_enabled(cfg: RunConfig) -> bool:
    enabled = cfg.train.resample.enabled
    default = has_l1_penalty(cfg.sae.architecture) or cfg.sae.architecture == "jumprelu"
    return default if enabled is None else enabled


def data_slices(cfg: RunConfig) -> int:
    return cfg.data.slices or jax.process_count()


def checkpoint_info(cfg: RunConfig, d_in: int) -> dict:
    """What a checkpoint must agree on with the config that resumes it."""
    s = cfg.sae
    return {
        "architecture": s.architecture,
        "d_in": d_in,
        "d_sae": s.d_sae,
        "k": s.k,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
        "data_slices": data_slices(cfg),
    }


def data_statistics(cfg: RunConfig, source: ArraySource) -> tuple[float, np.ndarray]:
    """(input scale, initial b_dec) from a seeded sample of training rows."""
    d_in = source.d_in
    split = split_rows(source.n_rows, cfg.data.validation_tokens, source.store)
    sample = sample_rows(source, 16384, cfg.data.seed, split.train_rows)
    scale = 1.0
    if cfg.sae.scale_inputs:
        mean_norm = float(np.linalg.norm(sample, axis=1).mean())
        scale = math.sqrt(d_in) / mean_norm if mean_norm > 0 else 1.0
    sample = sample * scale
    b_dec = {
        "geometric_median": lambda: S.geometric_median(sample[:4096]),
        "mean": lambda: sample.mean(0),
        "zeros": lambda: np.zeros(d_in),
    }[cfg.sae.b_dec_init]()
    return scale, b_dec


def prepare(cfg: RunConfig, source: ArraySource, stats: tuple | None = None):
    """Input scale, b_dec initialisation and the initial state (deterministic in the seeds).
    `stats` reuses (scale, b_dec) already computed for the same data (sweeps)."""
    spec = spec_from_config(cfg.sae, source.d_in)
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
