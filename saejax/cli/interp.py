"""`saejax eval`, `steer`, `features`, `search`, `dashboard` and `demo`: everything that runs
the language model (interp/ does the work)."""

from __future__ import annotations

import json
import os
import sys

from saejax.cli.command import Command
from saejax.cli.data import model_device_arguments
from saejax.errors import SaejaxError


def _eval_arguments(p) -> None:
    p.add_argument("run", help="run directory (or an SAE folder with --store)")
    p.add_argument(
        "--store",
        default=None,
        help="store to take held-out sequences from (default: the run's data.path)",
    )
    p.add_argument("--model", default=None, help="model (default: the one the store was made with)")
    p.add_argument("--sequences", type=int, default=32, help="held-out sequences to run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    model_device_arguments(p)


def _eval(args) -> int:
    from saejax.interp.eval import evaluate_run
    from saejax.train.evaluate import describe_metrics

    result = evaluate_run(
        args.run,
        args.store,
        args.model,
        args.sequences,
        args.batch_size,
        progress=not args.json,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    s, lm = result["sae"], result["lm"]
    recovered = lm["ce_loss_recovered"]
    print(f"sae          {describe_metrics(s)}   ({s['tokens']:,} rows)")
    print(
        f"model        {lm['model']} at {lm['hook']}"
        + (f" → {lm['target_hook']}" if lm.get("target_hook") else "")
        + f", {lm['sequences']} held-out sequences, "
        f"{lm['predicted_tokens']:,} predicted tokens"
    )
    print(
        f"CE           clean {lm['ce_clean']:.4f}   with SAE {lm['ce_spliced']:.4f}   "
        f"zero-ablated {lm['ce_zero']:.4f}"
    )
    print(f"KL           with SAE {lm['kl_spliced']:.4f}   zero-ablated {lm['kl_zero']:.4f}")
    if lm.get("ce_loss_recovered_bos_kept") is not None:
        print(
            f"CE loss recovered, BOS left clean in the baseline "
            f"{lm['ce_loss_recovered_bos_kept']:.4f}"
        )
    print(
        "CE loss recovered "
        + (
            f"{recovered:.4f}"
            if recovered is not None
            else "undefined (zero ablation does not hurt the model)"
        )
    )
    if os.access(args.run, os.W_OK):
        print(f"wrote {os.path.join(args.run, 'eval_lm.json')}")
    return 0


def _steer_arguments(p) -> None:
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--boost", type=float, default=None, help="add boost × the decoder direction")
    p.add_argument("--clamp", type=float, default=None, help="set the latent to this value")
    p.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    p.add_argument("--model", default=None, help="model (default: the SAE's)")
    model_device_arguments(p)


MAX_STEER_TOKENS = 4096  # generation is one token per forward pass: more is never meant


def _steer(args) -> int:
    from saejax.interp.steer import steer

    if not 1 <= args.tokens <= MAX_STEER_TOKENS:
        raise SaejaxError(
            f"--tokens must be between 1 and {MAX_STEER_TOKENS} (tokens generated per prompt), "
            f"got {args.tokens}"
        )
    results = steer(
        args.run,
        args.latent,
        args.prompt,
        args.boost,
        args.clamp,
        args.tokens,
        args.model,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    what = f"boost {args.boost:+g}" if args.boost is not None else f"clamp {args.clamp:g}"
    for r in results:
        print(f"prompt       {r['prompt']!r}")
        print(f"unsteered    {r['unsteered']!r}")
        print(f"latent {args.latent} {what}: {r['steered']!r}")
        print()
    sys.stdout.flush()
    return 0


def _features_arguments(p) -> None:
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--store", default=None, help="store to scan (default: the run's)")
    p.add_argument("--top", type=int, default=20, help="top examples per latent")
    p.add_argument("--samples", type=int, default=64, help="random activating rows kept per latent")
    p.add_argument("--max-rows", type=int, default=None, help="scan at most this many rows")
    p.add_argument(
        "--show",
        type=int,
        action="append",
        default=[],
        metavar="LATENT",
        help="print a latent's examples with their contexts (repeatable)",
    )


def _features(args) -> int:
    from saejax.interp.features import latent_examples, latent_report

    result, store, scanned = latent_examples(
        args.run,
        args.store,
        args.top,
        args.samples,
        args.max_rows,
        progress=sys.stderr.isatty(),
        shown=args.show,
    )
    if scanned:
        print(
            f"scanned {int(result['n_rows']):,} rows; wrote "
            f"{os.path.join(args.run, 'features', 'examples.npz')}"
        )
    if args.show:
        from extract.models import load_tokenizer

        tok = load_tokenizer(store.meta)
        for latent in args.show:
            print("\n".join(latent_report(result, latent, store, tok)))
    return 0


def _search_arguments(p) -> None:
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--positive", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--negative", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--top", type=int, default=10, help="latents to list per ranking")
    p.add_argument("--percentile", type=float, default=1.0, help="top percentile per token")
    p.add_argument("--model", default=None)
    p.add_argument("--store", default=None, help="store for the examples (default: the run's)")
    model_device_arguments(p)


def _search(args) -> int:
    from saejax.interp.search import search

    if not 0 < args.percentile <= 100:
        raise SaejaxError(f"--percentile must be in (0, 100], got {args.percentile:g}")
    search(
        args.run,
        args.positive,
        args.negative,
        args.top,
        args.percentile,
        args.model,
        args.store,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    return 0


def _dashboard_arguments(p) -> None:
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--out", default=None, help="folder (default RUN/dashboard)")
    p.add_argument("--store", default=None)
    p.add_argument("--pages", type=int, default=128, help="latent pages, densest first")
    p.add_argument(
        "--llm-url",
        default=None,
        help="OpenAI-compatible endpoint for explanations (key in $OPENAI_API_KEY)",
    )
    p.add_argument("--llm-model", default="gpt-4o-mini", help="model asked for explanations")
    p.add_argument(
        "--split-with",
        default=None,
        metavar="LARGER_RUN",
        help="show, per latent, the closest decoder directions of a larger SAE",
    )
    model_device_arguments(p)


def _dashboard(args) -> int:
    from saejax.interp.dashboard import write_dashboard

    if args.pages < 0:
        raise SaejaxError("--pages must be at least 0")
    path = write_dashboard(
        args.run,
        args.out,
        args.pages,
        args.llm_url,
        args.llm_model,
        args.store,
        progress=sys.stderr.isatty(),
        split_with=args.split_with,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    print(f"wrote {path}")
    return 0


def _demo_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="folder for the store, runs and report")
    p.add_argument("--tokens", type=int, default=250_000, help="rows to extract")
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="tokens per SAE")
    p.add_argument("--quiet", action="store_true")
    model_device_arguments(p)


def _demo(args) -> int:
    from saejax.interp.demo import run_demo

    run_demo(
        args.out,
        args.tokens,
        args.train_tokens,
        quiet=args.quiet,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    return 0


COMMANDS = (
    Command(
        "eval",
        "CE loss recovered, KL and held-out metrics of a trained SAE",
        _eval_arguments,
        _eval,
    ),
    Command(
        "steer", "generate with a latent's direction added or clamped", _steer_arguments, _steer
    ),
    Command(
        "features",
        "top-activating examples of every latent (one pass)",
        _features_arguments,
        _features,
    ),
    Command(
        "search", "rank latents by how they respond to example prompts", _search_arguments, _search
    ),
    Command("dashboard", "a static HTML dashboard of an SAE", _dashboard_arguments, _dashboard),
    Command(
        "demo",
        "extract, train and evaluate on the built-in model and corpus",
        _demo_arguments,
        _demo,
    ),
)
