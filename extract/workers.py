"""Extraction workers: many processes, one store.

`saejax extract --workers N --worker I` makes process I one of N workers writing one store.
The contexts a request needs (C = ceil(tokens / rows per context), in corpus order) are
dealt as contiguous ranges: worker i gets contexts [i·C/N, (i+1)·C/N). Each worker writes an
ordinary store (its own meta.json, checksummed chunks, resume and repair) under
STORE/parts/<segment>/worker-<i>-of-<N>/, holding the whole contexts of its range, with the
corpus's own context index in `doc`. The parts concatenated in order are therefore exactly
the rows of a one-process extraction; `saejax.store.PartedStore` reads them so, cut at the
requested token count.

STORE/meta.json (layout "worker-parts") describes the whole: the request (every setting
that changes what rows hold), the target token count, and the segments with their parts.
The first worker to arrive writes it; every other worker checks its own request against it
(another configuration: one line, exit 2). Asking for more tokens than the store covers adds
a segment: the contexts beyond the last segment, dealt again to the N workers of the asking
request, so growing keeps the one-process row order. A worker completes its part of every
segment dealt to N workers.

Every worker tokenizes the corpus from its start and skips the contexts before its range:
simple and deterministic, at the cost of tokenizing the prefix once per worker.

Local stores serialize the read-check-write of the top meta.json with a lock file; on
gs:// / s3:// workers of one request write identical content, but two different requests
started at the same instant are not guaranteed to be told apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from extract.corpus import open_corpus
from extract.extractor import ExtractConfig, check_request, run_extract
from extract.models import resolve_device, resolve_model_dtype
from extract.packing import first_stored_position
from saejax import store as st
from saejax.errors import SaejaxError

LOCK_NAME = ".workers.lock"
# ExtractConfig fields that change how fast rows are made, never what they hold
EXECUTION_ONLY = ("out", "tokens", "device", "batch_size", "batch_tokens")
# (rank, count) variables of the usual launchers, in the order they are trusted
LAUNCHERS = (
    ("SLURM array", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("torchrun", "RANK", "WORLD_SIZE"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS"),
)


def launcher_worker(env) -> tuple[int, int] | None:
    """(worker, workers) from a launcher's environment, or None outside one (or in a
    launch of one process). A SLURM array counts from SLURM_ARRAY_TASK_MIN."""
    for _, rank_var, count_var in LAUNCHERS:
        if rank_var in env and count_var in env:
            try:
                rank, count = int(env[rank_var]), int(env[count_var])
                if rank_var == "SLURM_ARRAY_TASK_ID":
                    rank -= int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            except ValueError:
                continue
            if count > 1:
                return rank, count
    return None


def resolve_worker(workers: int | None, worker: int | None, env) -> tuple[int, int | None]:
    """(workers, worker) from --workers/--worker and the launcher's environment; worker None
    means: launch the N workers here."""
    found = launcher_worker(env)
    if workers is None:
        if found is None:
            raise SaejaxError("--worker needs --workers N (or a launcher's WORLD_SIZE)")
        workers = found[1]
    if workers < 1:
        raise SaejaxError(f"--workers must be at least 1, got {workers}")
    if worker is None and found is not None:
        if found[1] != workers:
            raise SaejaxError(
                f"--workers {workers}, but the launcher started {found[1]} processes; "
                "pass --worker I or a matching --workers"
            )
        worker = found[0]
    if worker is not None and not 0 <= worker < workers:
        raise SaejaxError(f"--worker must be 0..{workers - 1}, got {worker}")
    return workers, worker


def rows_per_context(cfg: ExtractConfig) -> int:
    drop_bos = cfg.prepend_bos and not cfg.keep_bos
    return cfg.context - first_stored_position(drop_bos, cfg.skip_positions)


def deal(first: int, stop: int, workers: int) -> list[tuple[int, int]]:
    """Contexts first..stop-1 as `workers` contiguous ranges, in order."""
    n = stop - first
    return [(first + i * n // workers, first + (i + 1) * n // workers) for i in range(workers)]


def new_segment(index: int, first: int, stop: int, workers: int, per_context: int) -> dict:
    return {
        "workers": workers,
        "contexts": [first, stop],
        "parts": [
            {
                "path": f"parts/{index}/worker-{i}-of-{workers}",
                "contexts": [lo, hi],
                "rows": (hi - lo) * per_context,
            }
            for i, (lo, hi) in enumerate(deal(first, stop, workers))
        ],
    }


def request_identity(cfg: ExtractConfig) -> dict:
    """Every setting that changes what the rows hold (devices resolved, the corpus named as
    its absolute description): two workers of one store must agree on all of it."""
    request = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_ONLY}
    request["corpus"] = open_corpus(cfg.corpus, cfg.split, cfg.text_column).description
    return request


def planned_top(
    path: str, top: dict | None, request: dict, tokens: int, workers: int, per_context: int
) -> dict:
    """The store's top meta.json after this worker's request: `top` checked against the
    request and grown by a segment when it covers fewer contexts than `tokens` need."""
    if top is None:
        top = {
            "layout": st.PARTS_LAYOUT,
            "format_version": st.STORE_FORMAT_VERSION,
            "request": request,
            "rows_per_context": per_context,
            "target_tokens": 0,
            "segments": [],
        }
    elif top.get("layout") != st.PARTS_LAYOUT:
        raise SaejaxError(
            f"store {path} was written by one process; extraction workers need a new --out"
        )
    else:
        had = top["request"]
        diffs = [
            f"{k}: store has {had.get(k)!r}, this worker asks {v!r}"
            for k, v in request.items()
            if had.get(k) != v
        ]
        if diffs:
            raise SaejaxError(
                f"store {path} was made with another configuration ({'; '.join(diffs)}); "
                "use a new --out or the same settings"
            )
        top = json.loads(json.dumps(top))  # a copy to grow
    covered = top["segments"][-1]["contexts"][1] if top["segments"] else 0
    needed = math.ceil(tokens / per_context)
    if needed > covered:
        segment = new_segment(len(top["segments"]), covered, needed, workers, per_context)
        top["segments"].append(segment)
    top["target_tokens"] = max(int(top["target_tokens"]), tokens)
    return top


def _check_store_folder(path: str) -> None:
    if st.is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise SaejaxError(f"output {path} exists and is not a directory")
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if names and not names & {"meta.json", LOCK_NAME}:
            raise SaejaxError(f"output {path} is a non-empty directory that is not a saejax store")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SaejaxError(f"output {path} cannot be created: {e.strerror}") from None


@contextlib.contextmanager
def top_meta_lock(path: str):
    """Serializes the workers' read-check-write of a local store's top meta.json."""
    if st.is_remote(path):
        yield
        return
    import fcntl

    with open(os.path.join(path, LOCK_NAME), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def join_store(cfg: ExtractConfig, workers: int) -> tuple[ExtractConfig, dict]:
    """cfg with its devices resolved, and the store's top meta.json once this worker's
    request is in it (written when it was not)."""
    check_request(cfg)  # what must hold before the top meta.json is written
    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=device, model_dtype=resolve_model_dtype(cfg.model_dtype, device))
    request, per_context = request_identity(cfg), rows_per_context(cfg)
    _check_store_folder(cfg.out)
    with top_meta_lock(cfg.out):
        top = st.read_meta(cfg.out)
        grown = planned_top(cfg.out, top, request, cfg.tokens, workers, per_context)
        if grown != top:
            st.write_meta(cfg.out, grown)
    return cfg, grown


def parts_of(path: str, top: dict, workers: int, worker: int) -> list[dict]:
    """Worker `worker`'s parts: one in each segment dealt to `workers` workers."""
    mine = [seg["parts"][worker] for seg in top["segments"] if seg["workers"] == workers]
    if not mine:
        dealt = sorted({seg["workers"] for seg in top["segments"]})
        raise SaejaxError(
            f"store {path} is dealt to {' and '.join(map(str, dealt))} workers, not {workers}; "
            "pass the same --workers or more --tokens to grow it"
        )
    return mine


def run_worker(
    cfg: ExtractConfig, workers: int, worker: int, progress: bool = True, loaded=None
) -> dict:
    """Extract worker `worker`'s part of every segment of `cfg.out` dealt to `workers`
    workers (resuming or repairing it as run_extract does); returns the whole store's meta."""
    if not 0 <= worker < workers:
        raise SaejaxError(f"--worker must be 0..{workers - 1}, got {worker}")
    cfg, top = join_store(cfg, workers)
    for part in parts_of(cfg.out, top, workers, worker):
        if part["rows"] == 0:
            continue  # more workers than contexts: this one has none here
        path = st.part_path(cfg.out, part["path"])
        had = st.read_meta(path)
        if had is not None and had.get("context_range") != part["contexts"]:
            raise SaejaxError(
                f"part {path} holds contexts {had.get('context_range')}, but the store deals "
                f"it {part['contexts']}; the store is corrupt"
            )
        run_extract(
            replace(cfg, out=path, tokens=part["rows"]),
            progress=progress,
            loaded=loaded,
            context_range=tuple(part["contexts"]),
        )
    return st.ActivationStore.open(cfg.out).meta


def refuse_worker_store(path: str) -> None:
    """A one-process extraction never writes into a store of worker parts."""
    meta = st.read_meta(path) if st.is_remote(path) or os.path.isdir(path) else None
    if meta is not None and meta.get("layout") == st.PARTS_LAYOUT:
        workers = sorted({seg["workers"] for seg in meta.get("segments", [])})
        raise SaejaxError(
            f"store {path} is written by extraction workers; continue it with --workers "
            f"{workers[-1] if workers else 'N'}"
        )


def local_devices(cfg: ExtractConfig, workers: int) -> list[str | None]:
    """One GPU per worker, round robin, when torch sees GPUs and no --device was given."""
    if cfg.device is None:
        import torch

        n = torch.cuda.device_count()
        if n:
            return [f"cuda:{i % n}" for i in range(workers)]
    return [cfg.device] * workers


def _progress_rows(path: str) -> int:
    try:
        top = st.read_meta(path)
        return sum(int(p.meta["n_tokens"]) for p in st.read_parts(path, top) if p.meta)
    except (SaejaxError, OSError, ValueError, KeyError):
        return 0


def launch_local(
    cfg: ExtractConfig, workers: int, progress: bool = True, poll_s: float = 1.0
) -> dict:
    """Start the N workers as subprocesses of this host and wait for them all. A worker that
    fails: its last line of output, and one SaejaxError naming it."""
    cfg, top = join_store(cfg, workers)  # the top meta once, before N processes race for it
    parts_of(cfg.out, top, workers, 0)  # a store dealt otherwise fails here, not N times
    devices = local_devices(cfg, workers)
    env = dict(os.environ)
    if not any(d and d.startswith("cuda") for d in devices) and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    total = int(top["target_tokens"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="extract", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="saejax-workers-") as logs:
        procs = []
        try:
            for i, device in enumerate(devices):
                spec = asdict(replace(cfg, device=device or cfg.device))
                log = open(os.path.join(logs, f"worker-{i}.log"), "w")
                procs.append(
                    (
                        subprocess.Popen(
                            [sys.executable, "-m", "extract.workers", json.dumps(spec)]
                            + [str(workers), str(i)],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=log,
                        ),
                        log,
                    )
                )
            while any(p.poll() is None for p, _ in procs):
                if bar is not None:
                    bar.n = min(total, _progress_rows(cfg.out))
                    bar.refresh()
                time.sleep(poll_s)
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.terminate()  # stopped workers resume where they were
                p.wait()
                log.close()
            if bar is not None:
                bar.close()
        failed = []
        for i, (p, _) in enumerate(procs):
            if p.returncode != 0:
                with open(os.path.join(logs, f"worker-{i}.log")) as f:
                    lines = [line.strip() for line in f if line.strip()]
                last = lines[-1] if lines else "no output"
                failed.append(f"worker {i} of {workers} failed (exit {p.returncode}): {last}")
    for line in failed:
        print(line, file=sys.stderr)
    if failed:
        raise SaejaxError(failed[0] + "; run the same command again to resume")
    return st.ActivationStore.open(cfg.out).meta


def main(argv: list[str]) -> int:
    """One local worker (launch_local starts these): ExtractConfig as JSON, N, I."""
    spec, workers, worker = json.loads(argv[0]), int(argv[1]), int(argv[2])
    try:
        run_worker(ExtractConfig(**spec), workers, worker, progress=False)
    except SaejaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
