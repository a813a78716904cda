"""Top-activating examples of every latent, in one streaming pass over a store.

For each chunk of rows the SAE encodes the chunk on the device and the running state is
merged with it (all on the device, jitted): the k largest activations of every latent with
their rows, and a uniform sample of m of its activating rows (each activation gets a random
priority; the m highest priorities survive), from which examples at activation quantiles
are drawn at the end. Firing counts and activation sums give densities. Contexts come from
the store's tokens at display time (`store.context(row)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.interp.contexts import marked_context
from saejax.io import atomic_dir, write_json, write_npz
from saejax.store import check_finite, is_remote


def _merge(vals, rows, new_vals, new_rows, k):
    v = jnp.concatenate([vals, new_vals], axis=1)
    r = jnp.concatenate([rows, new_rows], axis=1)
    top, pick = jax.lax.top_k(v, k)
    return top, jnp.take_along_axis(r, pick, axis=1)


@partial(jax.jit, static_argnames=("spec", "k", "m"), donate_argnums=0)
def _update(state, params, x, first_row, key, spec: S.SAESpec, k: int, m: int):
    f = S.encode(params, x, spec).T  # [d_sae, n]
    n = f.shape[1]
    rows = first_row + jnp.arange(n, dtype=jnp.int32)
    kk, mm = min(k, n), min(m, n)
    top_v, top_i = jax.lax.top_k(f, kk)
    top_vals, top_rows = _merge(state["top_vals"], state["top_rows"], top_v, rows[top_i], k)
    priority = jnp.where(f > 0, jax.random.uniform(key, f.shape), -1.0)
    pri_v, pri_i = jax.lax.top_k(priority, mm)
    pri_all = jnp.concatenate([state["sample_priority"], pri_v], axis=1)
    val_all = jnp.concatenate([state["sample_vals"], jnp.take_along_axis(f, pri_i, axis=1)], axis=1)
    row_all = jnp.concatenate([state["sample_rows"], rows[pri_i]], axis=1)
    keep_p, keep = jax.lax.top_k(pri_all, m)
    return {
        "top_vals": top_vals,
        "top_rows": top_rows,
        "sample_priority": keep_p,
        "sample_vals": jnp.take_along_axis(val_all, keep, axis=1),
        "sample_rows": jnp.take_along_axis(row_all, keep, axis=1),
        "fire_count": state["fire_count"] + jnp.sum(f > 0, axis=1, dtype=jnp.int32),
        "act_sum": state["act_sum"] + jnp.sum(f, axis=1),
    }


def scan_examples(
    sae,
    store,
    hook: str,
    k: int = 20,
    m: int = 64,
    max_rows: int | None = None,
    chunk_rows: int = 8192,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """One pass over the store; NumPy arrays per latent (rows are store row numbers)."""
    from tqdm import tqdm

    d = sae.spec.d_sae
    state = {
        "top_vals": jnp.full((d, k), -jnp.inf),
        "top_rows": jnp.full((d, k), -1, jnp.int32),
        "sample_priority": jnp.full((d, m), -2.0),
        "sample_vals": jnp.zeros((d, m)),
        "sample_rows": jnp.full((d, m), -1, jnp.int32),
        "fire_count": jnp.zeros(d, jnp.int32),
        "act_sum": jnp.zeros(d),
    }
    stop = len(store) if max_rows is None else min(len(store), max_rows)
    key = jax.random.PRNGKey(seed)
    bar = tqdm(total=stop, unit="row", desc="features", disable=not progress, file=sys.stderr)
    for first, rows in store.iter_chunks(chunk_rows, hook, 0, stop):
        key, sub = jax.random.split(key)
        check_finite(rows, first, store.path)
        x = jnp.asarray(rows.astype(np.float32))
        state = _update(state, sae.params, x, jnp.int32(first), sub, sae.spec, k, m)
        bar.update(len(rows))
    bar.close()
    out = {name: np.asarray(value) for name, value in jax.device_get(state).items()}
    out["n_rows"] = np.int64(stop)
    return out


def quantile_examples(result: dict, latent: int, n: int = 5) -> list[tuple[float, int]]:
    """(activation, row) of the kept random samples nearest to n evenly spaced quantiles."""
    valid = result["sample_priority"][latent] >= 0
    vals, rows = result["sample_vals"][latent][valid], result["sample_rows"][latent][valid]
    if len(vals) == 0:
        return []
    order = np.argsort(vals)
    picks = np.unique(np.round(np.linspace(0, len(vals) - 1, min(n, len(vals)))).astype(int))
    return [(float(vals[order[i]]), int(rows[order[i]])) for i in picks]


def sae_identity(run: str) -> str:
    """A fingerprint of the SAE a run or SAE folder holds: the bytes of its JSON files and
    the size and modification time of its weights, so a retrained or replaced SAE never
    reuses another's examples."""
    folder = os.path.join(run, "sae") if os.path.isdir(os.path.join(run, "sae")) else run
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        digest.update(name.encode())
        if name.endswith(".json"):
            with open(path, "rb") as f:
                digest.update(f.read())
        else:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def examples_key(run: str, store, hook: str, top: int, samples: int, rows: int) -> dict:
    """What a cached scan depends on: it is reused only when all of this matches."""
    return {
        "top": int(top),
        "samples": int(samples),
        "rows": int(rows),
        "store": store.path if is_remote(store.path) else os.path.abspath(store.path),
        "n_tokens": len(store),
        "hook": hook,
        "sae": sae_identity(run),
    }


def cache_dir(run: str) -> str:
    return os.path.join(run, "features")


def read_examples_cache(run: str, wanted: dict) -> dict | None:
    """The cached scan in RUN/features/ when its key agrees with every entry of `wanted`
    (a full `examples_key`, or a part of one), else None. A folder without a matching
    summary.json is never used."""
    folder = cache_dir(run)
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            key = json.load(f)["key"]
        if any(key.get(name) != value for name, value in wanted.items()):
            return None
        with np.load(os.path.join(folder, "examples.npz")) as data:
            return dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, written by an older saejax, or damaged: scan again


def write_examples_cache(run: str, key: dict, result: dict, store, hook: str) -> str:
    """examples.npz and summary.json (with the key) as one unit: both or neither."""
    density = result["fire_count"] / max(int(result["n_rows"]), 1)
    with atomic_dir(cache_dir(run), kind="features") as tmp:
        write_npz(os.path.join(tmp, "examples.npz"), **result)
        write_json(
            os.path.join(tmp, "summary.json"),
            {
                "key": key,
                "rows_scanned": int(result["n_rows"]),
                "store": store.path,
                "hook": hook,
                "density": density.tolist(),
                "mean_activation": (
                    result["act_sum"] / np.maximum(result["fire_count"], 1)
                ).tolist(),
            },
            indent=None,
        )
    return os.path.join(cache_dir(run), "examples.npz")


def latent_examples(
    run: str,
    store_path: str | None = None,
    top: int = 20,
    samples: int = 64,
    max_rows: int | None = None,
    progress: bool = False,
    shown: list[int] = (),
):
    """(result, store, scanned): the examples of every latent, from RUN/features/ when an
    earlier scan with the same parameters, SAE and store left them there, else from a new
    scan (then saved there). `shown` (latents the caller will print) are range-checked
    before any scan."""
    from saejax.interp.eval import resolve_run_store
    from saejax.train.sae_files import load_sae

    if top < 1 or samples < 1:
        raise SaejaxError("--top and --samples must be at least 1")
    if max_rows is not None and max_rows < 1:
        raise SaejaxError(f"--max-rows must be at least 1, got {max_rows}")
    sae = load_sae(run)
    for latent in shown:
        if not 0 <= latent < sae.spec.d_sae:
            raise SaejaxError(
                f"latent {latent} is out of range: the SAE has latents 0..{sae.spec.d_sae - 1}"
            )
    store, hook = resolve_run_store(run, sae, store_path)
    rows = len(store) if max_rows is None else min(len(store), max_rows)
    key = examples_key(run, store, hook, top, samples, rows)
    cached = read_examples_cache(run, key)
    if cached is not None:
        return cached, store, False
    result = scan_examples(sae, store, hook, top, samples, rows, progress=progress)
    write_examples_cache(run, key, result, store, hook)
    return result, store, True


def latent_report(result: dict, latent: int, store, tok) -> list[str]:
    """Lines describing one latent: its density, top examples and examples at quantiles."""
    density = result["fire_count"][latent] / max(int(result["n_rows"]), 1)
    lines = [f"latent {latent}: fires on {density:.3%} of {int(result['n_rows']):,} rows"]

    def show(value, row):
        ids, at = store.context(int(row), before=12, after=3)
        lines.append(f"  {value:9.3f}  row {int(row):>9,}  {marked_context(tok, ids, at)}")

    lines.append("  top examples")
    for value, row in zip(result["top_vals"][latent], result["top_rows"][latent]):
        if row >= 0 and value > 0:
            show(value, row)
    lines.append("  at activation quantiles (random activating rows)")
    for value, row in quantile_examples(result, latent):
        show(value, row)
    return lines
