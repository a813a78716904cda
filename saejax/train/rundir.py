"""A run directory's safety rules, shared by `train` and `sweep`.

- One process at a time: `RunLock` holds an exclusive `flock` on RUN/.saejax-lock, which
  records the host and pid of its holder. The kernel drops the lock when its holder dies, so a
  lock file left by a killed run is taken over (with a note) rather than blocking forever.
- A failed start leaves nothing behind: `Created` remembers what a call created in the run
  directory and removes exactly that (never what was there before), so the corrected command
  is not refused with "already holds a run".
- A resume trains what config.yaml says: `config_changes` lists the keys a new config changes
  and `SAFE_TO_CHANGE` the ones that only change how a run is watched, logged or
  checkpointed; any other change needs --force, and is then written to config.yaml and
  recorded in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys

from saejax import io
from saejax.config import RunConfig, dump_yaml
from saejax.errors import SaejaxError

LOCK_NAME = ".saejax-lock"

# keys a resume may change freely: how the run is logged and checkpointed, and where it runs
# (a checkpoint moves between meshes: the data slices, which the checkpoint holds, stay)
SAFE_TO_CHANGE = frozenset(
    {
        "run_dir",
        "mesh.data",
        "mesh.model",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "log.progress",
        "log.wandb",
        "log.wandb_project",
        "log.tensorboard",
        "mesh.distributed",
        "mesh.step_timeout_factor",
        "mesh.step_timeout_min_seconds",
        "data.prefetch",
        "data.prefetch_bytes",
        "data.loader_threads",
    }
)


def validate(cfg: RunConfig) -> None:
    """Checks of the cadences that config.py's types cannot express."""
    t = cfg.train
    if t.keep_checkpoints < 1:
        raise SaejaxError(
            f"train.keep_checkpoints is {t.keep_checkpoints}; it must be at least 1 "
            "(a run keeps its latest checkpoints to resume from)"
        )
    for key, value in (
        ("train.log_every", t.log_every),
        ("train.checkpoint_every", t.checkpoint_every),
    ):
        if value < 1:
            raise SaejaxError(f"{key} is {value}; it must be at least 1")


class RunLock:
    """An exclusive lock on a run directory for this process (`with RunLock(dir, created):`).
    A second process gets one line (who holds it) and exit 2."""

    def __init__(self, run_dir: str, created: Created | None = None):
        self.run_dir, self.created = run_dir, created
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def acquire(self) -> RunLock:
        if io.is_url(self.run_dir):  # train mirrors a URL run_dir (remote_run); nothing else
            raise SaejaxError(
                f"{self.run_dir} is an object-storage URL; sweeps must be local (or a mounted "
                "bucket) for now — train's run_dir and stores may be on gs:// or s3://"
            )
        if self.created is not None:
            self.created.makedirs(self.run_dir)
        else:
            _makedirs(self.run_dir)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
                raise SaejaxError(
                    f"{self.run_dir} is in use by another saejax process{who}; wait for it to "
                    f"end (or remove {self.path} if that process is gone)"
                ) from None
            try:  # the holder before us may have removed the file between our open and lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._note_stale(_read_holder(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self.fd = fd
        return self

    def _note_stale(self, holder: dict) -> None:
        """A lock file still naming a holder: that process died without releasing it (a
        live holder keeps the flock, and a clean exit removes the file). Say so."""
        if holder.get("pid") is not None:
            print(
                f"saejax: note: taking over the lock of {self.run_dir} left by pid "
                f"{holder.get('pid')} on {holder.get('host')}, which is no longer running",
                file=sys.stderr,
            )

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SaejaxError(f"cannot create run directory {path}: {e.strerror}") from None


class Created:
    """The paths a call created, so that a failed start removes exactly those."""

    def __init__(self):
        self.paths: list[str] = []

    def makedirs(self, path: str) -> None:
        """Create `path` (and missing parents), remembering the topmost folder created."""
        path = os.path.abspath(path)
        top = path
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        existed = os.path.exists(path)
        _makedirs(path)
        if not existed:
            self.paths.append(top)

    def add(self, path: str) -> str:
        """`path`, remembered when it does not exist yet (the caller is about to create it)."""
        if not os.path.lexists(path):
            self.paths.append(os.path.abspath(path))
        return path

    def undo(self, keep: tuple[str, ...] = ()) -> None:
        """Remove what was created, newest first; a created folder loses everything in it
        except the files named in `keep` (held locks), and goes once empty."""
        for path in reversed(self.paths):
            if os.path.isdir(path) and not os.path.islink(path):
                for name in os.listdir(path):
                    if os.path.join(path, name) not in keep:
                        _remove(os.path.join(path, name))
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            else:
                _remove(path)

    def remove_empty(self) -> None:
        """The created folders that are empty now (after their lock files went)."""
        for path in reversed(self.paths):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict:
    """{key: (old value, new value)} for every key `new` changes."""
    a = _flat(io.jsonable(dataclasses.asdict(old)))
    b = _flat(io.jsonable(dataclasses.asdict(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(saved: RunConfig, cfg: RunConfig, force: bool) -> dict:
    """The changes to what is trained that `cfg` makes to the saved config; refused (one line)
    unless `force`. Changes of SAFE_TO_CHANGE keys are always allowed (and not returned)."""
    changes = {k: v for k, v in config_changes(saved, cfg).items() if k not in SAFE_TO_CHANGE}
    if changes and not force:
        listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())
        raise SaejaxError(
            f"{cfg.run_dir} was trained with another configuration than this resume asks for "
            f"({listed}); keep config.yaml's values, or pass --force to continue with the change"
        )
    return changes


def record_config_change(cfg: RunConfig, changes: dict, step: int) -> None:
    """Write the forced change into config.yaml (atomically) and metrics.jsonl."""
    io.write_text(os.path.join(cfg.run_dir, "config.yaml"), dump_yaml(cfg))
    record = {
        "step": step,
        "tokens": step * cfg.train.batch_size,
        "config_change": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
    }
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") as f:
        f.write(io.json_text(record, indent=None) + "\n")
