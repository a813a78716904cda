"""`saejax demo`: the whole flow on the built-in defaults (model, corpus), resumable.

Each step writes into its own folder under --out and is skipped when already
complete, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import os
import time

DEMO_HOOK = "blocks.15.hook_resid_post"


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="extract, train and evaluate on the built-in model and corpus")
    p.add_argument("--out", default="demo_out", help="folder for the store, runs and report")
    p.add_argument("--tokens", type=int, default=250_000, help="rows to extract")
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
    return 0
