"""`sae.topk_kernel` names the TopK path; SAESpec carries the name and resolves it per backend."""

import pytest

from saejax.config import RunConfig, with_values
from saejax.core import cpu_kernels
from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.train.setup import spec_from_config


@pytest.mark.parametrize("kernel", ["sparse", "dense", "pallas", "auto"])
def test_config_names_reach_the_spec(kernel):
    cfg = with_values(RunConfig(), {"sae.topk_kernel": kernel, "data.path": "x.npy"})
    spec = spec_from_config(cfg.sae, 16)
    assert spec.topk_kernel == kernel
    assert spec.uses_sparse_kernels == (kernel != "dense")


def test_unknown_kernel_is_one_clear_error():
    with pytest.raises(
        SaejaxError, match="sae.topk_kernel must be one of auto, sparse, pallas, dense"
    ):
        with_values(RunConfig(), {"sae.topk_kernel": "triton", "data.path": "x.npy"})
    with pytest.raises(ValueError, match="topk_kernel"):
        S.SAESpec("topk", 4, 8, topk_kernel="triton")


def test_auto_is_the_cpp_kernels_on_the_cpu_else_xla(monkeypatch):
    spec = S.SAESpec("topk", 4, 8, topk_kernel="auto")
    assert spec.kernels == ("cpp" if cpu_kernels.enabled() else "xla")
    monkeypatch.setattr(cpu_kernels, "enabled", lambda: False)
    assert spec.kernels == "xla"
    assert S.SAESpec("topk", 4, 8, topk_kernel="pallas").kernels == "pallas"
    assert not S.SAESpec("relu", 4, 8, topk_kernel="auto").uses_sparse_kernels
