"""The `saejax` command line: argparse only.

Every subcommand is a `Command` (cli/command.py) declared in one of the modules below and
listed once in `REGISTRY`. Errors the user can fix are one line on stderr with exit status
2; Ctrl-C exits 130 and says how to resume. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from saejax.cli import analyze, data, interp, settings, training
from saejax.cli.command import Command
from saejax.errors import SaejaxError

_BY_NAME = {
    c.name: c
    for c in (
        *data.COMMANDS,
        *training.COMMANDS,
        *interp.COMMANDS,
        *analyze.COMMANDS,
        *settings.COMMANDS,
    )
}
REGISTRY: tuple[Command, ...] = tuple(
    _BY_NAME[name]
    for name in (
        "extract",
        "store",
        "demo",
        "analyze",
        "train",
        "config",
        "export",
        "bench",
        "eval",
        "steer",
        "features",
        "search",
        "dashboard",
        "sweep",
    )
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in `--help`, except the defaults that say nothing
    (None, False, an empty list)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other error, and
    shows defaults in `--help`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise SaejaxError(f"{message} (see `{self.prog} --help`)")


def _add(sub, command: Command) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.help)
    command.arguments(parser)
    if command.subcommands:
        nested = parser.add_subparsers(
            dest=f"{command.name}_command", required=True, parser_class=Parser
        )
        for child in command.subcommands:
            _add(nested, child)
    else:
        parser.set_defaults(func=command.run)


def build_parser() -> argparse.ArgumentParser:
    from saejax import __version__

    parser = Parser(prog="saejax", description="High-throughput sparse autoencoders in JAX.")
    parser.add_argument("--version", action="version", version=f"saejax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in REGISTRY:
        _add(sub, command)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SaejaxError as e:
        print(f"saejax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsaejax: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (OSError, SafetensorError) as e:
        # the disk, not the user's input: full, read-only, permissions, a safetensors write
        if os.environ.get("SAEJAX_DEBUG"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        hint = (
            "; free some space and run again" if getattr(e, "errno", None) == errno.ENOSPC else ""
        )
        message = getattr(e, "strerror", None) or e
        print(f"saejax: error: {_one_line(message)}{where}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
