"""Run configuration: typed dataclasses, loaded from YAML, overridden with `--set a.b=v`.

Unknown keys and ill-typed values are errors (one line each), never silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml

from saejax.errors import SaejaxError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class DataConfig:
    path: str = ""  # an activation store, or a .npy file [n, d_in]
    hook: str | None = None  # which hook of a multi-hook store
    seed: int = 0  # shuffling seed: the same seed gives the same batches
    validation_tokens: int = 8192  # held out from the end of the data, never trained on
    block_rows: int = 8192  # rows per contiguous read
    shuffle_blocks: int = 16  # blocks mixed together in the shuffle buffer
    prefetch: int = 4  # batches prepared ahead of the step
    loader_threads: int = 0  # threads gathering batch rows; 0: half the cores, at most 8
    # The training rows are cut into this many contiguous, disjoint slices and every batch
    # takes batch_size/slices rows from each; in a multi-process run each process reads only
    # its own slices. 0 means one slice per process. Part of what defines the data order.
    slices: int = 0


@dataclass
class ResampleConfig:
    """Anthropic's dead-latent resampling (Towards Monosemanticity)."""

    enabled: bool | None = None  # default: on for relu, off for the others (they use AuxK)
    every_steps: int = 2500  # resample at these multiples of steps ...
    steps: list[int] = field(default_factory=list)  # ... or exactly at these steps
    stop_after_fraction: float = 0.8  # no resampling in the last 20% of training
    pool_batches: int = 4  # batches whose inputs are candidates for revival
    encoder_scale: float = 0.2  # revived encoder norm = this x mean live encoder norm


@dataclass
class SAEConfig:
    architecture: str = "topk"
    d_in: int = 0  # 0: taken from the data
    d_sae: int = 4096
    k: int = 32  # topk, batchtopk
    l1_coefficient: float = 5.0  # relu: weight of the decoder-norm-weighted L1 penalty
    l1_warmup_steps: int = 1000  # relu: linear warm-up of the L1 weight
    l0_coefficient: float = 1e-3  # jumprelu: weight of the L0 penalty
    jumprelu_bandwidth: float = 1e-3  # jumprelu: width of the straight-through rectangle
    jumprelu_init_threshold: float = 1e-3
    aux_k: int = 0  # topk/batchtopk AuxK latents; 0 means d_in // 2
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent that has not fired for this many tokens is dead
    normalize_decoder: bool = True  # unit-norm decoder rows, parallel gradient removed
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    scale_inputs: bool = True  # scale inputs to mean norm sqrt(d_in); folded back on export
    dtype: str = "float32"  # compute dtype (float32 | bfloat16); master weights stay float32
    topk_kernel: str = "sparse"  # topk: sparse (gather/scatter on the k selected) | dense


@dataclass
class TrainConfig:
    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float = 4e-4
    lr_warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to 0 at the end)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resample: ResampleConfig = field(default_factory=ResampleConfig)


@dataclass
class MeshConfig:
    data: int = 1  # devices the batch is split over
    model: int = 1  # devices the latents are split over
    distributed: str = "off"  # off | auto (jax.distributed.initialize() finds the cluster)
    coordinator: str = ""  # host:port of process 0, for an explicit multi-process launch
    num_processes: int = 0
    process_id: int = -1


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "saejax"
    tensorboard: bool = False
    progress: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run_dir: str = "runs/latest"


def _type_ok(value, annotation) -> tuple[bool, object]:
    """Check (and mildly coerce) `value` against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            return False, value
        items = [_type_ok(v, inner) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    return True, value


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise SaejaxError(
                f"unknown config key '{dotted}' (known here: {', '.join(sorted(names))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SaejaxError(f"config key '{dotted}' is a section; give it a mapping")
            _apply(current, value, dotted + ".")
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise SaejaxError(f"config key '{dotted}' expects {hints[key]}, got {value!r}")
        setattr(obj, key, coerced)


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}} (values parsed as YAML scalars)."""
    if "=" not in text:
        raise SaejaxError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip() and raw.strip()[0].isdigit():
        try:
            value = float(raw)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def validate(cfg: RunConfig) -> RunConfig:
    s, t = cfg.sae, cfg.train
    if s.architecture not in ARCHITECTURES:
        raise SaejaxError(
            f"unknown sae.architecture '{s.architecture}'; choose {', '.join(ARCHITECTURES)}"
        )
    if s.d_sae <= 0:
        raise SaejaxError(f"sae.d_sae must be positive, got {s.d_sae}")
    if s.topk_kernel not in ("sparse", "dense", "pallas", "auto"):
        raise SaejaxError(
            f"unknown sae.topk_kernel '{s.topk_kernel}'; choose sparse, dense, pallas or auto"
        )
    if s.architecture in ("topk", "batchtopk") and not 0 < s.k <= s.d_sae:
        raise SaejaxError(f"sae.k must be in 1..d_sae ({s.d_sae}), got {s.k}")
    if s.b_dec_init not in ("geometric_median", "mean", "zeros"):
        raise SaejaxError(
            f"sae.b_dec_init must be geometric_median, mean or zeros, got {s.b_dec_init!r}"
        )
    if s.dtype not in ("float32", "bfloat16"):
        raise SaejaxError(f"sae.dtype must be float32 or bfloat16, got {s.dtype!r}")
    if t.lr_schedule not in ("constant", "cosine", "linear"):
        raise SaejaxError(
            f"train.lr_schedule must be constant, cosine or linear, got {t.lr_schedule!r}"
        )
    for name in ("tokens", "batch_size", "log_every", "checkpoint_every"):
        if getattr(t, name) <= 0:
            raise SaejaxError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.lr <= 0:
        raise SaejaxError(f"train.lr must be positive, got {t.lr}")
    if cfg.mesh.data <= 0 or cfg.mesh.model <= 0:
        raise SaejaxError(f"mesh sizes must be positive, got {cfg.mesh}")
    if cfg.mesh.distributed not in ("off", "auto"):
        raise SaejaxError(f"unknown mesh.distributed '{cfg.mesh.distributed}'; choose off or auto")
    if cfg.data.slices < 0 or (cfg.data.slices and cfg.train.batch_size % cfg.data.slices):
        raise SaejaxError(
            f"data.slices {cfg.data.slices} must divide train.batch_size {cfg.train.batch_size}"
        )
    if cfg.train.batch_size % (cfg.mesh.data * cfg.mesh.model):
        raise SaejaxError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by the "
            f"{cfg.mesh.data * cfg.mesh.model} devices of the mesh (input rows are "
            "split over all of them)"
        )
    if cfg.sae.d_sae % cfg.mesh.model:
        raise SaejaxError(
            f"sae.d_sae {cfg.sae.d_sae} is not divisible by mesh.model {cfg.mesh.model}"
        )
    if not cfg.data.path:
        raise SaejaxError("data.path is not set (a store directory or a .npy file)")
    return cfg


def load_config(path: str | None, overrides: list[str] = (), check: bool = True) -> RunConfig:
    cfg = RunConfig()
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise SaejaxError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise SaejaxError(
                f"config {path} is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        if not isinstance(values, dict):
            raise SaejaxError(f"config {path} must be a mapping at the top level")
        _apply(cfg, values)
    for text in overrides:
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
