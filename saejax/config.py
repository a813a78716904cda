"""Run configuration: typed dataclasses, loaded from YAML, overridden with `--set a.b=v`.

Every setting is declared once, with its type, default and a one-line doc; `saejax config`
prints them all (`reference_yaml`, `reference_markdown`), so the reference cannot drift from
the code. Unknown keys, ill-typed values and out-of-range numbers are errors (one line each),
never silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import math
import numbers
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from saejax.core.architectures import (
    ARCHITECTURES,
    TOPK_KERNELS,
    TRANSCODER_ARCHITECTURES,
    selects_top_k,
    supports_transcoder,
)
from saejax.errors import SaejaxError
from saejax.io import is_url

Architecture = Literal[ARCHITECTURES]  # the one list, kept in core/architectures.py
BDecInit = Literal["geometric_median", "mean", "zeros"]
Dtype = Literal["float32", "bfloat16"]
TopkKernel = Literal[TOPK_KERNELS]
LrSchedule = Literal["constant", "cosine", "linear", "wsd"]
Distributed = Literal["off", "auto"]
AuxNormalization = Literal["input", "residual"]


def setting(default=dataclasses.MISSING, doc: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field with its one-line doc, read back by the reference (`saejax config`)."""
    return field(default=default, default_factory=default_factory, metadata={"doc": doc})


def section(cls, doc: str):
    """A nested section of the config (a dataclass field built fresh for each instance)."""
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class DataConfig:
    """Where the activations come from and how batches are drawn from them."""

    path: str = setting("", "an activation store directory, or a .npy file [n, d_in]")
    hook: str | None = setting(None, "which hook of a multi-hook store (null: its only hook)")
    target_hook: str | None = setting(
        None,
        "a transcoder's target: another hook of the same store that the SAE reconstructs from "
        "`hook` (null: an ordinary SAE)",
    )
    seed: int = setting(0, "shuffling seed: the same seed gives the same batches")
    validation_tokens: int = setting(
        8192,
        "rows held out from the end of the data for the final evaluation, never trained on "
        "(at most a fifth of the rows: fewer are held out from a small data set)",
    )
    block_rows: int = setting(8192, "rows per contiguous read; part of the data order")
    shuffle_blocks: int = setting(
        16, "blocks mixed together in the shuffle buffer; part of the data order"
    )
    shuffle_bytes: int = setting(
        0,
        "the shuffle buffer in bytes instead: shuffle_blocks = shuffle_bytes // (block_rows x "
        "the row's bytes), at least 1; the loader holds two such buffers (0: use "
        "shuffle_blocks); part of the data order",
    )
    prefetch: int = setting(4, "batches prepared ahead of the step")
    prefetch_bytes: int = setting(
        0, "batches prepared ahead in bytes instead (at least one batch; 0: use prefetch)"
    )
    loader_threads: int = setting(0, "threads gathering batch rows; 0: half the cores, at most 8")
    slices: int = setting(
        0,
        "contiguous, disjoint slices of the training rows; every batch takes batch_size/slices "
        "rows from each and a process reads only its own (0: one per process); part of the "
        "data order",
    )


@dataclass
class ResampleConfig:
    """Anthropic's dead-latent resampling (Towards Monosemanticity)."""

    enabled: bool | None = setting(
        None,
        "resample dead latents (null: on for relu, gated and jumprelu, off for the "
        "TopK family, which uses AuxK)",
    )
    at_fractions: list[float] = setting(
        doc="resample at these fractions of the run's steps, each in (0, 1), so the schedule "
        "scales with the run's length (benchmarks/recovery.py) ...",
        default_factory=lambda: [0.25, 0.5, 0.75],
    )
    every_steps: int = setting(
        0, "... or at the multiples of this many steps (0: at_fractions; older configs set it)"
    )
    steps: list[int] = setting(
        doc="... or exactly at these steps (overrides at_fractions and every_steps)",
        default_factory=list,
    )
    stop_after_fraction: float = setting(
        0.8, "no resampling after this fraction of training, in (0, 1]"
    )
    pool_batches: int = setting(4, "recent batches whose inputs are candidates for revival")
    encoder_scale: float = setting(0.2, "revived encoder norm = this x the mean live encoder norm")


@dataclass
class SAEConfig:
    """The sparse autoencoder: architecture, size, sparsity penalty, numerics."""

    architecture: Architecture = setting("topk", "the SAE's activation and sparsity rule")
    d_in: int = setting(0, "input width; 0: taken from the data")
    d_sae: int = setting(4096, "number of latents (dictionary size)")
    k: int = setting(32, "topk, batchtopk: latents kept per row (on average for batchtopk)")
    l1_coefficient: float = setting(
        3.0,
        "relu, gated (on the gate): weight of the decoder-norm-weighted L1 penalty "
        "(benchmarks/recovery.py; gated: tests/train/test_gated.py's toy)",
    )
    l1_warmup_steps: int = setting(
        0, "relu, gated: steps of linear warm-up of the L1 weight; 0: the first 5% of the steps"
    )
    l0_coefficient: float = setting(
        1.0, "jumprelu: weight of the L0 penalty (benchmarks/recovery.py)"
    )
    l0_warmup_steps: int = setting(
        0, "jumprelu: steps of linear warm-up of the L0 weight; 0: the first 5% of the steps"
    )
    jumprelu_bandwidth: float = setting(
        2.0,
        "jumprelu: width of the straight-through rectangle, in training units (inputs scaled "
        "to mean norm sqrt(d_in))",
    )
    jumprelu_init_threshold: float = setting(
        0.5, "jumprelu: initial threshold of every latent, in training units"
    )
    matryoshka_widths: list[int] = setting(
        doc="matryoshka_batchtopk: nested prefix widths, increasing, each with its own "
        "reconstruction loss (d_sae is added last when missing); empty: d_sae/16, d_sae/4, d_sae "
        "(untuned)",
        default_factory=list,
    )
    aux_k: int = setting(0, "topk, batchtopk: dead latents used by the AuxK loss; 0: d_in // 2")
    aux_coefficient: float = setting(1 / 32, "topk, batchtopk: weight of the AuxK loss")
    aux_normalization: AuxNormalization = setting(
        "input",
        "topk, batchtopk: AuxK's squared error divided by the batch's total variance of the "
        "input, or of the residual it fits (residual: OpenAI's sparse_autoencoder)",
    )
    dead_tokens: int = setting(
        1_000_000, "a latent that has not fired for this many tokens counts as dead"
    )
    normalize_decoder: bool = setting(
        True, "unit-norm decoder rows, with the parallel gradient removed"
    )
    b_dec_init: BDecInit = setting("geometric_median", "initial decoder bias, from a sample")
    apply_b_dec_to_input: bool = setting(
        True,
        "the encoder sees x - b_dec; false: x itself (Gemma Scope's JumpReLU; SAELens's field "
        "of the same name, carried by the export)",
    )
    scale_inputs: bool = setting(
        True, "scale inputs to mean norm sqrt(d_in); folded back into the saved SAE"
    )
    dtype: Dtype = setting("float32", "compute dtype of the matmuls; master weights stay float32")
    skip_connection: bool = setting(
        False, "transcoders: add a linear skip x·W_skipᵀ (W_skip [d_out, d_in], starts at zero)"
    )
    topk_kernel: TopkKernel = setting(
        "sparse",
        "topk: sparse (gather/scatter on the k selected; C++ on the CPU, XLA's primitives "
        "elsewhere), pallas (Pallas kernels; interpret mode on the CPU), auto (the measured "
        "fastest: as sparse until Pallas is measured on an accelerator), or dense matmuls",
    )


@dataclass
class TrainConfig:
    """How long and how fast to train, and how often to log and checkpoint."""

    tokens: int = setting(2_000_000, "training rows to consume (steps = tokens // batch_size)")
    batch_size: int = setting(4096, "rows per step, over all devices")
    lr: float = setting(
        0.0,
        "peak Adam learning rate; 0: automatic, 5e-4 · (d_sae / 2^14)^-0.5 "
        "(falls as 1/√d_sae, Gao et al. 2024; base from benchmarks/recovery.py)",
    )
    lr_warmup_steps: int = setting(100, "steps of linear learning-rate warm-up")
    lr_schedule: LrSchedule = setting(
        "wsd",
        "after warm-up: wsd (constant, then linear decay to 0 over the last lr_decay_fraction), "
        "constant, or cosine / linear decay to 0 over the whole run",
    )
    lr_decay_fraction: float = setting(
        0.2, "wsd: the final share of the steps over which the lr decays to 0 (Anthropic, 2024)"
    )
    adam_b1: float = setting(0.9, "Adam beta1, in [0, 1)")
    adam_b2: float = setting(0.999, "Adam beta2, in [0, 1)")
    grad_clip: float = setting(1.0, "global gradient-norm clipping; 0 turns it off")
    seed: int = setting(0, "parameter initialisation seed")
    log_every: int = setting(50, "steps between metric fetches (metrics.jsonl, loggers)")
    checkpoint_every: int = setting(500, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk (the newest ones)")
    resample: ResampleConfig = section(ResampleConfig, "dead-latent resampling")


@dataclass
class MeshConfig:
    """How the devices are used: data and model parallelism, multi-process launch."""

    data: int = setting(1, "devices the batch is split over")
    model: int = setting(1, "devices the latents are split over")
    distributed: Distributed = setting(
        "off", "auto: jax.distributed.initialize() finds the cluster"
    )
    step_timeout_factor: float = setting(
        20.0,
        "multi-process: a step that takes this many times the recent median step ends every "
        "process with one line and exit 75 (restart with --resume)",
    )
    step_timeout_min_seconds: float = setting(
        300.0, "multi-process: the step watchdog never fires before this many seconds"
    )


@dataclass
class LogConfig:
    """Where the metrics go besides RUN/metrics.jsonl."""

    wandb: bool = setting(
        False, "log to Weights & Biases (pip install 'saejax[wandb]'; wandb login first)"
    )
    wandb_project: str = setting("saejax", "the wandb project")
    tensorboard: bool = setting(
        False, "write TensorBoard events to RUN/tensorboard (pip install 'saejax[tensorboard]')"
    )
    progress: bool = setting(True, "show the progress bar")


@dataclass
class RunConfig:
    """A training run."""

    data: DataConfig = section(DataConfig, "the data")
    sae: SAEConfig = section(SAEConfig, "the SAE")
    train: TrainConfig = section(TrainConfig, "the optimisation")
    mesh: MeshConfig = section(MeshConfig, "the devices")
    log: LogConfig = section(LogConfig, "the metric loggers")
    run_dir: str = setting("runs/latest", "the run directory (config, metrics, checkpoints, SAE)")


# ---- reading values: one line for every value that does not fit its setting -----------


def type_name(annotation) -> str:
    """`int`, `list of int`, `bool or null`: how a setting's type reads in messages and docs."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "str"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def choices_of(annotation) -> tuple:
    """The allowed values of an enum-like (Literal) setting; () for the others."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return ()


def _exact(value) -> decimal.Decimal | None:
    """A number given as int, float or text (`1e6`, `1_000_000`), exactly; None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return decimal.Decimal(int(value))
    if isinstance(value, numbers.Real):  # float, NumPy scalars from programs (`with_values`)
        return decimal.Decimal(repr(float(value)))
    if isinstance(value, str):
        try:
            return decimal.Decimal(value.strip())
        except decimal.InvalidOperation:
            pass
        try:
            number = yaml.safe_load(value)  # YAML's own spellings: .inf, -.inf, .nan
        except yaml.YAMLError:
            return None
        return _exact(number) if isinstance(number, float) else None
    return None


def _shown(number: decimal.Decimal) -> str:
    return format(number.normalize(), "f") if number.is_finite() else str(number).lower()


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value, annotation, key: str):
    """`value` as the setting's type, or a SaejaxError naming the key, the type and the value."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # our unions are `X | None`
        return _coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in choices:
            raise SaejaxError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SaejaxError(f"{key} expects {type_name(annotation)}, got {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, str) and isinstance(_yaml_value(value), bool):
            value = _yaml_value(value)  # --set log.wandb=true arrives as text
        if not isinstance(value, bool):
            raise SaejaxError(f"{key} expects true or false, got {value!r}")
        return value
    if annotation in (int, float):
        number = _exact(value)
        if number is None:
            raise SaejaxError(f"{key} expects {annotation.__name__}, got {value!r}")
        if not number.is_finite():
            raise SaejaxError(f"{key} must be a finite number, got {_shown(number)}")
        if annotation is float:
            return float(number)
        if number.adjusted() > 18:  # 1e999999 would take forever to write out as an int
            raise SaejaxError(f"{key} is too large, got {value}")
        if number != number.to_integral_value():
            raise SaejaxError(f"{key} must be a whole number, got {_shown(number)}")
        return int(number)
    if annotation is str:
        if not isinstance(value, str):
            raise SaejaxError(f"{key} expects str, got {value!r}")
        return value
    return value


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise SaejaxError(
                f"unknown config key '{dotted}' (known here: {', '.join(sorted(names))}; "
                "`saejax config` lists every key)"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SaejaxError(f"config key '{dotted}' is a section; give it a mapping")
            _apply(current, value, dotted + ".")
            continue
        setattr(obj, key, _coerce(value, hints[key], dotted))


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': '3e-4'}}: a YAML value, except that numbers and
    booleans keep their text, so the setting's own type decides (`run_dir=2024` stays a
    string, `mesh.distributed=off` a choice, `1e6` a whole number for an int setting)."""
    if "=" not in text:
        raise SaejaxError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (bool, int, float)):
        value = raw.strip()
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


# ---- the reference of every setting, generated from the dataclasses above --------------


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, e.g. "train.lr"
    type: str  # e.g. "int", "list of int", "bool or null"
    default: object
    choices: tuple
    doc: str


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def settings(cls=RunConfig, prefix: str = "") -> list[Setting]:
    """Every leaf setting of `cls`, in declaration order, with its type, default and doc."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += settings(hint, f"{prefix}{f.name}.")
        else:
            key = f"{prefix}{f.name}"
            out.append(
                Setting(key, type_name(hint), _default(f), choices_of(hint), f.metadata["doc"])
            )
    return out


def yaml_scalar(value) -> str:
    """`value` as YAML flow text that reads back as the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:  # YAML 1.1 reads 1e-06 as a string
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    text = str(value)
    plain = (
        text and yaml.safe_load(text) == text and not any(c in text for c in ":#{}[],&*!|>'\"%@`")
    )
    return text if plain else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(s: Setting) -> str:
    kind = f"one of {', '.join(s.choices)}" if s.choices else s.type
    return f"{s.doc} ({kind})"


def reference_yaml() -> str:
    """Every setting as commented YAML: a config a user can save, trim and edit."""
    lines = [
        "# Every setting of a saejax run: its meaning, type and default (`saejax config`).",
        "# Save it, keep the keys you change, and run `saejax train CONFIG`; `--set key=value`",
        "# overrides any key. Whole numbers may be written 1e6 or 1_000_000.",
    ]
    _yaml_section(RunConfig, "", 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_section(cls, prefix: str, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    hints = typing.get_type_hints(cls)
    by_key = {s.key: s for s in settings(cls, prefix)}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines += ["", f"{pad}# {hint.__doc__.strip()}", f"{pad}{f.name}:"]
            _yaml_section(hint, f"{prefix}{f.name}.", indent + 2, lines)
        else:
            s = by_key[f"{prefix}{f.name}"]
            lines += [f"{pad}# {_comment(s)}", f"{pad}{f.name}: {yaml_scalar(s.default)}"]


def reference_markdown() -> str:
    """Every setting as a Markdown table (the README's configuration section)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in settings():
        kind = ", ".join(f"`{c}`" for c in s.choices) if s.choices else s.type
        doc = s.doc.replace("|", "\\|")
        rows.append(f"| `{s.key}` | {kind} | `{yaml_scalar(s.default)}` | {doc} |")
    return "\n".join(rows) + "\n"


# ---- checks on the values together ----------------------------------------------------


def _get(cfg: RunConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


AT_LEAST_ONE = (
    "data.validation_tokens",
    "data.block_rows",
    "data.shuffle_blocks",
    "data.prefetch",
    "sae.d_sae",
    "sae.dead_tokens",
    "train.tokens",
    "train.batch_size",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.resample.pool_batches",
    "mesh.data",
    "mesh.model",
)
AT_LEAST_ZERO = (
    "data.shuffle_bytes",
    "data.prefetch_bytes",
    "data.loader_threads",
    "data.slices",
    "sae.d_in",
    "sae.l1_warmup_steps",
    "sae.l0_warmup_steps",
    "sae.aux_k",
    "sae.l1_coefficient",
    "sae.l0_coefficient",
    "sae.aux_coefficient",
    "sae.jumprelu_init_threshold",
    "train.lr_warmup_steps",
    "train.resample.every_steps",
    "train.grad_clip",
)
POSITIVE = (
    "sae.jumprelu_bandwidth",
    "train.resample.encoder_scale",
    "mesh.step_timeout_factor",
    "mesh.step_timeout_min_seconds",
)


def _check_numbers(cfg: RunConfig) -> None:
    for s in settings():
        value = _get(cfg, s.key)
        if s.type == "float" and not math.isfinite(value):
            raise SaejaxError(f"{s.key} must be a finite number, got {value}")
    for key in AT_LEAST_ONE:
        if _get(cfg, key) < 1:
            raise SaejaxError(f"{key} must be at least 1, got {_get(cfg, key)}")
    for key in AT_LEAST_ZERO:
        if _get(cfg, key) < 0:
            raise SaejaxError(f"{key} must be 0 or more, got {_get(cfg, key)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise SaejaxError(f"{key} must be positive, got {_get(cfg, key)}")
    for key in ("train.adam_b1", "train.adam_b2"):
        if not 0 <= _get(cfg, key) < 1:
            raise SaejaxError(f"{key} must be in [0, 1), got {_get(cfg, key)}")
    if cfg.train.lr < 0:
        raise SaejaxError(
            f"train.lr must be positive (or 0 for the automatic lr), got {cfg.train.lr}"
        )
    if not 0 <= cfg.train.lr_decay_fraction <= 1:
        raise SaejaxError(
            f"train.lr_decay_fraction must be in [0, 1], got {cfg.train.lr_decay_fraction}"
        )
    fraction = cfg.train.resample.stop_after_fraction
    if not 0 < fraction <= 1:
        raise SaejaxError(f"train.resample.stop_after_fraction must be in (0, 1], got {fraction}")
    if not all(0 < f < 1 for f in cfg.train.resample.at_fractions):
        raise SaejaxError(
            "train.resample.at_fractions must all be in (0, 1), got "
            f"{cfg.train.resample.at_fractions}"
        )
    if any(step < 1 for step in cfg.train.resample.steps):
        raise SaejaxError(
            f"train.resample.steps must all be at least 1, got {cfg.train.resample.steps}"
        )


def _check_choices(cfg: RunConfig) -> None:
    """Enum-like settings, for configs built in code (loaded ones are checked on reading)."""
    for s in settings():
        value = _get(cfg, s.key)
        if s.choices and value not in s.choices:
            raise SaejaxError(f"{s.key} must be one of {', '.join(s.choices)}, got {value!r}")


def _check_matryoshka_widths(s: SAEConfig) -> None:
    widths = s.matryoshka_widths
    if any(not 1 <= w <= s.d_sae for w in widths):
        raise SaejaxError(f"sae.matryoshka_widths must lie in 1..d_sae ({s.d_sae}), got {widths}")
    if any(a >= b for a, b in zip(widths, widths[1:])):
        raise SaejaxError(f"sae.matryoshka_widths must be strictly increasing, got {widths}")


def _check_transcoder(cfg: RunConfig) -> None:
    """A target hook needs a store, a hook other than the input's and a supported activation;
    a skip connection needs a target. (That the hook exists is checked when the store opens.)"""
    d, s = cfg.data, cfg.sae
    if not d.target_hook:
        d.target_hook = None  # "" from the command line means none
        if s.skip_connection:
            raise SaejaxError("sae.skip_connection needs data.target_hook (a transcoder)")
        return
    if d.path.endswith(".npy"):
        raise SaejaxError(
            f"data.target_hook needs an activation store with both hooks; {d.path} is a plain array"
        )
    if d.target_hook == d.hook:
        raise SaejaxError(f"data.target_hook must differ from data.hook (both {d.hook!r})")
    if not supports_transcoder(s.architecture):
        raise SaejaxError(
            f"transcoders (data.target_hook) support sae.architecture "
            f"{', '.join(TRANSCODER_ARCHITECTURES)}, not {s.architecture}"
        )


def validate(cfg: RunConfig) -> RunConfig:
    s, t = cfg.sae, cfg.train
    _check_choices(cfg)
    _check_numbers(cfg)
    if selects_top_k(s.architecture) and not 0 < s.k <= s.d_sae:
        raise SaejaxError(f"sae.k must be in 1..d_sae ({s.d_sae}), got {s.k}")
    _check_matryoshka_widths(s)
    _check_transcoder(cfg)
    if cfg.data.slices and t.batch_size % cfg.data.slices:
        raise SaejaxError(
            f"data.slices {cfg.data.slices} must divide train.batch_size {t.batch_size}"
        )
    if t.batch_size % (cfg.mesh.data * cfg.mesh.model):
        raise SaejaxError(
            f"train.batch_size {t.batch_size} is not divisible by the "
            f"{cfg.mesh.data * cfg.mesh.model} devices of the mesh (input rows are "
            "split over all of them)"
        )
    if s.d_sae % cfg.mesh.model:
        raise SaejaxError(f"sae.d_sae {s.d_sae} is not divisible by mesh.model {cfg.mesh.model}")
    if not cfg.data.path:
        raise SaejaxError("data.path is not set (a store directory or a .npy file)")
    if is_url(cfg.run_dir) and not cfg.run_dir.startswith(("gs://", "s3://")):
        raise SaejaxError(
            f"run_dir {cfg.run_dir} is a URL saejax cannot write; a run directory is a local "
            "folder, a gs://bucket/prefix or an s3://bucket/prefix"
        )
    return cfg


NPY_MAGIC = b"\x93NUMPY"


def is_data_path(path: str) -> bool:
    """A directory (an activation store) or a .npy file: data, never a YAML config."""
    if os.path.isdir(path) or path.endswith(".npy"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return False


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SaejaxError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise SaejaxError(
            f"config {path} is not a text file; a YAML config is expected (data goes in "
            f"`--set data.path={path}`)"
        ) from None
    except yaml.YAMLError as e:
        raise SaejaxError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SaejaxError(f"config {path} must be a mapping at the top level")
    return values


# launch settings that older config.yaml files recorded as run settings; they now come from
# the launch every time (`saejax train --coordinator/--num-processes/--process-id`)
LAUNCH_KEYS = ("coordinator", "num_processes", "process_id")


def _without_launch_keys(values: dict, path: str) -> dict:
    """`values` without mesh.coordinator/num_processes/process_id (noted once): a run written
    before they became launch settings resumes on any launch."""
    mesh = values.get("mesh")
    if not isinstance(mesh, dict) or not any(k in mesh for k in LAUNCH_KEYS):
        return values
    dropped = [f"mesh.{k}" for k in LAUNCH_KEYS if k in mesh]
    values = {**values, "mesh": {k: v for k, v in mesh.items() if k not in LAUNCH_KEYS}}
    print(
        f"saejax: note: ignoring {', '.join(dropped)} in {path}: launch settings come from "
        "the launch (--coordinator/--num-processes/--process-id or SAEJAX_* variables)",
        file=sys.stderr,
    )
    return values


def load_config(path: str | None, overrides: list[str] = (), check: bool = True) -> RunConfig:
    """Defaults, then the YAML file at `path`, then each `--set key=value`.

    A data path given where the config belongs (`saejax train acts.npy`) is read as
    `data.path` with the default settings; a run directory is pointed at `--resume`.
    """
    cfg = RunConfig()
    if path and os.path.exists(os.path.join(path, "config.yaml")):
        raise SaejaxError(
            f"{path} is a run directory; continue it with `saejax train --resume {path}`"
        )
    if path and is_data_path(path):
        cfg.data.path = path
    elif path:
        _apply(cfg, _without_launch_keys(_read_yaml(path), path))
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in tuple(f"mesh.{k}" for k in LAUNCH_KEYS):
            flag = "--" + key.split(".")[1].replace("_", "-")
            raise SaejaxError(
                f"{key} is a launch setting, not a run setting: give {flag} to `saejax train` "
                f"(or SAEJAX_{key.split('.')[1].upper()})"
            )
        _apply(cfg, parse_override(text))
    return validate(cfg) if check else cfg


def with_values(cfg: RunConfig, values: dict, check: bool = True) -> RunConfig:
    """A copy of `cfg` with dotted keys set to typed values, e.g. {"sae.d_sae": 8192}
    (for programs that build configs; the command line's `--set` parses text instead)."""
    new = copy.deepcopy(cfg)
    for key, value in values.items():
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(new, nested)
    return validate(new) if check else new


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
