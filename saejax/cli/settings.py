"""`saejax config`: every setting of a run, with its type, default, choices and meaning."""

from __future__ import annotations

from saejax.cli.command import Command


def _config_arguments(p) -> None:
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print a Markdown table (the README's configuration section) instead of YAML",
    )


def _config(args) -> int:
    from saejax.config import reference_markdown, reference_yaml

    print(reference_markdown() if args.markdown else reference_yaml(), end="")
    return 0


COMMANDS = (
    Command(
        "config",
        "print every config key with its type, default and meaning, as YAML to save and edit",
        _config_arguments,
        _config,
    ),
)
