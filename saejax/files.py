"""Result files written whole or not at all: a temporary name, then an atomic rename."""

from __future__ import annotations

import json
import os


def write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json_atomic(path: str, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))
