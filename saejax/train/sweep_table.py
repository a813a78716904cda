"""The sweep's comparison: sweep.json, .csv and .md (a row per member: its hook (the .md shows
it when the members read more than one), d_sae, k or λ, FVU,
explained variance, FVU without outlier rows, median relative error, L0, the fraction of
latents silent on the held-out rows and the dense fraction, optionally CE loss recovered,
the member's own step tokens/s ("–" when the sweep did not time it, `run_sweep`'s
time_alone) and the sweep's wall time) and sweep.png (the FVU-L0 frontier per size, silent
fraction and throughput against size).

The held-out metrics a member's row lacks are read from its RUN/eval.json (train.evaluate
writes them all there). `dead_fraction` in these rows is the eval's silent-latent fraction
(`silent_in_eval_fraction`), not the training notion of dead."""

from __future__ import annotations

import csv
import json
import os
from io import StringIO

from saejax import io

COLUMNS = (
    "name",
    "hook",
    "architecture",
    "d_sae",
    "k",
    "l1",
    "fvu",
    "explained_variance",
    "fvu_without_outliers",
    "outlier_rows",
    "median_relative_error",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_loss_recovered",
    "tokens_per_s",
    "sweep_wall_s",
    "run_dir",
)

# read from the member's eval.json when its row does not carry them
EVAL_KEYS = (
    "explained_variance",
    "fvu_without_outliers",
    "outlier_rows",
    "median_relative_error",
    "silent_in_eval_fraction",
    "never_fired",
)


def with_eval_metrics(row: dict) -> dict:
    """`row` completed with the held-out metrics of RUN/eval.json that it lacks."""
    missing = [k for k in EVAL_KEYS if row.get(k) is None]
    path = os.path.join(row.get("run_dir") or "", "eval.json")
    if not missing or not row.get("run_dir") or not os.path.exists(path):
        return row
    with open(path) as f:
        final = json.load(f)
    return {**row, **{k: final.get(k) for k in missing}}


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def write_table(rows: list[dict], out: str) -> None:
    """sweep.json, sweep.csv, sweep.md and sweep.png in OUT (each written whole, then renamed)."""
    rows = [with_eval_metrics(r) for r in rows]
    io.write_json(os.path.join(out, "sweep.json"), {"members": rows})
    buf = StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    io.write_text(os.path.join(out, "sweep.csv"), buf.getvalue())

    has_ce = any(r.get("ce_loss_recovered") is not None for r in rows)
    by_hook = len({r.get("hook") for r in rows}) > 1
    head = (
        ("| hook " if by_hook else "")
        + "| d_sae | k / λ | FVU | FVU w/o outliers | median rel. err | L0 | silent in eval | "
        + ("CE loss recovered | " if has_ce else "")
        + "tokens/s (alone) | run |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        knob = r["k"] if r["k"] is not None else (f"λ {r['l1']:g}" if r["l1"] is not None else "")
        ce = (
            f"{r['ce_loss_recovered']:.4f} | "
            if has_ce and r.get("ce_loss_recovered") is not None
            else ("– | " if has_ce else "")
        )
        lines.append(
            (f"| {r.get('hook')} " if by_hook else "")
            + f"| {r['d_sae']:,} | {knob} | {r['fvu']:.4f} | "
            f"{_num(r.get('fvu_without_outliers'), '.4f')} | "
            f"{_num(r.get('median_relative_error'), '.3f')} | {r['l0']:.1f} | "
            f"{r['dead_fraction']:.1%} | {ce}{_num(r.get('tokens_per_s'), ',.0f')} | "
            f"{r['run_dir']} |"
        )
    wall = next((r["sweep_wall_s"] for r in rows if r.get("sweep_wall_s") is not None), None)
    if wall is not None:
        lines += ["", f"All {len(rows)} members trained in lockstep in {wall:,.0f} s of wall time."]
    if any(r.get("tokens_per_s") is None for r in rows):
        lines += ["", "tokens/s (alone) –: the sweep did not time the member's step alone."]
    io.write_text(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, os.path.join(out, "sweep.png"))


def _plot(rows: list[dict], path: str) -> None:
    """FVU against L0 (one line per hook and d_sae across k or λ), dead fraction and throughput
    against d_sae (one line per hook and k or λ)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    hooks = sorted({r.get("hook") or "" for r in rows})
    named = len(hooks) > 1  # lines are per hook too, and say which
    sizes = sorted({(r.get("hook") or "", r["d_sae"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for hook, d in sizes:
        pts = sorted(
            (r["l0"], r["fvu"]) for r in rows if (r.get("hook") or "", r["d_sae"]) == (hook, d)
        )
        label = (f"{hook} " if named else "") + f"d_sae {d:,}"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    axes[0].set_xlabel("L0")
    axes[0].set_ylabel("FVU")
    axes[0].set_title("FVU-L0 frontier per size")
    axes[0].legend(fontsize=7)
    for ax, key, title in (
        (axes[1], "dead_fraction", "latents silent on held-out rows"),
        (axes[2], "tokens_per_s", "training tokens/s (step alone)"),
    ):
        knobs = {(r.get("hook") or "", r["k"], r["l1"]) for r in rows}
        for knob in sorted(knobs, key=str):
            pts = sorted(
                (r["d_sae"], r[key])
                for r in rows
                if (r.get("hook") or "", r["k"], r["l1"]) == knob and r.get(key) is not None
            )
            label = (
                f"k {knob[1]}"
                if knob[1] is not None
                else (f"λ {knob[2]:g}" if knob[2] is not None else "")
            )
            label = (f"{knob[0]} " if named else "") + label
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_sae")
        ax.set_title(title)
        if len(knobs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    io.save_figure(fig, path)
    plt.close(fig)
