"""bfloat16 compute: every matmul of the step has float32 accumulation and output, with bf16
operands (on one CPU device the weight gradients read a transpose made by the C++ kernels,
which keeps XLA:CPU from casting them to float32: S._weight_grad), while parameters,
gradients and the threshold stay float32."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.core import sae as S


def dots(fn, *args):
    """The dot_general equations of fn's jaxpr, nested ones (custom_vjp, cond) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_matmul_rounds_operands_to_bf16_and_returns_float32():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 16)).astype(np.float32)
    b = rng.normal(size=(16, 4)).astype(np.float32)
    got = S.matmul(a, b, "bfloat16")
    assert got.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) @ np.asarray(
        jnp.asarray(b, jnp.bfloat16), np.float32
    )
    np.testing.assert_allclose(np.asarray(got), rounded, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(S.matmul(a, b)), a @ b)  # float32: a plain dot


def fast_operands(eqn) -> bool:
    """bf16 operands, or float32 ones for a weight gradient (contracting axis 0 of both) on a
    CPU without the C++ kernels' transpose (XLA:CPU would cast bf16 ones to float32 there)."""
    dtypes = [v.aval.dtype for v in eqn.invars]
    if dtypes == [jnp.bfloat16] * 2:
        return True
    weight_grad = eqn.params["dimension_numbers"][0] == ((0,), (0,))
    return weight_grad and jax.default_backend() == "cpu" and not S._cpu_transpose_helps()


def compiled_dot_operand_dtypes(fn, *args) -> list[list[str]]:
    """For each dot XLA compiled into a computation of its own (the matrix products), the
    dtypes of that computation's parameters: what the dot really reads after XLA's rewrites."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [
        re.findall(r"= (\w+)\[[\d,]*\]\S* parameter\(", block)
        for block in text.split("\n\n")
        if "ROOT %dot" in block
    ]


def test_matmul_gradients_are_fast_dots_with_float32_output():
    """jax.grad of a dot with preferred_element_type would upcast every dot to float32."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

    def loss(a, b):
        return jnp.sum(S.matmul(a, b, "bfloat16") * g)

    grad = jax.grad(loss, argnums=(0, 1))
    found = dots(grad, a, b)
    assert len(found) == 3  # the forward and the two gradients
    forward, d_a = found[0], found[1]
    for eqn in (forward, d_a):  # x · W and g · Wᵀ: bf16 operands everywhere
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
    for eqn in found:
        assert fast_operands(eqn), eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32
    da, db = grad(a, b)
    assert da.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(da), np.asarray(g @ b.T), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(db), np.asarray(a.T @ g), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("arch,kernel", [("relu", "auto"), ("jumprelu", "auto"), ("topk", "dense")])
def test_step_matmuls_are_fast_bf16_dots_and_gradients_stay_float32(arch, kernel):
    spec = S.SAESpec(
        arch, d_in=16, d_sae=64, k=4, aux_k=8, compute_dtype="bfloat16", topk_kernel=kernel
    )
    params = S.init_params(spec, jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
    dead = jnp.zeros(64, bool).at[:5].set(True)  # AuxK runs for topk

    def run(params, x):
        return S.loss_and_grads(params, x, spec, dead, 1e-3, 1 / 32)

    # matrix × matrix products (not the L1 term's matrix × vector and its outer product):
    # encoder and decoder forward and their gradients, AuxK's too for topk
    big = [
        e
        for e in dots(run, params, x)
        if all(v.aval.ndim == 2 for v in e.invars) and e.params["dimension_numbers"][0][0]
    ]
    assert len(big) >= 6
    for eqn in big:
        assert fast_operands(eqn), eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
    assert sum(e.invars[0].aval.dtype == jnp.bfloat16 for e in big) >= 4
    parts, _, _, grads = jax.jit(run)(params, x)
    assert np.isfinite(float(parts["loss"]))
    for name, grad in grads.items():
        assert grad.dtype == jnp.float32, name
    assert all(p.dtype == jnp.float32 for p in params.values())  # master weights


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not S._cpu_transpose_helps(),
    reason="the C++ transpose is for one CPU device",
)
def test_compiled_relu_step_keeps_every_matmul_in_bf16_on_the_cpu(monkeypatch):
    """XLA:CPU casts a batch-contracting bf16 dot (a weight gradient) to float32 operands; the
    C++ transpose keeps all five matmuls of the ReLU step in bf16 (two were float32 before)."""
    spec = S.SAESpec("relu", d_in=64, d_sae=256, compute_dtype="bfloat16")
    params = S.init_params(spec, jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(128, 64)), jnp.float32)
    dead = jnp.zeros(256, bool)

    def run(params, x):
        return S.loss_and_grads(params, x, spec, dead, 1e-3, 1 / 128)

    operands = compiled_dot_operand_dtypes(run, params, x)
    assert len(operands) == 5, operands
    assert all(dtypes == ["bf16", "bf16"] for dtypes in operands), operands
    got = jax.jit(run)(params, x)[3]
    # the same bf16 operands through XLA's own (float32-cast) weight-gradient dots
    monkeypatch.setattr(S, "_cpu_transpose_helps", lambda: False)
    want = jax.jit(run)(params, x)[3]
    for name in ("W_enc", "W_dec"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
