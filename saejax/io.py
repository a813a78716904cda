"""The one place files are written: whole or not at all.

Every writer puts its bytes in a temporary file beside the target and renames it over the
target once complete (`os.replace` is atomic on one filesystem), so a reader, a crash or a
full disk never leaves a half-written result. `atomic_dir` does the same for a folder that
must appear complete (an exported SAE, a dashboard). JSON is strict: NaN and ±Inf become
null, NumPy values become plain numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np


def _temp_beside(path: str) -> tuple[int, str]:
    parent = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str, fsync: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def jsonable(value):
    """`value` with NumPy types made plain and non-finite floats made None."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def json_text(obj, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(
    path: str, obj, indent: int | None = 2, sort_keys: bool = False, fsync: bool = False
) -> None:
    write_text(path, json_text(obj, indent, sort_keys) + "\n", fsync=fsync)


def write_npy(path: str, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    write_bytes(path, buf.getvalue())


def write_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def save_figure(fig, path: str) -> str:
    """A matplotlib figure, in the format its extension names."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".") or "png")
    write_bytes(path, buf.getvalue())
    return path


@contextlib.contextmanager
def atomic_dir(final: str) -> Iterator[str]:
    """A temporary sibling folder to fill; it replaces `final` only once the block completes,
    and is removed if the block fails."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rmdir(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
