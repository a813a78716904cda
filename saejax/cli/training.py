"""`saejax train`, `sweep`, `export` and `bench`: the JAX side (never torch, except
`sweep --ce`, which evaluates members with the language model)."""

from __future__ import annotations

import json

from saejax.cli.command import Command
from saejax.cli.data import model_device_arguments
from saejax.errors import SaejaxError


def _train_arguments(p) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config (omit with --resume); a .npy file or store directory here is read "
        "as data.path with the default settings",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sae.d_sae=8192 (repeatable); `saejax config` "
        "lists every key with its type, default and meaning",
    )
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument(
        "--force",
        action="store_true",
        help="let --resume change what is trained (--set) or continue on changed data; "
        "config.yaml is updated and the change recorded in metrics.jsonl",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print memory per device and communication per step; do not train",
    )
    launch = p.add_argument_group(
        "multi-process launch (never saved with the run; default: SAEJAX_COORDINATOR, "
        "SAEJAX_NUM_PROCESSES, SAEJAX_PROCESS_ID, else torchrun's variables, else "
        "mesh.distributed auto)"
    )
    launch.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    launch.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    launch.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    launch.add_argument(
        "--init-timeout",
        type=int,
        metavar="S",
        help="seconds for every process to arrive (default 300, or SAEJAX_INIT_TIMEOUT)",
    )


def _train(args) -> int:
    from saejax.config import load_config
    from saejax.core.architectures import selects_top_k
    from saejax.train.evaluate import describe_metrics
    from saejax.train.run import load_run_config, train

    if args.resume:
        cfg = load_run_config(args.resume, args.overrides)
    elif args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)  # defaults + --set when no file
    else:
        raise SaejaxError("give a config file (or --set data.path=...), or --resume RUN")
    if args.dry_run:
        from saejax.train.dryrun import describe, estimate

        d_in = cfg.sae.d_in
        if not d_in:
            from saejax.train.data import ArraySource

            d_in = ArraySource(cfg.data.path, cfg.data.hook).d_in
        print(describe(estimate(cfg, d_in, processes=args.num_processes)))
        return 0
    from saejax.train.launch import resolve_launch

    launch = resolve_launch(
        args.coordinator, args.num_processes, args.process_id, args.init_timeout
    )
    result = train(
        cfg, resume=bool(args.resume), max_steps=args.max_steps, force=args.force, launch=launch
    )
    if result.stopped_early:
        return 130
    m = result.final_metrics
    if m:
        print(f"run          {cfg.run_dir}")
        print(
            f"sae          {cfg.sae.architecture} d_in {result.spec.d_in} d_sae {result.spec.d_sae}"
            + (f" k {result.spec.k}" if selects_top_k(cfg.sae.architecture) else "")
        )
        print(f"validation   {describe_metrics(m)}   ({m['tokens']:,} held-out rows)")
        print(f"throughput   {m['tokens_per_s']:,.0f} tokens/s over the run")
    return 0


def _export_arguments(p) -> None:
    p.add_argument("run", help="run directory (or its sae/ folder)")
    p.add_argument(
        "--format", choices=["saelens", "sparsify"], default="saelens", help="export layout"
    )
    p.add_argument("--out", required=True, help="folder to write")


def _export(args) -> int:
    from saejax.train.export import export_saelens, export_sparsify

    out = (export_saelens if args.format == "saelens" else export_sparsify)(args.run, args.out)
    print(json.dumps({"format": args.format, "out": out}))
    return 0


def _sweep_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config shared by every member")
    p.add_argument("--d-sae", required=True, help="comma list, e.g. 1024,2048,4096")
    p.add_argument("--k", default="", help="comma list (topk/batchtopk)")
    p.add_argument("--l1", default="", help="comma list of λ (relu, gated)")
    p.add_argument(
        "--lr", default="", help="comma list of learning rates, crossed with the other lists"
    )
    p.add_argument(
        "--hooks",
        default="",
        help="comma list of the store's hooks, or `all`: one member per hook and setting, "
        "every hook read in the same pass (crossed with the other lists)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every member (repeatable; `saejax config` lists them)",
    )
    p.add_argument("--out", required=True, help="folder of the member runs and the table")
    p.add_argument("--ce", action="store_true", help="also CE loss recovered per member")
    p.add_argument("--ce-sequences", type=int, default=16, help="held-out sequences for --ce")
    model_device_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-time-alone",
        action="store_true",
        help="skip timing each member's step alone after training (one compile per member "
        "fewer; the table's tokens/s column shows –)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="let a sweep run again change what its members train (config.yaml updated)",
    )


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise SaejaxError(f"{flag} must be a comma list of numbers, got '{text}'") from None


def _sweep(args) -> int:
    from saejax.config import load_config
    from saejax.train.sweep import members_of, run_sweep, sweep_hooks
    from saejax.train.sweep_table import write_table

    base = load_config(args.config, args.overrides)
    names = [h.strip() for h in args.hooks.split(",") if h.strip()]
    grid = members_of(
        base.sae.architecture,
        _numbers(args.d_sae, int, "--d-sae"),
        _numbers(args.k, int, "--k"),
        _numbers(args.l1, float, "--l1"),
        _numbers(args.lr, float, "--lr"),
        sweep_hooks(base.data.path, names) if args.hooks else [],
    )
    if args.ce:  # a device that is not there fails before the sweep trains
        from extract.models import resolve_device

        resolve_device(args.device)
    rows = run_sweep(
        base,
        grid,
        args.out,
        progress=not args.quiet,
        force=args.force,
        time_alone=not args.no_time_alone,
    )
    if args.ce:
        from saejax.interp.eval import evaluate_run

        for r in rows:
            lm = evaluate_run(
                r["run_dir"],
                sequences=args.ce_sequences,
                device=args.device,
                model_dtype=args.model_dtype,
            )["lm"]
            r["ce_loss_recovered"] = lm["ce_loss_recovered"]
    write_table(rows, args.out)
    return 0


def _bench_arguments(p) -> None:
    p.add_argument("--d-in", type=int, default=576, help="input width")
    p.add_argument("--d-sae", default="4608,18432", help="comma list")
    p.add_argument("--batch", type=int, default=4096, help="rows per step")
    p.add_argument("--k", type=int, default=32, help="latents kept per row (topk, batchtopk)")
    p.add_argument(
        "--arch", default="relu,topk", help="comma list of relu, topk, batchtopk, jumprelu, gated"
    )
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument(
        "--topk-kernel", default="sparse", help="sparse, pallas, auto or dense (sae.topk_kernel)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument(
        "--store",
        default=None,
        help="store for the loader and loop figures (default: a temporary one of random rows)",
    )
    p.add_argument("--no-loop", action="store_true", help="skip the loader and loop figures")
    p.add_argument(
        "--loader-only",
        action="store_true",
        help="measure only the loader (tokens/s, per host core) from --store, local or gs://",
    )
    p.add_argument(
        "--loader-threads", type=int, default=0, help="data.loader_threads (0: the default)"
    )
    p.add_argument(
        "--loader-batches", type=int, default=48, help="batches timed with --loader-only"
    )
    p.add_argument(
        "--loop-rounds",
        type=int,
        default=3,
        help="loop timings, each against the step timed beside it; the median is reported",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")


def _bench(args) -> int:
    from saejax.core.architectures import ARCHITECTURES, TOPK_KERNELS, selects_top_k
    from saejax.train.bench import StepShape, run_bench, run_loader_bench

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHITECTURES:
            raise SaejaxError(f"unknown --arch '{a}'; choose from {', '.join(ARCHITECTURES)}")
    sizes = _numbers(args.d_sae, int, "--d-sae")
    if args.dtype not in ("float32", "bfloat16"):
        raise SaejaxError(f"unknown --dtype '{args.dtype}'; choose float32 or bfloat16")
    if args.topk_kernel not in TOPK_KERNELS:
        raise SaejaxError(
            f"unknown --topk-kernel '{args.topk_kernel}'; choose {', '.join(TOPK_KERNELS)}"
        )
    if (
        not sizes
        or min(sizes) < 1
        or args.d_in < 1
        or args.batch < 1
        or args.steps < 1
        or args.loop_rounds < 1
        or args.loader_batches < 1
    ):
        raise SaejaxError(
            "--d-in, --d-sae, --batch, --steps, --loop-rounds and --loader-batches must be positive"
        )
    if args.loader_threads < 0:
        raise SaejaxError(f"--loader-threads must be at least 0, got {args.loader_threads}")
    if any(selects_top_k(a) for a in archs) and not 0 < args.k <= min(sizes):
        raise SaejaxError(f"--k {args.k} must be between 1 and the smallest --d-sae")
    if args.store is not None:
        from saejax.store import ActivationStore

        store = ActivationStore.open(args.store)
        if store.d_in != args.d_in:
            raise SaejaxError(
                f"--store {args.store} has d_in {store.d_in} but --d-in is {args.d_in}"
            )
    shapes = [
        StepShape(a, args.d_in, d, args.batch, args.k, args.dtype, args.topk_kernel)
        for a in archs
        for d in sizes
    ]
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    if args.loader_only:
        out = run_loader_bench(shapes[0], args.loader_batches, args.store, args.loader_threads, say)
    else:
        out = run_bench(
            shapes,
            args.steps,
            args.store,
            not args.no_loop,
            say,
            args.loop_rounds,
            args.loader_threads,
        )
    if args.json:
        print(json.dumps(out))
    return 0


COMMANDS = (
    Command("train", "train an SAE from a YAML config", _train_arguments, _train),
    Command("export", "export a trained SAE as SAELens or sparsify", _export_arguments, _export),
    Command(
        "bench",
        "training-step, loader and loop throughput on this machine",
        _bench_arguments,
        _bench,
    ),
    Command(
        "sweep", "train several SAE sizes in lockstep on the same batches", _sweep_arguments, _sweep
    ),
)
