"""`saejax demo`: the whole flow on the built-in defaults (model, corpus), resumable.

Each step writes into its own folder under --out and is skipped when already
complete, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from saejax.errors import SaejaxError
from saejax.io import write_json

DEMO_HOOK = "blocks.15.hook_resid_post"
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


def run_demo(
    out: str = "demo_out",
    tokens: int = 250_000,
    train_tokens: int = 1_000_000,
    quiet: bool = False,
    device: str | None = None,
    model_dtype: str | None = None,
) -> dict:
    """The whole flow; returns the report (also written to OUT/report.json).

    `device` and `model_dtype` are the language model's (extraction, CE eval, dashboard,
    decorrelation); None takes extract.models' defaults (cuda with bfloat16 when torch sees
    a GPU, else the CPU in float32). The SAEs train on JAX's default backend."""
    from extract.extractor import ExtractConfig, run_extract
    from extract.models import resolve_device, resolve_model_dtype
    from saejax.store import ActivationStore, describe
    from saejax.train.evaluate import describe_metrics

    device = resolve_device(device)  # a device that is not there fails before any work
    model_dtype = resolve_model_dtype(model_dtype, device)
    lm = {"device": device, "model_dtype": model_dtype}
    os.makedirs(out, exist_ok=True)
    store_path = os.path.join(out, "store")
    t0 = time.time()
    print(f"[1] extract {tokens:,} rows of {DEMO_HOOK} from the built-in model -> {store_path}")
    run_extract(
        ExtractConfig(out=store_path, hooks=[DEMO_HOOK], tokens=tokens, **lm), progress=not quiet
    )
    store = ActivationStore.open(store_path)
    print(describe(store))
    print(f"    done in {time.time() - t0:.0f}s")

    results = {}
    for i, (arch, extra) in enumerate(DEMO_SAES, start=2):
        run_dir = os.path.join(out, "runs", arch)
        t1 = time.time()
        print(f"[{i}] train a {arch} SAE ({train_tokens:,} tokens) -> {run_dir}")
        results[arch] = _train_one(store_path, run_dir, arch, extra, train_tokens, quiet)
        m = results[arch]
        print(
            f"    {describe_metrics(m)}   {m['tokens_per_s']:,.0f} tokens/s   "
            f"({time.time() - t1:.0f}s)"
        )
        splice = _lm_eval_one(run_dir, store_path, quiet, lm)
        m.update(
            {
                k: splice[k]
                for k in (
                    "ce_clean",
                    "ce_spliced",
                    "ce_zero",
                    "kl_spliced",
                    "ce_loss_recovered",
                    "ce_loss_recovered_bos_kept",
                    "kl_div_score",
                )
            }
        )
        print(
            f"    CE loss recovered {splice['ce_loss_recovered']:.4f}   "
            f"KL {splice['kl_spliced']:.4f}   (CE clean {splice['ce_clean']:.3f}, "
            f"with SAE {splice['ce_spliced']:.3f}, zero-ablated {splice['ce_zero']:.3f}; "
            f"{splice['sequences']} held-out sequences)"
        )

    step = len(DEMO_SAES) + 2
    sweep_dir = os.path.join(out, "sweep")
    print(
        f"[{step}] sweep: topk at d_sae {', '.join(map(str, DEMO_SWEEP))} in lockstep "
        f"({train_tokens // 4:,} tokens) -> {sweep_dir}"
    )
    t1 = time.time()
    sweep_rows = _sweep(store_path, sweep_dir, train_tokens, quiet, lm)
    print(f"    ({time.time() - t1:.0f}s)")

    dash_dir = os.path.join(out, "runs", "topk", "dashboard")
    print(
        f"[{step + 1}] dashboard of the topk SAE (feature splitting against the largest sweep "
        f"member) -> {dash_dir}/index.html"
    )
    t1 = time.time()
    dashboard = _dashboard(os.path.join(out, "runs", "topk"), sweep_rows, quiet, lm)
    print(f"    ({time.time() - t1:.0f}s)")

    decor_dir = os.path.join(out, "decorrelation")
    print(f"[{step + 2}] decorrelation of the built-in model's MLPs over all layers -> {decor_dir}")
    t1 = time.time()
    decor_plot = _decorrelation(decor_dir, lm)
    print(f"    ({time.time() - t1:.0f}s)")

    report = {
        "store": store_path,
        "rows": len(store),
        "hook": DEMO_HOOK,
        "runs": {a: {"run_dir": os.path.join(out, "runs", a), **m} for a, m in results.items()},
        "sweep": {"table": os.path.join(sweep_dir, "sweep.md"), "members": sweep_rows},
        "dashboard": dashboard,
        "decorrelation_plot": decor_plot,
        "wall_s": time.time() - t0,
    }
    write_json(os.path.join(out, "report.json"), report)
    print(f"\nsummary ({time.time() - t0:.0f}s): store {store_path}; report {out}/report.json")
    for arch, m in results.items():
        print(
            f"  {arch:6s} FVU {m['fvu']:.4f} (without outliers {m['fvu_without_outliers']:.4f})  "
            f"L0 {m['l0']:5.1f}  CE loss recovered {m['ce_loss_recovered']:.4f}  "
            f"-> {out}/runs/{arch}/sae"
        )
    for r in sweep_rows:
        print(
            f"  sweep d_sae {r['d_sae']:5d}  FVU {r['fvu']:.4f}  L0 {r['l0']:5.1f}  "
            f"CE loss recovered {r['ce_loss_recovered']:.4f}"
        )
    print(f"  sweep table   {sweep_dir}/sweep.md")
    print(f"  dashboard     {dashboard}")
    print(f"  decorrelation {decor_plot}")
    return report


# The demo's two SAEs: TopK (AuxK for dead latents) and Towards Monosemanticity's ReLU + L1
# with resampling. Both 8x wide over d_in 576.
DEMO_SAES = [
    ("topk", {"sae.k": 32}),
    (
        "relu",
        {
            "sae.l1_coefficient": 2.0,
            "sae.l1_warmup_steps": 100,
            "train.resample.every_steps": 150,
            "train.lr": 0.0003,
        },
    ),
]


DEMO_SWEEP = (1152, 2304, 4608)


def _sweep(store_path: str, sweep_dir: str, train_tokens: int, quiet: bool, lm: dict) -> list[dict]:
    from saejax.config import load_config, with_values
    from saejax.interp.eval import evaluate_run
    from saejax.train.sweep import members_of, run_sweep
    from saejax.train.sweep_table import write_table

    done = os.path.join(sweep_dir, "sweep.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["members"]
    base = with_values(
        load_config(CONFIG_PATH, check=False),
        {"data.path": store_path, "train.tokens": train_tokens // 4, "sae.k": 32},
    )
    rows = run_sweep(
        base, members_of("topk", list(DEMO_SWEEP), [], []), sweep_dir, progress=not quiet
    )
    for r in rows:
        r["ce_loss_recovered"] = evaluate_run(r["run_dir"], store_path, sequences=8, **lm)["lm"][
            "ce_loss_recovered"
        ]
    write_table(rows, sweep_dir)
    return rows


def _dashboard(run_dir: str, sweep_rows: list[dict], quiet: bool, lm: dict) -> str:
    from saejax.interp.dashboard import write_dashboard

    index = os.path.join(run_dir, "dashboard", "index.html")
    if os.path.exists(index):
        return index
    largest = max(sweep_rows, key=lambda r: r["d_sae"])["run_dir"]
    return write_dashboard(run_dir, pages=32, split_with=largest, progress=not quiet, **lm)


def _decorrelation(out: str, lm: dict) -> str:
    plot = os.path.join(out, "decorrelation.png")
    if not os.path.exists(plot):
        from saejax.interp.analyze import ModelOptions, analyze_decorrelation

        opts = ModelOptions(dtype=lm["model_dtype"], device=lm["device"])
        analyze_decorrelation(["builtin"], "builtin", out, max_prompts=32, opts=opts)
    return plot


def _lm_eval_one(run_dir: str, store_path: str, quiet: bool, lm: dict) -> dict:
    """CE loss recovered and KL with the SAE spliced in (skipped when already done)."""
    from saejax.interp.eval import evaluate_run

    path = os.path.join(run_dir, "eval_lm.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["lm"]
    return evaluate_run(
        run_dir, store_path, sequences=DEMO_EVAL_SEQUENCES, progress=not quiet, **lm
    )["lm"]


DEMO_EVAL_SEQUENCES = 32


def _train_one(
    store_path: str, run_dir: str, arch: str, extra: dict, train_tokens: int, quiet: bool
) -> dict:
    from saejax.config import load_config, with_values
    from saejax.train.run import load_run_config, train

    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):  # finished in an earlier, interrupted demo
        with open(eval_path) as f:
            return json.load(f)
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        result = train(load_run_config(run_dir), resume=True)
    else:
        if not os.path.exists(CONFIG_PATH):
            raise SaejaxError(f"{CONFIG_PATH} not found: run the demo from a source checkout")
        cfg = with_values(
            load_config(CONFIG_PATH, check=False),
            {
                "data.path": store_path,
                "run_dir": run_dir,
                "sae.architecture": arch,
                "train.tokens": train_tokens,
                "log.progress": not quiet,
                **extra,
            },
        )
        result = train(cfg)
    if result.stopped_early:
        raise KeyboardInterrupt
    return result.final_metrics
