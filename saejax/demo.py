"""`saejax demo`: the whole flow on the built-in defaults (model, corpus), resumable.

Each step writes into its own folder under --out and is skipped when already
complete, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import time

from saejax.errors import SaejaxError
from saejax.files import write_json_atomic

DEMO_HOOK = "blocks.15.hook_resid_post"
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="extract, train and evaluate on the built-in model and corpus")
    p.add_argument("--out", default="demo_out", help="folder for the store, runs and report")
    p.add_argument("--tokens", type=int, default=250_000, help="rows to extract")
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="tokens per SAE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from extract.extractor import ExtractConfig, run_extract
    from saejax.store import ActivationStore, describe

    os.makedirs(args.out, exist_ok=True)
    store_path = os.path.join(args.out, "store")
    t0 = time.time()
    print(f"[1] extract {args.tokens:,} rows of {DEMO_HOOK} from the built-in model -> {store_path}")
    run_extract(ExtractConfig(out=store_path, hooks=[DEMO_HOOK], tokens=args.tokens),
                progress=not args.quiet)
    store = ActivationStore.open(store_path)
    print(describe(store))
    print(f"    done in {time.time() - t0:.0f}s")

    results = {}
    for i, (arch, extra) in enumerate(DEMO_SAES, start=2):
        run_dir = os.path.join(args.out, "runs", arch)
        t1 = time.time()
        print(f"[{i}] train a {arch} SAE ({args.train_tokens:,} tokens) -> {run_dir}")
        results[arch] = _train_one(store_path, run_dir, arch, extra, args)
        m = results[arch]
        print(f"    FVU {m['fvu']:.4f}   L0 {m['l0']:.1f}   dead {m['dead_fraction']:.1%}   "
              f"{m['tokens_per_s']:,.0f} tokens/s   ({time.time() - t1:.0f}s)")
        lm = _lm_eval_one(run_dir, store_path, args)
        m.update({k: lm[k] for k in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced",
                                     "ce_loss_recovered")})
        print(f"    CE loss recovered {lm['ce_loss_recovered']:.4f}   KL {lm['kl_spliced']:.4f}   "
              f"(CE clean {lm['ce_clean']:.3f}, with SAE {lm['ce_spliced']:.3f}, "
              f"zero-ablated {lm['ce_zero']:.3f}; {lm['sequences']} held-out sequences)")

    step = len(DEMO_SAES) + 2
    sweep_dir = os.path.join(args.out, "sweep")
    print(f"[{step}] sweep: topk at d_sae {', '.join(map(str, DEMO_SWEEP))} in lockstep "
          f"({args.train_tokens // 4:,} tokens) -> {sweep_dir}")
    t1 = time.time()
    sweep_rows = _sweep(store_path, sweep_dir, args)
    print(f"    ({time.time() - t1:.0f}s)")

    dash_dir = os.path.join(args.out, "runs", "topk", "dashboard")
    print(f"[{step + 1}] dashboard of the topk SAE (feature splitting against the largest sweep "
          f"member) -> {dash_dir}/index.html")
    t1 = time.time()
    dashboard = _dashboard(os.path.join(args.out, "runs", "topk"), sweep_rows, args)
    print(f"    ({time.time() - t1:.0f}s)")

    decor_dir = os.path.join(args.out, "decorrelation")
    print(f"[{step + 2}] decorrelation of the built-in model's MLPs over all layers -> {decor_dir}")
    t1 = time.time()
    decor_plot = _decorrelation(decor_dir, args)
    print(f"    ({time.time() - t1:.0f}s)")

    report = {"store": store_path, "rows": len(store), "hook": DEMO_HOOK,
              "runs": {a: {"run_dir": os.path.join(args.out, "runs", a), **m} for a, m in results.items()},
              "sweep": {"table": os.path.join(sweep_dir, "sweep.md"), "members": sweep_rows},
              "dashboard": dashboard, "decorrelation_plot": decor_plot,
              "wall_s": time.time() - t0}
    write_json_atomic(os.path.join(args.out, "report.json"), report)
    print(f"\nsummary ({time.time() - t0:.0f}s): store {store_path}; report {args.out}/report.json")
    for arch, m in results.items():
        print(f"  {arch:6s} FVU {m['fvu']:.4f}  L0 {m['l0']:5.1f}  dead {m['dead_fraction']:6.1%}  "
              f"CE loss recovered {m['ce_loss_recovered']:.4f}  -> {args.out}/runs/{arch}/sae")
    for r in sweep_rows:
        print(f"  sweep d_sae {r['d_sae']:5d}  FVU {r['fvu']:.4f}  L0 {r['l0']:5.1f}  "
              f"CE loss recovered {r['ce_loss_recovered']:.4f}")
    print(f"  sweep table   {sweep_dir}/sweep.md")
    print(f"  dashboard     {dashboard}")
    print(f"  decorrelation {decor_plot}")
    return 0


# The demo's two SAEs: TopK (AuxK for dead latents) and Towards Monosemanticity's ReLU + L1
# with resampling. Both 8x wide over d_in 576.
DEMO_SAES = [
    ("topk", ["sae.k=32"]),
    ("relu", ["sae.l1_coefficient=2.0", "sae.l1_warmup_steps=100", "train.resample.every_steps=150",
              "train.lr=0.0003"]),
]


DEMO_SWEEP = (1152, 2304, 4608)


def _sweep(store_path: str, sweep_dir: str, args) -> list[dict]:
    from saejax.lm_eval import evaluate_run
    from saejax.sweep import members_of, run_sweep, write_table

    done = os.path.join(sweep_dir, "sweep.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["members"]
    sets = [f"data.path={store_path}", f"train.tokens={args.train_tokens // 4}", "sae.k=32"]
    rows = run_sweep(CONFIG_PATH, sets, members_of("topk", list(DEMO_SWEEP), [], []), sweep_dir,
                     progress=not args.quiet)
    for r in rows:
        r["ce_loss_recovered"] = evaluate_run(r["run_dir"], store_path, sequences=8)["lm"][
            "ce_loss_recovered"]
    write_table(rows, sweep_dir)
    return rows


def _dashboard(run_dir: str, sweep_rows: list[dict], args) -> str:
    from saejax.dashboard import write_dashboard

    index = os.path.join(run_dir, "dashboard", "index.html")
    if os.path.exists(index):
        return index
    largest = max(sweep_rows, key=lambda r: r["d_sae"])["run_dir"]
    return write_dashboard(run_dir, pages=32, split_with=largest, progress=not args.quiet)


def _decorrelation(out: str, args) -> str:
    plot = os.path.join(out, "decorrelation.png")
    if not os.path.exists(plot):
        from saejax.cli import main as cli_main

        code = cli_main(["analyze", "decorrelation", "builtin", "--prompts", "builtin",
                         "--max-prompts", "32", "--out", out])
        if code != 0:
            raise SaejaxError("the decorrelation step failed")
    return plot


def _lm_eval_one(run_dir: str, store_path: str, args) -> dict:
    """CE loss recovered and KL with the SAE spliced in (skipped when already done)."""
    from saejax.lm_eval import evaluate_run

    path = os.path.join(run_dir, "eval_lm.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["lm"]
    return evaluate_run(run_dir, store_path, sequences=DEMO_EVAL_SEQUENCES,
                        progress=not args.quiet)["lm"]


DEMO_EVAL_SEQUENCES = 32


def _train_one(store_path: str, run_dir: str, arch: str, extra: list[str], args) -> dict:
    from saejax.config import load_config
    from saejax.train import load_run_config, train

    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):  # finished in an earlier, interrupted demo
        with open(eval_path) as f:
            return json.load(f)
    overrides = [f"data.path={store_path}", f"run_dir={run_dir}", f"sae.architecture={arch}",
                 f"train.tokens={args.train_tokens}", f"log.progress={'false' if args.quiet else 'true'}",
                 *extra]
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        result = train(load_run_config(run_dir), resume=True)
    else:
        if not os.path.exists(CONFIG_PATH):
            raise SaejaxError(f"{CONFIG_PATH} not found: run the demo from a source checkout")
        result = train(load_config(CONFIG_PATH, overrides))
    if result.stopped_early:
        raise KeyboardInterrupt
    return result.final_metrics
