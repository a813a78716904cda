"""`train --dry-run`'s device memory against XLA's own analysis of the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from saejax.core import sae as S
from saejax.train import step as T
from saejax.train.dryrun import estimate
from saejax.train.setup import spec_from_config


def compiled_step_bytes(cfg, d_in: int) -> int:
    """argument + output − aliased + temporary bytes of the jitted, donating train step."""
    spec = spec_from_config(cfg.sae, d_in)
    tx = T.make_optimizer(cfg.train, 1000)
    params = S.init_params(spec, jax.random.PRNGKey(0), np.zeros(d_in, np.float32), 0.001)
    state = T.init_state(params, tx, 0, 1.0)
    step = T.make_train_step(spec, cfg.sae, tx, 1000)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, d_in), jnp.float32)
    m = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


@pytest.mark.parametrize(
    "arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
)
@pytest.mark.parametrize("d_in, d_sae, batch", [(48, 1536, 384), (160, 640, 1024)])
def test_estimate_is_within_15_percent_of_the_compiled_step(tmp_path, arch, d_in, d_sae, batch):
    cfg = small_config(
        "x.npy",
        str(tmp_path),
        f"sae.architecture={arch}",
        f"sae.d_sae={d_sae}",
        "sae.k=16",
        f"train.batch_size={batch}",
    )
    est = estimate(cfg, d_in)
    measured = compiled_step_bytes(cfg, d_in)
    assert est["bytes_per_device"]["total"] == pytest.approx(measured, rel=0.15)
    # the loader's buffers live on the host and are stated apart
    host = est["host_bytes"]
    assert host["shuffle_groups"] == 2 * 4 * 512 * d_in * 4  # small_config: 4 blocks of 512
    assert host["total"] == host["shuffle_groups"] + host["ready_batches"]


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "gated"])
def test_bfloat16_compute_is_estimated_too(tmp_path, arch):
    sets = [f"sae.architecture={arch}", "sae.d_sae=1024", "sae.dtype=bfloat16"]
    cfg = small_config("x.npy", str(tmp_path), *sets, "train.batch_size=512")
    measured = compiled_step_bytes(cfg, 64)
    assert estimate(cfg, 64)["bytes_per_device"]["total"] == pytest.approx(measured, rel=0.15)
