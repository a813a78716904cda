"""The one way to declare a subcommand: a `Command` with its arguments and its handler.

Handlers turn the parsed arguments into plain values and call library functions; nothing
outside `saejax.cli` ever sees an argparse Namespace. Handlers import what they need when
they run, so `saejax --help` and `saejax store info` start without JAX or torch.
"""

from __future__ import annotations

import argparse
import decimal
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: tuple[Command, ...] = ()


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def whole_number(text: str) -> int:
    """`250000`, `250_000` or `2.5e5` (as in the config's whole-number settings)."""
    try:
        number = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        number = None
    if number is None or not number.is_finite() or number != number.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'")
    if number.adjusted() > 18:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}' (too large)")
    return int(number)
