"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS set by the caller).

usage: python mesh_runs.py DATA.npy OUT_DIR ARCH [mesh:"data,model"[:steps][:resume]] ...
Each run trains the same small config on the given mesh and writes OUT_DIR/<name>.npz with
the final parameters and the per-window losses from metrics.jsonl.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import small_config  # noqa: E402

from saejax.train.run import load_run_config, train  # noqa: E402


def overrides(arch):
    common = [
        "train.tokens=16384",
        "train.batch_size=256",
        "train.log_every=8",
        "train.checkpoint_every=16",
        "sae.d_sae=256",
        "train.lr=1e-2",
        "train.grad_clip=0",
        "train.lr_warmup_steps=0",
    ]
    if arch == "relu":
        return common + [
            "sae.architecture=relu",
            "sae.l1_coefficient=20.0",
            "sae.l1_warmup_steps=4",
            "train.resample.steps=[40]",
            "sae.dead_tokens=256",
        ]
    if arch == "gated":  # as relu: an L1 penalty, warmed up, and a resampling event
        return common + [
            "sae.architecture=gated",
            "sae.l1_coefficient=20.0",
            "sae.l1_warmup_steps=4",
            "train.resample.steps=[40]",
            "sae.dead_tokens=256",
        ]
    return common + [f"sae.architecture={arch}", "sae.k=4", "sae.dead_tokens=1024"]


def main():
    data, out, arch, *runs = sys.argv[1:]
    if arch == "bytes":
        return measured_bytes(data, out, runs)
    for run in runs:
        name, mesh, *rest = run.split(":")
        data_n, model_n = mesh.split(",")
        run_dir = os.path.join(out, name)
        mesh_sets = [f"mesh.data={data_n}", f"mesh.model={model_n}"]
        if rest and rest[0] == "resume":  # continue an existing run on another mesh
            result = train(load_run_config(run_dir, mesh_sets), resume=True)
        else:
            cfg = small_config(data, run_dir, *overrides(arch), *mesh_sets)
            max_steps = int(rest[0]) if rest else None
            result = train(cfg, max_steps=max_steps)
        params = {k: np.asarray(v) for k, v in result.state.params.items()}
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        np.savez(
            os.path.join(out, f"{name}.npz"),
            **params,
            loss=np.array([r["loss"] for r in records]),
            resampled=np.array([r.get("resampled", 0) for r in records]),
            shards=np.array(len(result.state.params["W_enc"].sharding.device_set)),
        )


def measured_bytes(data_path, out, meshes):
    """Per-device bytes of the placed state against the dry-run estimate, per mesh."""
    import jax

    from saejax.core import sharding as SH
    from saejax.train.data import ArraySource
    from saejax.train.dryrun import estimate
    from saejax.train.setup import mesh_for, prepare

    report = {}
    for mesh_text in meshes:
        data_n, model_n = mesh_text.split(",")
        cfg = small_config(
            data_path,
            os.path.join(out, "unused"),
            *overrides("topk"),
            f"mesh.data={data_n}",
            f"mesh.model={model_n}",
        )
        source = ArraySource(cfg.data.path, None)
        _, _, state, _ = prepare(cfg, source)
        state = SH.place(state, SH.state_shardings(state, mesh_for(cfg.mesh)))

        def on_one_device(tree):
            return sum(
                leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
            )

        est = estimate(cfg, source.d_in)["bytes_per_device"]
        report[mesh_text] = {
            "parameters": [on_one_device(state.params), est["parameters"]],
            "optimizer": [on_one_device(state.opt_state), est["optimizer"]],
            "shards": len(state.params["W_enc"].sharding.device_set),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
