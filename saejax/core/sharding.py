"""Device mesh ("data", "model") and where every piece of the training state lives.

Batches are split over `data`. Latents are split over `model`: W_enc columns, b_enc,
W_dec rows, the threshold, their Adam moments and the per-latent counters. Everything
else is replicated. The step itself is one jit-compiled program that XLA's SPMD
partitioner splits from these placements, with the [rows, d_sae] blocks pinned split
(`constrain`) so that no whole weight matrix or [rows, d_sae] block is ever gathered:
TopK's selection runs per shard under shard_map (`core.sae`), a reconstruction becomes
per-shard partial sums added over `model`, and gradients of replicated parameters are
summed over `data`. `train.collectives` lists what the compiled step exchanges. The same
code runs on 1 device, on fake CPU devices, on a GPU host and on a TPU pod slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saejax.errors import SaejaxError

LATENT_SPECS = {
    "W_enc": P(None, "model"),
    "b_enc": P("model"),
    "W_dec": P("model", None),
    "b_dec": P(),
    "threshold": P("model"),
    # gated: its gate and magnitude biases and magnitude rescaling, one entry per latent
    "b_gate": P("model"),
    "r_mag": P("model"),
    "b_mag": P("model"),
}
PER_LATENT_STATE = ("tokens_since_fired", "fire_count")
# inside the step: [rows, d_sae] blocks (pre-activations, latents and their gradients) split
# both ways, [rows, d_in] blocks (inputs, reconstructions) split over "data" only
LATENT_BLOCK = P("data", "model")
ROW_BLOCK = P("data", None)


def constrain(value, spec: P):
    """Pin `value` to `spec` on the mesh being traced under (jax.set_mesh).

    Without these pins XLA's partitioner may choose, from the shapes alone, to gather whole
    weight matrices (or a whole [rows, d_sae] block) onto every device rather than keep the
    latents split: a dictionary that only fits split could not train. The pins also apply to
    the gradients. No mesh, a mesh without the ("data", "model") axes, or inside shard_map:
    `value` unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return value
    if not {"data", "model"} <= set(mesh.axis_names):
        return value
    return jax.lax.with_sharding_constraint(value, spec)


def varying_axes(*values) -> tuple:
    """Mesh axes (under shard_map) over which any of `values` varies; () outside shard_map."""
    axes = set()
    for value in values:
        manual = getattr(jax.typeof(value), "manual_axis_type", None)
        axes |= set(getattr(manual, "varying", ()) or ())
    return tuple(sorted(axes))


def make_mesh(data: int, model: int) -> Mesh:
    """A ("data", "model") mesh over the visible devices, ordered process-major."""
    n = data * model
    devices = jax.devices()
    if n < len(devices) and jax.process_count() == 1:
        devices = devices[:n]  # a smaller mesh on one host: the first n devices
    if n != len(devices):
        raise SaejaxError(
            f"mesh {{data: {data}, model: {model}}} needs {n} devices but "
            f"{len(devices)} are visible ({devices[0].platform}); set mesh.data × mesh.model "
            f"to {len(devices)}"
        )
    order = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(order).reshape(data, model), ("data", "model"))


def state_shardings(state, mesh: Mesh):
    """A pytree of NamedShardings with the structure of `state` (a TrainState)."""

    def place(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = next((k for k in reversed(keys) if k in LATENT_SPECS), None)
        if name is not None and getattr(leaf, "ndim", 0) == len(LATENT_SPECS[name]):
            return NamedSharding(mesh, LATENT_SPECS[name])
        if keys and keys[-1] in PER_LATENT_STATE:
            return NamedSharding(mesh, P("model"))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Input rows split over every device (process-major), so each process supplies only its
    own rows; the step regathers them over "model" where the latents are split."""
    return NamedSharding(mesh, P(("data", "model"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(rows: np.ndarray, sharding: NamedSharding, global_rows: int):
    """This process's rows of a global batch → one global array split over `data`."""
    if jax.process_count() == 1:
        return jax.device_put(rows, sharding)
    return jax.make_array_from_process_local_data(sharding, rows, (global_rows, rows.shape[1]))


def place(tree, shardings):
    """Put host or single-device values onto the mesh (identical on every process)."""

    def put(value, sharding):
        host = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def local_values(tree):
    """NumPy values of replicated arrays, read from this process's own copy."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


def to_host(tree, mesh: Mesh):
    """NumPy copies of (possibly sharded, multi-process) arrays: gathered, then read locally."""
    gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), gathered)
