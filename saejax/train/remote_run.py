"""A run directory on object storage (`gs://`, `s3://`): a local working copy plus a mirror.

Training writes into a local staging folder exactly as into a local run directory (orbax,
atomic renames, the metrics log all need a filesystem), and this module copies what a reader
or a resume needs into the bucket, through TensorStore's kvstores (the same specs, endpoints
and bounded retries as stores; no cloud SDK):

- after each checkpoint is committed locally (orbax renamed its folder), a background thread
  uploads its files, then config.yaml and metrics.jsonl, then `checkpoints/STEP.manifest.json`
  LAST; a checkpoint without its manifest is an unfinished upload, never resumed from (and
  deleted by the next resume). Checkpoints the local copy no longer keeps lose their manifest
  first, then their files.
- when the run finishes, the same for `sae/` and eval.json, with `sae.manifest.json` last.
- `--resume URL` (on any machine) rebuilds the staging folder from the bucket: config.yaml,
  metrics.jsonl, eval.json and the newest checkpoint whose manifest lists files that are all
  there.

The staging folder is $SAEJAX_CACHE/runs/<hash of the URL> (default ~/.cache/saejax); saejax
creates it and marks it, so replacing it at the next start or resume loses nothing.

One process at a time: a lock object (`.saejax-lock`, host, pid and a heartbeat time) is
created and replaced with TensorStore's conditional writes (generation preconditions), so two
starters cannot both win. A lock whose holder is gone (the same host and its pid is dead, or
no heartbeat for SAEJAX_REMOTE_LOCK_STALE seconds, default 600) is taken over with a note.
(fake-gcs-server ignores preconditions: against it the lock only refuses a starter that finds
it held.) Multi-process runs need a shared filesystem and are refused here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time

import tensorstore as ts

from saejax import io
from saejax import store as st
from saejax.errors import SaejaxError

LOCK_KEY = ".saejax-lock"
STAGING_MARK = ".saejax-staging"  # in every staging folder; holds the URL it mirrors
SAE_MANIFEST = "sae.manifest.json"
HEARTBEAT_S = 60.0
# the run's own files, uploaded with each checkpoint and at the end (before the manifests)
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.json")


def is_remote(path: str) -> bool:
    return st.is_remote(str(path))


def failure(url: str, error: Exception) -> SaejaxError:
    """One line naming the run directory and, in words, why its bucket failed."""
    reason = str(st.remote_failure(url, error)).split(": ", 1)[-1]
    return SaejaxError(f"run directory {url}: {reason}")


def staging_dir(url: str) -> str:
    root = os.environ.get("SAEJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "saejax"
    )
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(root, "runs", digest)


def fresh_staging(url: str) -> str:
    """An empty staging folder for `url` (one saejax made earlier is emptied; any other
    folder in its place is refused, never removed)."""
    local = staging_dir(url)
    if os.path.lexists(local):
        if not os.path.exists(os.path.join(local, STAGING_MARK)):
            raise SaejaxError(
                f"{local} exists but is not a saejax staging folder; remove it or set "
                "SAEJAX_CACHE to another folder"
            )
        shutil.rmtree(local)
    os.makedirs(local)
    io.write_text(os.path.join(local, STAGING_MARK), url + "\n")
    return local


def open_kv(url: str):
    try:
        return ts.KvStore.open(st.kvstore_spec(url)).result()
    except ValueError as e:
        raise failure(url, e) from None


def read_key(kv, url: str, key: str) -> bytes | None:
    try:
        result = kv.read(key).result()
    except ValueError as e:
        raise failure(url, e) from None
    return result.value if result.state == "value" else None


def list_keys(kv, url: str, prefix: str = "") -> list[str]:
    try:
        if prefix:
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            keys = kv.list(ts.KvStore.KeyRange(prefix, end)).result()
        else:
            keys = kv.list().result()
    except ValueError as e:
        raise failure(url, e) from None
    return sorted(k.decode() for k in keys)


def read_config_text(url: str) -> str:
    """config.yaml of the run at `url` (one line when there is none)."""
    data = read_key(open_kv(url), url, "config.yaml")
    if data is None:
        raise SaejaxError(f"{url} is not a saejax run (no config.yaml)")
    return data.decode()


def probe(url: str) -> None:
    """A write and a delete: a missing bucket, refused credentials or an unreachable endpoint
    fail here, in one line, before anything is trained."""
    try:
        st.probe_remote(url)
    except SaejaxError as e:
        raise SaejaxError(f"run directory {url}: {str(e).split(': ', 1)[-1]}") from None


class RemoteLock:
    """The run's lock object: created only where none is (or a stale one is), by a write
    conditioned on the generation read, and removed on release."""

    def __init__(self, kv, url: str):
        self.kv, self.url = kv, url
        self.generation = None

    def _holder_body(self) -> bytes:
        body = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        return json.dumps(body).encode()

    def acquire(self) -> RemoteLock:
        try:
            current = self.kv.read(LOCK_KEY).result()
        except ValueError as e:
            raise failure(self.url, e) from None
        if current.state == "value":
            holder = _parse(current.value)
            if not _stale(holder):
                self._refuse(holder)
            print(
                f"saejax: note: taking over the lock of {self.url} left by pid "
                f"{holder.get('pid')} on {holder.get('host')}, which is no longer running",
                file=sys.stderr,
            )
        written = self._write(self._holder_body(), current.stamp.generation)
        if not written:  # another process wrote the lock between our read and write
            self._refuse(_parse(read_key(self.kv, self.url, LOCK_KEY) or b"{}"))
        self.generation = written
        return self

    def _write(self, body: bytes | None, if_equal) -> bytes:
        try:
            return self.kv.write(LOCK_KEY, body, if_equal=if_equal).result().generation
        except ValueError as e:
            raise failure(self.url, e) from None

    def _refuse(self, holder: dict) -> None:
        who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
        raise SaejaxError(
            f"{self.url} is in use by another saejax process{who}; wait for it to end (or "
            f"delete {self.url.rstrip('/')}/{LOCK_KEY} if that process is gone)"
        )

    def beat(self) -> None:
        """Renew the heartbeat time (only while the lock is still ours)."""
        if self.generation is not None:
            renewed = self._write(self._holder_body(), self.generation)
            if renewed:
                self.generation = renewed

    def release(self) -> None:
        if self.generation is not None:
            with contextlib.suppress(SaejaxError):
                self._write(None, self.generation)
            self.generation = None


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data.decode() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    """The holder is gone: its pid is dead on this host, or its heartbeat is too old."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    limit = float(os.environ.get("SAEJAX_REMOTE_LOCK_STALE", "600"))
    return time.time() - float(holder.get("time") or 0) > limit


def _manifest_key(step: int) -> str:
    return f"checkpoints/{step}.manifest.json"


def _local_files(folder: str) -> dict[str, int]:
    """{path relative to `folder`: size} of every file below it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return files


def complete_checkpoints(kv, url: str) -> dict[int, dict]:
    """{step: manifest} of the checkpoints in the bucket whose every listed file is there."""
    keys = set(list_keys(kv, url, "checkpoints/"))
    found = {}
    for key in keys:
        name = key.removeprefix("checkpoints/")
        if not (name.endswith(".manifest.json") and name.split(".")[0].isdigit()):
            continue
        manifest = _parse(read_key(kv, url, key) or b"")
        step = int(name.split(".")[0])
        files = manifest.get("files") or {}
        if files and all(f"checkpoints/{step}/{rel}" in keys for rel in files):
            found[step] = manifest
    return found


class Mirror:
    """Uploads of one run directory's staging folder, in a background thread."""

    def __init__(self, kv, url: str, local: str, lock: RemoteLock):
        self.kv, self.url, self.local, self.lock = kv, url, local, lock
        self.jobs: queue.Queue = queue.Queue()
        self.error: SaejaxError | None = None
        self.orbax_done = threading.Event()
        self.thread = threading.Thread(target=self._work, name="saejax-mirror", daemon=True)
        self.thread.start()

    # --- called by the Checkpointer -------------------------------------------------------
    def checkpoint_saved(self, step: int) -> None:
        """Orbax has started saving `step`: upload it once it is committed."""
        self.orbax_done.clear()
        self.jobs.put(step)

    def checkpoints_changed(self) -> None:
        """Local checkpoints were deleted (a divergence, a damaged one): drop them remotely."""
        self.jobs.put("prune")

    def flush(self) -> None:
        """Orbax has finished every save: wait for their uploads; an upload that failed is
        one line."""
        self.orbax_done.set()
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # --- called by train() ----------------------------------------------------------------
    def upload_run(self) -> None:
        """The final SAE and the run's files, after every checkpoint (sae manifest last)."""
        self.flush()
        try:
            sae = os.path.join(self.local, "sae")
            files = _local_files(sae) if os.path.isdir(sae) else {}
            if files:  # a reader never sees the old manifest over new files
                self._delete([SAE_MANIFEST])
                self._put({f"sae/{rel}": os.path.join(sae, rel) for rel in files})
            self._put_run_files()
            if files:
                self._write(SAE_MANIFEST, io.json_text({"files": files}).encode())
        except ValueError as e:
            raise failure(self.url, e) from None

    def close(self) -> None:
        self.orbax_done.set()
        self.jobs.put(None)
        self.thread.join()

    # --- the worker ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                self._safely(self.lock.beat)
                continue
            try:
                if job is None:
                    return
                if job == "prune":
                    self._safely(self._prune)
                else:
                    self._safely(functools.partial(self._upload_checkpoint, job))
            finally:
                self.jobs.task_done()

    def _safely(self, action) -> None:
        """Run `action`, keeping its first failure for flush() to report: the worker must
        outlive any error, or flush() would wait for it forever."""
        try:
            action()
        except SaejaxError as e:
            self.error = self.error or e
        except ValueError as e:  # TensorStore's errors
            self.error = self.error or failure(self.url, e)
        except Exception as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.error = self.error or SaejaxError(
                f"run directory {self.url}: upload failed ({text})"
            )

    def _committed(self, step: int) -> str | None:
        """The local folder of `step` once orbax has committed it; None when its save
        never completed (orbax finished without it, or it was deleted meanwhile)."""
        folder = os.path.join(self.local, "checkpoints", str(step))
        while not os.path.isdir(folder):
            if self.orbax_done.is_set():
                return folder if os.path.isdir(folder) else None
            time.sleep(0.05)
        return folder

    def _upload_checkpoint(self, step: int) -> None:
        folder = self._committed(step)
        if folder is None:
            return
        try:
            files = _local_files(folder)
            self._put({f"checkpoints/{step}/{rel}": os.path.join(folder, rel) for rel in files})
        except FileNotFoundError:  # orbax dropped it for a newer one (keep_checkpoints)
            return
        self._put_run_files()
        self._write(_manifest_key(step), io.json_text({"step": step, "files": files}).encode())
        self.lock.beat()
        self._prune()

    def _prune(self) -> None:
        """Drop the bucket's checkpoints that the local copy no longer keeps."""
        kept = {int(n) for n in os.listdir(os.path.join(self.local, "checkpoints")) if n.isdigit()}
        for key in list_keys(self.kv, self.url, "checkpoints/"):
            head = key.removeprefix("checkpoints/").split("/")[0].split(".")[0]
            if head.isdigit() and int(head) not in kept and key.endswith(".manifest.json"):
                self._delete([key])
        for key in list_keys(self.kv, self.url, "checkpoints/"):
            head = key.removeprefix("checkpoints/").split("/")[0].split(".")[0]
            if head.isdigit() and int(head) not in kept:
                self._delete([key])

    def _put_run_files(self) -> None:
        for name in RUN_FILES:
            path = os.path.join(self.local, name)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if name == "metrics.jsonl":  # the logger may be mid-line: complete records only
                data = data[: data.rfind(b"\n") + 1]
            self._write(name, data)

    def _put(self, uploads: dict[str, str]) -> None:
        """Write every {key: local path} at once (TensorStore runs them concurrently)."""
        futures = []
        for key, path in uploads.items():
            with open(path, "rb") as f:
                futures.append(self.kv.write(key, f.read()))
        for future in futures:
            future.result()

    def _write(self, key: str, data: bytes) -> None:
        self.kv.write(key, data).result()

    def _delete(self, keys: list[str]) -> None:
        for future in [self.kv.write(key, None) for key in keys]:
            future.result()


def download_run(kv, url: str, local: str) -> int | None:
    """Rebuild the staging folder from the bucket for a resume: the run's files and the
    newest complete checkpoint (unfinished uploads are deleted). Returns its step."""
    for name in RUN_FILES:
        data = read_key(kv, url, name)
        if data is not None:
            io.write_bytes(os.path.join(local, name), data)
    complete = complete_checkpoints(kv, url)
    for key in list_keys(kv, url, "checkpoints/"):  # uploads a kill cut short
        head = key.removeprefix("checkpoints/").split("/")[0].split(".")[0]
        if head.isdigit() and int(head) not in complete:
            kv.write(key, None).result()
    if not complete:
        return None
    step = max(complete)
    folder = os.path.join(local, "checkpoints", str(step))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(folder))
    for rel in complete[step]["files"]:
        data = read_key(kv, url, f"checkpoints/{step}/{rel}")
        if data is None:
            raise SaejaxError(f"run directory {url}: checkpoint {step} lost its file {rel}")
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        io.write_bytes(os.path.join(tmp, rel), data)
    os.replace(tmp, folder)
    return step


def fetch_sae(url: str, dest: str) -> str:
    """The final SAE of the run at `url` (its sae/ folder, as its manifest lists it) written
    to the new local folder `dest`, for loading or exporting. Returns `dest`."""
    kv = open_kv(url)
    manifest = _parse(read_key(kv, url, SAE_MANIFEST) or b"")
    if not manifest.get("files"):
        raise SaejaxError(f"run directory {url} has no finished SAE (no {SAE_MANIFEST})")
    with io.atomic_dir(dest, kind="sae") as tmp:
        for rel in manifest["files"]:
            if rel == io.MARKER:
                continue
            data = read_key(kv, url, f"sae/{rel}")
            if data is None:
                raise SaejaxError(f"run directory {url}: sae/{rel} is missing")
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            io.write_bytes(os.path.join(tmp, rel), data)
    return dest


def train_remote(cfg, resume: bool, run):
    """`run(local_cfg, mirror)` (train's body) on a staging copy of the run directory
    `cfg.run_dir`, mirrored into its bucket; the result names the URL again."""
    import dataclasses

    url = cfg.run_dir.rstrip("/")
    probe(url)
    kv = open_kv(url)
    lock = RemoteLock(kv, url).acquire()
    try:
        has_run = read_key(kv, url, "config.yaml") is not None
        if resume and not has_run:
            raise SaejaxError(f"{url} is not a saejax run (no config.yaml)")
        if not resume and (has_run or complete_checkpoints(kv, url)):
            raise SaejaxError(
                f"run directory {url} already holds a run; resume it with "
                f"`saejax train --resume {url}` or choose another run_dir"
            )
        local = fresh_staging(url)
        if resume:
            try:
                download_run(kv, url, local)
            except ValueError as e:
                raise failure(url, e) from None
        mirror = Mirror(kv, url, local, lock)
        try:
            result = run(dataclasses.replace(cfg, run_dir=local), mirror)
            mirror.upload_run()
        finally:
            mirror.close()
        result.run_dir = url
        return result
    finally:
        lock.release()
