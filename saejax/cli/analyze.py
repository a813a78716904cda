"""`saejax analyze weights | dpo-change | decorrelation` (interp/analyze.py does the work)."""

from __future__ import annotations

from saejax.cli.command import Command
from saejax.cli.data import model_device_arguments
from saejax.errors import SaejaxError


def _common(p) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code"
    )
    model_device_arguments(
        p,
        "float32 for weights and dpo-change (nothing runs; rounding would blur DPO's changes), "
        "bfloat16 on a GPU and float32 on the CPU for decorrelation",
    )
    p.add_argument("--dtype", dest="model_dtype", help="the same as --model-dtype (older name)")
    p.add_argument("--no-plot", action="store_true", help="write the numbers only, no figure")


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def _options(args):
    from saejax.interp.analyze import ModelOptions

    if args.model_dtype is not None and args.model_dtype not in MODEL_DTYPES:
        raise SaejaxError(
            f"--model-dtype (--dtype) must be one of {', '.join(MODEL_DTYPES)}, "
            f"got {args.model_dtype!r}"
        )
    return ModelOptions(
        args.revision, args.trust_remote_code, args.model_dtype, not args.no_plot, args.device
    )


def _weights_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model names, directories or .gguf files")
    _common(p)


def _weights(args) -> int:
    from saejax.interp.analyze import analyze_weights

    analyze_weights(args.models, args.out, _options(args))
    return 0


def _dpo_arguments(p) -> None:
    p.add_argument("base", help="the base model")
    p.add_argument("tuned", help="the fine-tuned model")
    p.add_argument("--top", type=int, default=100, help="neurons per layer")
    _common(p)


def _dpo(args) -> int:
    from saejax.interp.analyze import analyze_dpo_change

    analyze_dpo_change(args.base, args.tuned, args.out, args.top, _options(args))
    return 0


def _decorrelation_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model names, directories or .gguf files")
    p.add_argument(
        "--prompts",
        required=True,
        help="text file, one prompt per line, or 'builtin' (sentences of the built-in corpus)",
    )
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many")
    _common(p)


def _decorrelation(args) -> int:
    from saejax.interp.analyze import analyze_decorrelation

    if args.max_prompts is not None and args.max_prompts < 2:
        raise SaejaxError(f"--max-prompts must be at least 2, got {args.max_prompts}")

    analyze_decorrelation(args.models, args.prompts, args.out, args.max_prompts, _options(args))
    return 0


COMMANDS = (
    Command(
        "analyze",
        "MLP weight statistics, DPO change, decorrelation",
        subcommands=(
            Command(
                "weights",
                "normalised median of ‖w_in‖·b_in per layer",
                _weights_arguments,
                _weights,
            ),
            Command(
                "dpo-change",
                "weight statistic on the neurons DPO changed most",
                _dpo_arguments,
                _dpo,
            ),
            Command(
                "decorrelation",
                "1 − mean pairwise cosine of MLP pre-activations",
                _decorrelation_arguments,
                _decorrelation,
            ),
        ),
    ),
)
