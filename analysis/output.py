"""Writing results: JSON (NaN → null) and .npy, each file replaced atomically."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.npy"
    np.save(tmp, np.asarray(array))
    os.replace(tmp, path)


def file_label(label: str) -> str:
    """A model label made safe as a file-name prefix."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def unique_labels(names: list[str]) -> list[str]:
    """Short labels for models given as names or paths; repeats get a numeric suffix."""
    labels = []
    for name in names:
        if name == "builtin":
            name = "SmolLM2-135M-Instruct"
        base = os.path.basename(os.path.normpath(name)) if os.sep in name else name
        base = base.removesuffix(".gguf") or name
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels
