"""C++ kernels for the sparse TopK step on XLA:CPU (top-k, row gathers, row scatter-adds).

XLA:CPU runs top_k and scatter-add as single-threaded loops; at d_sae 18k they cost more
than the rest of the step after the encoder matmul. A transpose XLA cannot see through keeps
bf16 weight gradients in XLA:CPU's bf16 dot (`transpose`). `cpu_kernels.cc` does the same work
with SIMD and every core, called through the XLA FFI. It is compiled on first use with the
system's C++ compiler (`$CXX`, else `c++`) into `$SAEJAX_CACHE` (default
`~/.cache/saejax/kernels`), keyed by the source, the compiler, jaxlib and the CPU's flags.

Where it cannot be used (no compiler, a failed build, a GPU/TPU backend, or
`SAEJAX_CPU_KERNELS=0`) the pure-JAX kernels in `saejax/sae.py` run instead: same results
(tested), XLA's speed. `enabled()` says which path a trace takes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saejax.core.sharding import varying_axes

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = (
    "SaejaxTopK",
    "SaejaxGatherRows",
    "SaejaxRowDots",
    "SaejaxScatterRows",
    "SaejaxTransposeBF16",
    "SaejaxTransposeF32",
)
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, "path": str


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _build() -> Path:
    """Compile (once per machine and version) and return the shared library's path."""
    compiler = (
        os.environ.get("CXX")
        or shutil.which("c++")
        or shutil.which("g++")
        or shutil.which("clang++")
    )
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    import jaxlib

    flags = [
        "-O3",
        "-march=native",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-pthread",
        f"-I{jax.ffi.include_dir()}",
    ]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, jaxlib.__version__, *flags, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("SAEJAX_CACHE", Path.home() / ".cache" / "saejax")) / "kernels"
    target = cache / f"saejax_cpu_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".saejax_cpu_{key}.{os.getpid()}.so"
    done = subprocess.run(
        [compiler, *flags, str(SOURCE), "-o", str(partial)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{compiler} failed: " + " | ".join(tail))
    os.replace(partial, target)  # atomic: concurrent processes never load a partial file
    return target


def _load() -> bool:
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        try:
            path = _build()
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name in TARGETS:
                jax.ffi.register_ffi_target(
                    name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
                )
            _state.update(ok=True, path=str(path), why="")
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _state.update(ok=False, why=str(err))
            print(
                f"saejax: C++ CPU kernels unavailable ({err}); using XLA's top_k and "
                "scatter-add (slower on CPU)",
                file=sys.stderr,
            )
        return _state["ok"]


def enabled() -> bool:
    """True when a trace on the default backend should call the C++ kernels."""
    if os.environ.get("SAEJAX_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    return _load()


def _call(name, out_types, *inputs, **attrs):
    """ffi_call whose outputs vary over the mesh axes its inputs vary over (shard_map types
    the outputs of an opaque call as replicated otherwise)."""
    if not _load():
        raise RuntimeError(f"saejax C++ CPU kernels unavailable: {_state['why']}")
    outs = jax.ffi.ffi_call(name, out_types)(*inputs, threads=np.int64(_threads()), **attrs)
    axes = varying_axes(*inputs)
    if axes:
        outs = jax.tree.map(lambda o: jax.lax.pcast(o, axes, to="varying"), outs)
    return outs


def top_k(x, k: int, bias=None):
    """lax.top_k(x + bias, k) (descending, ties to the lower index) without storing x + bias."""
    rows, width = x.shape
    bias = jnp.zeros(width, jnp.float32) if bias is None else bias.astype(jnp.float32)
    return _call(
        "SaejaxTopK",
        (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows, k), jnp.int32)),
        x.astype(jnp.float32),
        bias,
        k=np.int64(k),
    )


def gather_rows(weights, idx, table):
    """out[b] = Σ_i weights[b, i]·table[idx[b, i]]."""
    return _call(
        "SaejaxGatherRows",
        jax.ShapeDtypeStruct((idx.shape[0], table.shape[1]), jnp.float32),
        weights.astype(jnp.float32),
        idx.astype(jnp.int32),
        table.astype(jnp.float32),
    )


def row_dots(g, idx, table):
    """out[b, i] = ⟨g[b], table[idx[b, i]]⟩."""
    return _call(
        "SaejaxRowDots",
        jax.ShapeDtypeStruct(idx.shape, jnp.float32),
        g.astype(jnp.float32),
        idx.astype(jnp.int32),
        table.astype(jnp.float32),
    )


def scatter_rows(weights, idx, rows, n: int, transposed: bool = False):
    """(out [n, D], wsum [n]): out[j] = Σ_{idx[b,i]=j} weights[b, i]·rows[b]; wsum the Σ weights.

    transposed=True returns out as [D, n] (written in that layout, not transposed after)."""
    d = rows.shape[1]
    return _call(
        "SaejaxScatterRows",
        (
            jax.ShapeDtypeStruct((d, n) if transposed else (n, d), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.float32),
        ),
        weights.astype(jnp.float32),
        idx.astype(jnp.int32),
        rows.astype(jnp.float32),
        transposed=np.int64(transposed),
    )


def transpose(x):
    """xᵀ for a 2-d bfloat16 or float32 x, written out by the kernel: opaque to XLA, so a dot
    that reads it is not rewritten into the batch-contracting form XLA:CPU runs in float32."""
    name = {
        jnp.dtype(jnp.bfloat16): "SaejaxTransposeBF16",
        jnp.dtype(jnp.float32): "SaejaxTransposeF32",
    }[jnp.dtype(x.dtype)]
    return _call(name, jax.ShapeDtypeStruct(x.shape[::-1], x.dtype), x)
