"""`saejax sweep`: several SAEs trained in lockstep on the same batches, then compared.

One loader reads and shuffles the data once per step and every member's compiled step
consumes the same batch; the data statistics (input scale, b_dec initialisation) are
computed once. Members differ in d_sae and k (TopK family) or λ (relu). Each member is
a normal run directory (config, metrics, checkpoints, eval, sae/) under OUT/, so
`saejax eval`, `export`, `features`, `dashboard` work on each. Checkpoints are written for
all members at the same steps; running the same command again resumes. The table
(OUT/sweep.json, .csv, .md) has per member FVU, L0, dead fraction, optionally CE loss
recovered, the member's own step throughput (timed alone after training, since in lockstep
the members share one program) and the sweep's wall time; OUT/sweep.png plots the FVU-L0
frontier per size, dead fraction against size and throughput against size.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from itertools import product

import jax
import numpy as np

from saejax.errors import SaejaxError
from saejax.files import write_json_atomic, write_text_atomic


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def members_of(arch: str, d_saes: list[int], ks: list[int], l1s: list[float]) -> list[tuple[str, list[str]]]:
    if not d_saes:
        raise SaejaxError("--d-sae needs at least one size, e.g. --d-sae 1024,2048,4096")
    if arch in ("topk", "batchtopk"):
        grid = [(f"d{d}_k{k}", [f"sae.d_sae={d}", f"sae.k={k}"]) for d, k in product(d_saes, ks or [None])] \
            if ks else [(f"d{d}", [f"sae.d_sae={d}"]) for d in d_saes]
    elif arch == "relu" and l1s:
        grid = [(f"d{d}_l1_{l:g}", [f"sae.d_sae={d}", f"sae.l1_coefficient={l}"])
                for d, l in product(d_saes, l1s)]
    else:
        grid = [(f"d{d}", [f"sae.d_sae={d}"]) for d in d_saes]
    return grid


@dataclass
class Member:
    name: str
    cfg: object
    spec: object
    state: object
    step_fn: object
    summarize: object
    ckpt: object
    logger: object
    info: dict
    resample_at: set


def run_sweep(config_path: str | None, overrides: list[str], grid, out: str,
              progress: bool = True, max_steps: int | None = None) -> list[dict]:
    """Train the grid's members in lockstep; `max_steps` stops early (checkpointed), as a test would."""
    import collections

    import jax.numpy as jnp

    from saejax import train_step as T
    from saejax.checkpoint import Checkpointer
    from saejax.config import dump_yaml, load_config
    from saejax.data import ArraySource, Loader
    from saejax.metrics import MetricsLogger, evaluate
    from saejax.saved import save_sae
    from saejax.train import (_StopFlag, _resample_enabled, checkpoint_info, data_statistics,
                              prepare)

    cfgs = [(name, load_config(config_path, [*overrides, *extra, f"run_dir={os.path.join(out, name)}"]))
            for name, extra in grid]
    base = cfgs[0][1]
    if base.mesh.data * base.mesh.model > 1:
        raise SaejaxError("sweeps run on one device for now (mesh: {data: 1, model: 1})")
    source = ArraySource(base.data.path, base.data.hook)
    stats = data_statistics(base, source)
    os.makedirs(out, exist_ok=True)
    members = []
    for name, cfg in cfgs:
        spec, tx, state, total_steps = prepare(cfg, source, stats)
        os.makedirs(cfg.run_dir, exist_ok=True)
        ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.train.keep_checkpoints)
        info = checkpoint_info(cfg, source.d_in)
        if not os.path.exists(os.path.join(cfg.run_dir, "config.yaml")):
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))
        cfg.log.progress = False
        members.append(Member(name, cfg, spec, state,
                              T.make_train_step(spec, cfg.sae, tx, total_steps),
                              jax.jit(T.summarize, static_argnames="dead_tokens", donate_argnums=0),
                              ckpt, None, info,
                              T.resample_steps(cfg.train, total_steps) if _resample_enabled(cfg) else set()))
    total_steps = base.train.tokens // base.train.batch_size
    latest = [m.ckpt.latest_step() for m in members]
    start = 0
    if any(s is not None for s in latest):
        if any(s is None for s in latest):
            raise SaejaxError(f"the sweep in {out} has checkpoints for some members only; "
                              "remove the folder to start again")
        start = min(latest)
        for m in members:
            m.state, _ = m.ckpt.restore(m.state, m.info, step=start)
    for m in members:
        m.logger = MetricsLogger(m.cfg, total_steps, start)
    loader = Loader(source, base.data, base.train.batch_size, start_batch=start,
                    transform=jax.device_put)
    pool = collections.deque(maxlen=max(1, base.train.resample.pool_batches))
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, unit="step", desc=f"sweep ×{len(members)}",
               disable=not progress, file=sys.stderr)
    # every member's step in ONE compiled program: one dispatch per batch, and XLA runs the
    # members one after another with all cores each (separately dispatched programs would
    # run concurrently on the CPU's thread pool and fight over the cores)
    step_fns = [m.step_fn for m in members]
    all_steps = jax.jit(lambda states, batch: tuple(f(s, batch)[0] for f, s in zip(step_fns, states)),
                        donate_argnums=0)
    end_step = total_steps if max_steps is None else min(total_steps, max_steps)
    step, t0 = start, time.perf_counter()
    stopped = False
    try:
        with _StopFlag() as stop:
            while step < end_step:
                batch = next(loader)
                states = all_steps(tuple(m.state for m in members), batch)
                for m, state in zip(members, states):
                    m.state = state
                step += 1
                pool.append(batch)
                for m in members:
                    if step in m.resample_at:
                        m.state = T.resample(m.state, jnp.concatenate(list(pool)), m.spec,
                                             m.cfg.sae.dead_tokens, m.cfg.train.resample.encoder_scale)
                    if step % m.cfg.train.log_every == 0 or step == total_steps:
                        metrics, m.state = m.summarize(m.state, dead_tokens=m.cfg.sae.dead_tokens)
                        m.logger.log(step, jax.device_get(metrics))
                    if step % m.cfg.train.checkpoint_every == 0 and step < total_steps:
                        m.ckpt.save(step, m.state, m.info)
                bar.update(1)
                if stop.signum is not None:
                    stopped = True
                    break
        for m in members:
            m.ckpt.save(step, m.state, m.info)
            m.ckpt.wait()
    finally:
        bar.close()
        loader.close()
        for m in members:
            m.logger.close()
            m.ckpt.close()
    elapsed = time.perf_counter() - t0
    if stopped:
        print(f"\nstopped at step {step}/{total_steps}; run the same command to resume",
              file=sys.stderr)
        raise KeyboardInterrupt
    rows = []
    if pool:
        last_batch = pool[-1]
    else:  # nothing trained in this call (a finished sweep run again): time on the first batch
        first = Loader(source, base.data, base.train.batch_size, transform=jax.device_put)
        last_batch = next(first)
        first.close()
    for m in members:
        alone = _tokens_per_s_alone(m.step_fn, m.state, last_batch)
        final = evaluate(m.state.params, m.spec, float(m.state.input_scale), source, m.cfg.data)
        final.update(steps=step, tokens_per_s=alone,
                     sweep_tokens_per_s=(step - start) * base.train.batch_size / max(elapsed, 1e-9))
        save_sae(os.path.join(m.cfg.run_dir, "sae"), m.state.params, m.spec,
                 float(m.state.input_scale), m.cfg, source.meta, source.hook)
        write_json_atomic(os.path.join(m.cfg.run_dir, "eval.json"), final)
        rows.append({"name": m.name, "run_dir": m.cfg.run_dir, "architecture": m.spec.architecture,
                     "d_sae": m.spec.d_sae,
                     "k": m.spec.k if m.spec.architecture in ("topk", "batchtopk") else None,
                     "l1": m.cfg.sae.l1_coefficient if m.spec.architecture == "relu" else None,
                     "fvu": final["fvu"], "l0": final["l0"], "dead_fraction": final["dead_fraction"],
                     "dense_fraction": final["dense_fraction"], "tokens_per_s": alone,
                     "sweep_wall_s": elapsed if step > start else None})
    return rows


def _tokens_per_s_alone(step_fn, state, batch, steps: int = 3) -> float:
    """The member's own training-step throughput, on a copy of its state (the step donates)."""
    import jax.numpy as jnp

    from saejax.bench import time_steps

    step_fn = jax.jit(step_fn, donate_argnums=0)
    _, state = time_steps(step_fn, jax.tree.map(jnp.copy, state), batch, 1)  # compile, warm up
    seconds, _ = time_steps(step_fn, state, batch, steps)
    return steps * batch.shape[0] / seconds


COLUMNS = ("name", "architecture", "d_sae", "k", "l1", "fvu", "l0", "dead_fraction", "dense_fraction",
           "ce_loss_recovered", "tokens_per_s", "sweep_wall_s", "run_dir")


def write_table(rows: list[dict], out: str) -> None:
    """sweep.json, sweep.csv, sweep.md and sweep.png in OUT (each written whole, then renamed)."""
    import csv
    import io

    write_json_atomic(os.path.join(out, "sweep.json"), {"members": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    write_text_atomic(os.path.join(out, "sweep.csv"), buf.getvalue())

    has_ce = any(r.get("ce_loss_recovered") is not None for r in rows)
    head = ("| d_sae | k / λ | FVU | L0 | dead | " + ("CE loss recovered | " if has_ce else "")
            + "tokens/s (alone) | run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        knob = r["k"] if r["k"] is not None else (f"λ {r['l1']:g}" if r["l1"] is not None else "")
        ce = f"{r['ce_loss_recovered']:.4f} | " if has_ce and r.get("ce_loss_recovered") is not None else (
            "– | " if has_ce else "")
        lines.append(f"| {r['d_sae']:,} | {knob} | {r['fvu']:.4f} | {r['l0']:.1f} | "
                     f"{r['dead_fraction']:.1%} | {ce}{r['tokens_per_s']:,.0f} | {r['run_dir']} |")
    wall = next((r["sweep_wall_s"] for r in rows if r.get("sweep_wall_s") is not None), None)
    if wall is not None:
        lines += ["", f"All {len(rows)} members trained in lockstep in {wall:,.0f} s of wall time."]
    write_text_atomic(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, os.path.join(out, "sweep.png"))


def _plot(rows: list[dict], path: str) -> None:
    """FVU against L0 (one line per d_sae across k or λ), dead fraction and throughput against d_sae."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sizes = sorted({r["d_sae"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for d in sizes:
        pts = sorted((r["l0"], r["fvu"]) for r in rows if r["d_sae"] == d)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"d_sae {d:,}")
    axes[0].set_xlabel("L0")
    axes[0].set_ylabel("FVU")
    axes[0].set_title("FVU-L0 frontier per size")
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "dead_fraction", "dead fraction"),
                           (axes[2], "tokens_per_s", "training tokens/s (step alone)")):
        for knob in sorted({(r["k"], r["l1"]) for r in rows}, key=str):
            pts = sorted((r["d_sae"], r[key]) for r in rows if (r["k"], r["l1"]) == knob)
            label = f"k {knob[0]}" if knob[0] is not None else (f"λ {knob[1]:g}" if knob[1] is not None else None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_sae")
        ax.set_title(title)
        if len({(r["k"], r["l1"]) for r in rows}) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def run_sweep_command(args) -> int:
    from saejax.config import load_config

    base = load_config(args.config, args.overrides)
    grid = members_of(base.sae.architecture, _ints(args.d_sae), _ints(args.k), _floats(args.l1))
    rows = run_sweep(args.config, args.overrides, grid, args.out, progress=not args.quiet)
    if args.ce:
        from saejax.lm_eval import evaluate_run
        for r in rows:
            r["ce_loss_recovered"] = evaluate_run(r["run_dir"], sequences=args.ce_sequences)["lm"]["ce_loss_recovered"]
    write_table(rows, args.out)
    return 0
