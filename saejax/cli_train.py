"""Training-side subcommands: `saejax train` and `saejax export` (need JAX, never torch)."""

from __future__ import annotations

import json

def add_parsers(sub) -> None:
    from saejax.bench import add_parser as add_bench
    from saejax.lm_eval import add_parser as add_eval
    from saejax.steering import add_parser as add_steer

    _add_train(sub)
    _add_export(sub)
    add_bench(sub)
    add_eval(sub)
    add_steer(sub)
    _add_features(sub)
    _add_search(sub)
    _add_dashboard(sub)
    _add_sweep(sub)


def _add_train(sub):
    p = sub.add_parser("train", help="train an SAE from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sae.d_sae=8192 (repeatable)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--dry-run", action="store_true",
                   help="print memory per device and communication per step; do not train")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from saejax.config import load_config
    from saejax.errors import SaejaxError
    from saejax.train import load_run_config, train

    if args.resume:
        cfg = load_run_config(args.resume, args.overrides)
    elif args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)  # defaults + --set when no file
    else:
        raise SaejaxError("give a config file (or --set data.path=...), or --resume RUN")
    if args.dry_run:
        from saejax.dryrun import describe, estimate

        d_in = cfg.sae.d_in
        if not d_in:
            from saejax.data import ArraySource
            d_in = ArraySource(cfg.data.path, cfg.data.hook).d_in
        print(describe(estimate(cfg, d_in)))
        return 0
    result = train(cfg, resume=bool(args.resume), max_steps=args.max_steps)
    if result.stopped_early:
        return 130
    m = result.final_metrics
    if m:
        print(f"run          {cfg.run_dir}")
        print(f"sae          {cfg.sae.architecture} d_in {result.spec.d_in} d_sae {result.spec.d_sae}"
              + (f" k {result.spec.k}" if cfg.sae.architecture in ("topk", "batchtopk") else ""))
        print(f"validation   FVU {m['fvu']:.4f}   L0 {m['l0']:.1f}   dead {m['dead_fraction']:.1%}"
              f"   dense {m['dense_fraction']:.1%}   ({m['tokens']:,} held-out rows)")
        print(f"throughput   {m['tokens_per_s']:,.0f} tokens/s over the run")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="export a trained SAE as SAELens or sparsify")
    p.add_argument("run", help="run directory (or its sae/ folder)")
    p.add_argument("--format", choices=["saelens", "sparsify"], default="saelens")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from saejax.saved import export_saelens, export_sparsify

    out = (export_saelens if args.format == "saelens" else export_sparsify)(args.run, args.out)
    print(json.dumps({"format": args.format, "out": out}))
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="top-activating examples of every latent (one pass)")
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--store", default=None, help="store to scan (default: the run's)")
    p.add_argument("--top", type=int, default=20, help="top examples per latent")
    p.add_argument("--samples", type=int, default=64, help="random activating rows kept per latent")
    p.add_argument("--max-rows", type=int, default=None, help="scan at most this many rows")
    p.add_argument("--show", type=int, action="append", default=[], metavar="LATENT",
                   help="print a latent's examples with their contexts (repeatable)")
    p.set_defaults(func=_cmd_features)


def _cmd_features(args) -> int:
    from saejax.examples import run_features_command  # JAX loads only when the command runs

    return run_features_command(args)


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="rank latents by how they respond to example prompts")
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--positive", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--negative", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--top", type=int, default=10, help="latents to list per ranking")
    p.add_argument("--percentile", type=float, default=1.0, help="top percentile per token")
    p.add_argument("--model", default=None)
    p.add_argument("--store", default=None, help="store for the examples (default: the run's)")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args) -> int:
    from saejax.search import _cmd_search as run

    return run(args)


def _add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="a static HTML dashboard of an SAE")
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--out", default=None, help="folder (default RUN/dashboard)")
    p.add_argument("--store", default=None)
    p.add_argument("--pages", type=int, default=128, help="latent pages, densest first")
    p.add_argument("--llm-url", default=None,
                   help="OpenAI-compatible endpoint for explanations (key in $OPENAI_API_KEY)")
    p.add_argument("--llm-model", default="gpt-4o-mini")
    p.add_argument("--split-with", default=None, metavar="LARGER_RUN",
                   help="show, per latent, the closest decoder directions of a larger SAE")
    p.set_defaults(func=_cmd_dashboard)


def _cmd_dashboard(args) -> int:
    from saejax.dashboard import run_dashboard_command

    return run_dashboard_command(args)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train several SAE sizes in lockstep on the same batches")
    p.add_argument("config", nargs="?", help="YAML config shared by every member")
    p.add_argument("--d-sae", required=True, help="comma list, e.g. 1024,2048,4096")
    p.add_argument("--k", default="", help="comma list (topk/batchtopk)")
    p.add_argument("--l1", default="", help="comma list of λ (relu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder of the member runs and the table")
    p.add_argument("--ce", action="store_true", help="also CE loss recovered per member")
    p.add_argument("--ce-sequences", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from saejax.sweep import run_sweep_command

    return run_sweep_command(args)
