"""Labels of the models analysed, as shown in reports and as file-name prefixes.
(The results themselves are written through saejax.io, whole or not at all.)"""

from __future__ import annotations

import os
import re


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
