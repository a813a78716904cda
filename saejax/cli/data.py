"""`saejax extract` and `saejax store info`: making and inspecting activation stores."""

from __future__ import annotations

import sys

from saejax.cli.command import Command, csv_list, whole_number
from saejax.errors import SaejaxError


def _extract_arguments(p) -> None:
    p.add_argument(
        "--model",
        default="builtin",
        help="Hugging Face name, local directory, .gguf file, or 'builtin' (SmolLM2-135M)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--hooks",
        type=csv_list,
        default=["blocks.15.hook_resid_post"],
        help="comma list, e.g. blocks.15.hook_resid_post,blocks.15.hook_mlp_out",
    )
    p.add_argument(
        "--corpus",
        default="builtin",
        help="'builtin', .txt/.jsonl/.parquet files or directory, or a HF dataset name",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokens", type=whole_number, default=250_000, help="rows to extract")
    p.add_argument("--context", type=whole_number, default=128, help="context length")
    p.add_argument("--batch-size", type=whole_number, default=16, help="contexts per forward pass")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    p.add_argument("--keep-bos", action="store_true", help="keep BOS rows (dropped by default)")
    p.add_argument(
        "--skip-positions",
        type=int,
        default=0,
        help="store no rows for the first N positions of each context (attention sinks)",
    )
    p.add_argument("--chunk-mib", type=float, default=4.0, help="store chunk size per hook")
    p.add_argument("--out", required=True, help="store directory (or gs:// / s3:// prefix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _extract(args) -> int:
    from extract.extractor import ExtractConfig, run_extract
    from saejax.store import ActivationStore, describe

    cfg = ExtractConfig(
        out=args.out,
        model=args.model,
        hooks=args.hooks,
        corpus=args.corpus,
        split=args.split,
        text_column=args.text_column,
        tokens=args.tokens,
        context=args.context,
        batch_size=args.batch_size,
        dtype=args.dtype,
        prepend_bos=args.prepend_bos,
        keep_bos=args.keep_bos,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        chunk_mib=args.chunk_mib,
        skip_positions=args.skip_positions,
    )
    meta = run_extract(cfg, progress=not args.quiet)
    print(describe(ActivationStore.open(args.out)))
    if meta.get("corpus_exhausted"):
        print(
            f"note: the corpus ran out after {meta['n_tokens']:,} of {cfg.tokens:,} requested rows",
            file=sys.stderr,
        )
    return 0


def _info_arguments(p) -> None:
    p.add_argument("path")
    p.add_argument("--no-check", action="store_true", help="skip reading every row")


def _store_info(args) -> int:
    from saejax.store import ActivationStore, describe

    store = ActivationStore.open(args.path)
    print(describe(store))
    if args.no_check:
        return 0
    report = store.check()
    for hook, norm in report.mean_norm.items():
        print(f"checked      {hook}: {report.n_tokens:,} rows read, mean norm {norm:.4g}")
    if not report.ok:
        for what, rows in report.bad_rows.items():
            if rows:
                print(f"integrity    {what}: bad values in rows {rows}", file=sys.stderr)
        raise SaejaxError(f"store {args.path} failed its integrity check")
    print("integrity    ok (every counted row present and finite)")
    return 0


COMMANDS = (
    Command(
        "extract",
        "extract activations from a language model into a store",
        _extract_arguments,
        _extract,
    ),
    Command(
        "store",
        "inspect an activation store",
        subcommands=(
            Command(
                "info",
                "metadata, row count, mean norms, integrity check",
                _info_arguments,
                _store_info,
            ),
        ),
    ),
)
