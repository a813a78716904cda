"""The analyses behind `saejax analyze`: weight statistics, their change after DPO, and
feature decorrelation.

Loads models with extract/ (torch), computes with analysis/ (NumPy), and writes per
model a list per layer into one JSON file, the per-neuron arrays as .npy, and a plot.
Every model is loaded and checked before anything is written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from saejax.errors import SaejaxError


@dataclass(frozen=True)
class ModelOptions:
    """How to load the models being analysed.

    `device` None: cuda when torch sees a GPU, else cpu. `dtype` None: float32 for the
    weight statistics (no forward runs, and bfloat16 rounding would blur the small changes
    DPO makes), the device's default (bfloat16 on a GPU) for decorrelation, which runs it.
    """

    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str | None = None
    plot: bool = True
    device: str | None = None


# ---- helpers ----------------------------------------------------------------------
def _prepare_out(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SaejaxError(f"cannot create output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise SaejaxError(f"output directory {path} is not writable")
    return path


def _load(name: str, opts: ModelOptions, weights_only: bool = False):
    from extract.models import load_model

    dtype = opts.dtype or ("float32" if weights_only else None)
    return load_model(
        name,
        revision=opts.revision,
        trust_remote_code=opts.trust_remote_code,
        dtype=dtype,
        device=opts.device,
    )


def _processed_weights(name: str, opts: ModelOptions):
    from analysis.weights import process_weights
    from extract.analysis_io import mlp_weights

    loaded = _load(name, opts, weights_only=True)
    return process_weights(mlp_weights(loaded.model))


def _no_bias_message(name: str, arch: str) -> str:
    return (
        f"model '{name}' ({arch}) has no MLP input bias, so the weight statistic "
        "‖w_in‖·b_in is undefined for it; `saejax analyze decorrelation` works on it"
    )


def _plot(opts: ModelOptions, curves, ylabel, title, path, zero_line: bool = True) -> str | None:
    from analysis.plots import have_matplotlib, plot_depth_curves

    if not opts.plot:
        return None
    if not have_matplotlib():
        print(
            "note: no plot written (needs matplotlib: pip install 'saejax[plots]')", file=sys.stderr
        )
        return None
    return plot_depth_curves(curves, ylabel, title, path, zero_line=zero_line)


def _print_layers(label: str, values) -> None:
    shown = " ".join("nan" if v != v else f"{v:+.3f}" for v in values)
    print(f"{label}: {shown}")


# ---- weights ----------------------------------------------------------------------
def analyze_weights(models: list[str], out: str, opts: ModelOptions = ModelOptions()) -> str:
    """weights.json (and .npy per model, weights.png) in `out`; returns the JSON's path."""
    from analysis.output import file_label, unique_labels
    from analysis.weight_stats import weight_statistics
    from saejax.io import write_json, write_npy

    labels = unique_labels(models)
    results = {}
    for name, label in zip(models, labels):  # every model is checked before writing
        w = _processed_weights(name, opts)
        if w.b_in is None:
            raise SaejaxError(_no_bias_message(name, w.arch))
        results[label] = (name, w, weight_statistics(w))
    out = _prepare_out(out)
    report = {
        "statistic": "median_j ||W_in[:, j]||_2 * b_in[j], normalised by max_l median_j |p[l, j]|",
        "models": {},
    }
    for label, (name, w, stats) in results.items():
        prefix = os.path.join(out, file_label(label))
        for key in ("p", "w_out_norm", "b_out", "cos_in_out"):
            if key in stats:
                write_npy(f"{prefix}.{key}.npy", stats[key])
        report["models"][label] = {
            "model": name,
            "arch": w.arch,
            "n_layers": w.n_layers,
            "d_model": w.d_model,
            "d_mlp": w.d_mlp,
            "scale": stats["scale"],
            "relative_depth": stats["relative_depth"],
            "median": stats["median"],
            "normalised_median": stats["normalised"],
        }
        _print_layers(label, stats["normalised"])
    write_json(os.path.join(out, "weights.json"), report)
    plot = _plot(
        opts,
        {label: (s["relative_depth"], s["normalised"]) for label, (_, _, s) in results.items()},
        "normalised median ‖w_in‖·b_in",
        "MLP weight statistic",
        os.path.join(out, "weights.png"),
    )
    print(f"wrote {os.path.join(out, 'weights.json')}" + (f" and {plot}" if plot else ""))
    return os.path.join(out, "weights.json")


# ---- dpo-change -------------------------------------------------------------------
def analyze_dpo_change(
    base_name: str, tuned_name: str, out: str, top: int = 100, opts: ModelOptions = ModelOptions()
) -> str:
    """dpo_change.json (and selected_neurons.npy, plots) in `out`; returns the JSON's path."""
    from analysis.dpo_change import dpo_change
    from saejax.io import write_json, write_npy

    if top < 1:
        raise SaejaxError(f"--top must be at least 1, got {top}")
    base = _processed_weights(base_name, opts)
    tuned = _processed_weights(tuned_name, opts)
    if base.shape_signature() != tuned.shape_signature():
        diff = {
            k: (v, tuned.shape_signature()[k])
            for k, v in base.shape_signature().items()
            if tuned.shape_signature()[k] != v
        }
        shown = ", ".join(f"{k}: base {a} vs tuned {b}" for k, (a, b) in diff.items())
        raise SaejaxError(
            f"tuned model '{tuned_name}' does not have the architecture of base "
            f"'{base_name}' ({shown})"
        )
    for name, w in ((base_name, base), (tuned_name, tuned)):
        if w.b_in is None:
            raise SaejaxError(_no_bias_message(name, w.arch))
    result = dpo_change(base, tuned, top=top)
    out = _prepare_out(out)
    write_npy(os.path.join(out, "selected_neurons.npy"), result["selected"])
    write_json(
        os.path.join(out, "dpo_change.json"),
        {
            "base": base_name,
            "tuned": tuned_name,
            "top": int(result["selected"].shape[1]),
            "relative_depth": result["relative_depth"],
            "base_normalised_median": result["base"]["normalised"],
            "tuned_normalised_median": result["tuned"]["normalised"],
            "relative_change": result["relative_change"],
            "selected_neurons": result["selected"],
        },
    )
    _print_layers("relative change", result["relative_change"])
    depth = result["relative_depth"]
    plot = _plot(
        opts,
        {
            "base": (depth, result["base"]["normalised"]),
            "tuned": (depth, result["tuned"]["normalised"]),
        },
        "normalised median ‖w_in‖·b_in",
        f"top-{top} changed neurons per layer",
        os.path.join(out, "dpo_change.png"),
    )
    _plot(
        opts,
        {"(tuned − base) / |base|": (depth, result["relative_change"])},
        "relative change",
        "change after preference tuning",
        os.path.join(out, "dpo_relative_change.png"),
    )
    print(f"wrote {os.path.join(out, 'dpo_change.json')}" + (f" and {plot}" if plot else ""))
    return os.path.join(out, "dpo_change.json")


# ---- decorrelation ----------------------------------------------------------------
def read_prompts(spec: str, limit: int | None) -> list[str]:
    if spec == "builtin":
        from extract.corpus import builtin_documents

        prompts = []
        for doc in builtin_documents():
            first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(first) <= 400:
                prompts.append(first)
            if len(prompts) >= (limit or 64):
                break
    else:
        if not os.path.isfile(spec):
            raise SaejaxError(f"prompts file not found: {spec}")
        with open(spec, encoding="utf-8", errors="replace") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise SaejaxError(f"prompts file {spec} has no prompts (one per non-empty line)")
    prompts = prompts[:limit] if limit else prompts
    if len(prompts) < 2:
        raise SaejaxError(f"decorrelation needs at least two prompts; {spec} gives {len(prompts)}")
    return prompts


def analyze_decorrelation(
    models: list[str],
    prompts_spec: str,
    out: str,
    max_prompts: int | None = None,
    opts: ModelOptions = ModelOptions(),
) -> str | None:
    """decorrelation.json (and .npy per model) in `out`; returns the plot's path (None when
    no plot was made)."""
    from analysis.decorrelation import decorrelation
    from analysis.output import file_label, unique_labels
    from analysis.weight_stats import relative_depth
    from extract.analysis_io import last_token_mlp_pre
    from saejax.io import write_json, write_npy

    prompts = read_prompts(prompts_spec, max_prompts)
    labels = unique_labels(models)
    results = {}
    for name, label in zip(models, labels):
        loaded = _load(name, opts)
        acts = last_token_mlp_pre(loaded, prompts, progress=sys.stderr.isatty())
        results[label] = (name, acts, decorrelation(acts))
        _print_layers(label, results[label][2])
    out = _prepare_out(out)
    report = {
        "measure": "1 - mean cosine over pairs of different prompts of the MLP "
        "pre-activation at the last token",
        "n_prompts": len(prompts),
        "prompts": prompts_spec,
        "models": {},
    }
    for label, (name, acts, score) in results.items():
        write_npy(os.path.join(out, f"{file_label(label)}.last_token_mlp_pre.npy"), acts)
        report["models"][label] = {
            "model": name,
            "n_layers": int(acts.shape[0]),
            "d_mlp": int(acts.shape[2]),
            "relative_depth": relative_depth(acts.shape[0]),
            "decorrelation": score,
        }
    write_json(os.path.join(out, "decorrelation.json"), report)
    plot = _plot(
        opts,
        {label: (relative_depth(len(s)), s) for label, (_, _, s) in results.items()},
        "1 − mean pairwise cosine",
        f"feature decorrelation ({len(prompts)} prompts)",
        os.path.join(out, "decorrelation.png"),
        zero_line=False,
    )
    print(f"wrote {os.path.join(out, 'decorrelation.json')}" + (f" and {plot}" if plot else ""))
    return plot
