"""`saejax extract` and `saejax store info`: making and inspecting activation stores."""

from __future__ import annotations

import sys

from saejax.cli.command import Command, csv_list, whole_number
from saejax.errors import SaejaxError


def model_device_arguments(p, dtype_default: str = "bfloat16 on a GPU, float32 on the CPU") -> None:
    """--device and --model-dtype, for every command that runs the language model."""
    p.add_argument(
        "--device",
        default=None,
        help="torch device of the language model: cpu, cuda, cuda:N or mps "
        "(default: cuda when torch sees a GPU, else cpu)",
    )
    p.add_argument(
        "--model-dtype",
        default=None,
        help=f"language model dtype: float32, bfloat16 or float16 (default: {dtype_default})",
    )


def _extract_arguments(p) -> None:
    p.add_argument(
        "--model",
        default="builtin",
        help="Hugging Face name, local directory, .gguf file, or 'builtin' (SmolLM2-135M)",
    )
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code"
    )
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
    p.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    p.add_argument("--text-column", default="text", help="column holding the text")
    p.add_argument("--tokens", type=whole_number, default=250_000, help="rows to extract")
    p.add_argument("--context", type=whole_number, default=128, help="context length")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch-size", type=whole_number, default=16, help="contexts per forward pass"
    )
    batch.add_argument(
        "--batch-tokens",
        type=whole_number,
        default=None,
        help="tokens per forward pass instead (contexts per forward = N // --context)",
    )
    model_device_arguments(p)
    p.add_argument("--dtype", default="bfloat16", help="store dtype: bfloat16, float16 or float32")
    p.add_argument(
        "--no-prepend-bos",
        dest="prepend_bos",
        action="store_false",
        help="do not start each context with the BOS token",
    )
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
    p.add_argument(
        "--workers",
        type=whole_number,
        default=None,
        help="split the corpus's contexts over N extraction workers writing one store; "
        "without --worker (and outside a launcher) start the N workers here, one per GPU",
    )
    p.add_argument(
        "--worker",
        type=whole_number,
        default=None,
        help="this process is worker I (0..N-1) (default: from SLURM_ARRAY_TASK_ID, RANK "
        "or SLURM_PROCID when a launcher started several processes)",
    )


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
        device=args.device,
        model_dtype=args.model_dtype,
        batch_tokens=args.batch_tokens,
        skip_positions=args.skip_positions,
    )
    if args.workers is None and args.worker is None:
        from extract.workers import refuse_worker_store

        refuse_worker_store(args.out)
        meta = run_extract(cfg, progress=not args.quiet)
    else:
        meta = _extract_workers(cfg, args.workers, args.worker, progress=not args.quiet)
    print(describe(ActivationStore.open(args.out)))
    if meta.get("corpus_exhausted"):
        print(
            f"note: the corpus ran out after {meta['n_tokens']:,} of {cfg.tokens:,} requested rows",
            file=sys.stderr,
        )
    return 0


def _extract_workers(cfg, workers: int | None, worker: int | None, progress: bool) -> dict:
    import os

    from extract.workers import launch_local, resolve_worker, run_worker

    workers, worker = resolve_worker(workers, worker, os.environ)
    if worker is None:
        return launch_local(cfg, workers, progress=progress)
    return run_worker(cfg, workers, worker, progress=progress)


def _info_arguments(p) -> None:
    p.add_argument("path", help="store directory")
    p.add_argument("--no-check", action="store_true", help="skip reading every row")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also read the doc array: every chunk of the store present and matching its checksum",
    )


def _store_info(args) -> int:
    from saejax.store import ActivationStore, describe

    if args.no_check and args.verify:
        raise SaejaxError("--no-check and --verify contradict each other; give one")
    store = ActivationStore.open(args.path)
    print(describe(store))
    if args.no_check:
        return 0
    report = store.check(verify=args.verify)
    for hook, norm in report.mean_norm.items():
        unread = [c for c in report.bad_chunks if c.array == f"acts/{hook}"]
        if unread:
            print(f"checked      {hook}: {len(unread)} chunk(s) could not be read")
        else:
            print(f"checked      {hook}: {report.n_tokens:,} rows read, mean norm {norm:.4g}")
    if not report.checksummed:
        print("note         this store's chunks carry no checksums (made by an older saejax)")
    for chunk in report.bad_chunks:
        print(f"bad chunk    {chunk.describe()}")
    if report.bad_chunks:
        raise SaejaxError(
            f"store {args.path} has {len(report.bad_chunks)} missing or damaged chunk(s) "
            f"(first: {report.bad_chunks[0].describe()}); run the same `saejax extract` again "
            "to repair it"
        )
    if not report.ok:
        for what, rows in report.bad_rows.items():
            if rows:
                print(f"integrity    {what}: bad values in rows {rows}", file=sys.stderr)
        raise SaejaxError(f"store {args.path} failed its integrity check")
    what = "every chunk present and intact" if args.verify else "every counted row present"
    print(f"integrity    ok ({what}, values finite)")
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
