"""The `saejax` command line.

Each subcommand imports what it needs lazily, so `saejax store info` starts in a
blink and `saejax train` never imports torch. Errors the user can fix are one line
on stderr with exit status 2; Ctrl-C exits 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import os
import sys

from saejax.errors import SaejaxError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other error."""

    def error(self, message):
        raise SaejaxError(f"{message} (see `{self.prog} --help`)")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    return value


# ---- extract ----------------------------------------------------------------------
def _add_extract(sub):
    p = sub.add_parser("extract", help="extract activations from a language model into a store")
    p.add_argument("--model", default="builtin",
                   help="Hugging Face name, local directory, .gguf file, or 'builtin' (SmolLM2-135M)")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--hooks", type=_csv, default=["blocks.15.hook_resid_post"],
                   help="comma list, e.g. blocks.15.hook_resid_post,blocks.15.hook_mlp_out")
    p.add_argument("--corpus", default="builtin",
                   help="'builtin', .txt/.jsonl/.parquet files or directory, or a HF dataset name")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokens", type=_positive_int, default=250_000, help="rows to extract")
    p.add_argument("--context", type=_positive_int, default=128, help="context length")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="contexts per forward pass")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    p.add_argument("--keep-bos", action="store_true", help="keep BOS rows (dropped by default)")
    p.add_argument("--chunk-mib", type=float, default=4.0, help="store chunk size per hook")
    p.add_argument("--out", required=True, help="store directory (or gs:// / s3:// prefix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args) -> int:
    from extract.extractor import ExtractConfig, run_extract
    from saejax.store import ActivationStore, describe

    cfg = ExtractConfig(out=args.out, model=args.model, hooks=args.hooks, corpus=args.corpus,
                        split=args.split, text_column=args.text_column, tokens=args.tokens,
                        context=args.context, batch_size=args.batch_size, dtype=args.dtype,
                        prepend_bos=args.prepend_bos, keep_bos=args.keep_bos,
                        revision=args.revision, trust_remote_code=args.trust_remote_code,
                        chunk_mib=args.chunk_mib)
    meta = run_extract(cfg, progress=not args.quiet)
    print(describe(ActivationStore.open(args.out)))
    if meta.get("corpus_exhausted"):
        print(f"note: the corpus ran out after {meta['n_tokens']:,} of {cfg.tokens:,} requested rows",
              file=sys.stderr)
    return 0


# ---- store ------------------------------------------------------------------------
def _add_store(sub):
    p = sub.add_parser("store", help="inspect an activation store")
    ssub = p.add_subparsers(dest="store_cmd", required=True, parser_class=_Parser)
    info = ssub.add_parser("info", help="metadata, row count, mean norms, integrity check")
    info.add_argument("path")
    info.add_argument("--no-check", action="store_true", help="skip reading every row")
    info.set_defaults(func=_cmd_store_info)


def _cmd_store_info(args) -> int:
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


# ---- main -------------------------------------------------------------------------
def _add_demo(sub):
    from saejax.demo import add_demo_parser
    add_demo_parser(sub)


def _add_analyze(sub):
    from saejax import cli_analyze
    cli_analyze.add_parsers(sub, _Parser)


_REGISTRY = [_add_extract, _add_store, _add_demo, _add_analyze]


def build_parser() -> argparse.ArgumentParser:
    from saejax import __version__

    parser = _Parser(prog="saejax", description="High-throughput sparse autoencoders in JAX.")
    parser.add_argument("--version", action="version", version=f"saejax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _REGISTRY:
        add(sub)
    from saejax import cli_train  # imports no JAX itself: JAX loads when a command runs
    cli_train.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SaejaxError as e:
        print(f"saejax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsaejax: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if os.environ.get("SAEJAX_DEBUG"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"saejax: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
