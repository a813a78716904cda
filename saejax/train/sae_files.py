"""Trained SAEs on disk: saejax's own layout, and loading any SAE folder (saejax, SAELens or
sparsify) as a `LoadedSAE` in the model's own units.

saejax layout (run_dir/sae/): `sae_weights.safetensors` with the parameters in
training units, and `sae.json` with the shape, architecture and `input_scale`.

Model units (what `LoadedSAE` and the exports in `train.export` hold): the input scale is
folded into the weights,
and decoder rows are made unit-norm with their norms moved into the encoder (exact
for relu and jumprelu; for the TopK family only when all rows share one norm, which
unit-norm training guarantees, so the top-k choice cannot change).
A transcoder's sae.json also records `target_hook` and `target_scale` (its target's input
scale); in model units its W_dec, b_dec are divided by the target's scale and W_skip scaled
by input scale / target scale. Every LoadedSAE's info has "hook" (the input hook) and
"target_hook" (None for an SAE), and `reconstruct(x)` gives the d_out output, skip included.
No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from saejax import __version__, io
from saejax.core import sae as S
from saejax.core.architectures import (
    ARCHITECTURES,
    latent_vectors,
    selects_top_k,
    supports_transcoder,
)
from saejax.errors import SaejaxError


@dataclass
class LoadedSAE:
    """An SAE in model units: `encode(x)` and `decode(f)` take and give raw activations."""

    params: dict
    spec: S.SAESpec
    info: dict

    def encode(self, x):
        return S.encode(self.params, jnp.asarray(x, jnp.float32), self.spec, training=False)

    def decode(self, f):
        return S.decode(self.params, f, self.spec)

    def reconstruct(self, x):
        """The SAE's output for raw inputs x: decode(encode(x)), plus a skip transcoder's
        x·W_skipᵀ."""
        return S.forward(self.params, jnp.asarray(x, jnp.float32), self.spec)[0]


def to_numpy(params: dict) -> dict:
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in params.items()}


def save_sae(
    path: str,
    params: dict,
    spec: S.SAESpec,
    input_scale,
    cfg,
    data_meta: dict,
    hook: str | None,
) -> None:
    """`input_scale`: a float, or a transcoder's (x's, y's)."""
    target_scale = None
    if spec.transcoder:
        input_scale, target_scale = (float(s) for s in input_scale)
    info = {
        "format": "saejax",
        "saejax_version": __version__,
        "spec": asdict(spec),
        "input_scale": input_scale,
        "normalize_decoder": cfg.sae.normalize_decoder,
        "model": data_meta.get("model"),
        "hook": hook,
        "target_hook": getattr(cfg.data, "target_hook", None) if spec.transcoder else None,
        "target_scale": target_scale,
        "data_path": cfg.data.path,
        "model_spec": (data_meta.get("extract_config") or {}).get("model"),
        "context_size": data_meta.get("context_size"),
        "prepend_bos": data_meta.get("prepend_bos"),
    }
    with io.atomic_dir(path, kind="sae") as tmp:
        save_file(to_numpy(params), os.path.join(tmp, "sae_weights.safetensors"))
        io.write_json(os.path.join(tmp, "sae.json"), info)


def fold_to_model_units(
    params: dict, spec: S.SAESpec, input_scale: float, target_scale: float | None = None
) -> tuple[dict, str]:
    """Parameters that act on raw activations and have unit-norm decoder rows when exact.
    `target_scale` is a transcoder's output scale (None: input_scale, an SAE's)."""
    p = to_numpy(params)
    s = float(input_scale)
    t = s if target_scale is None else float(target_scale)
    out = {"W_enc": p["W_enc"] * s, "W_dec": p["W_dec"] / t, "b_dec": p["b_dec"] / t}
    if spec.skip_connection:
        out["W_skip"] = p["W_skip"] * (s / t)
    out |= {name: p[name].copy() for name in latent_vectors(spec.architecture)}
    norms = np.linalg.norm(out["W_dec"], axis=1)
    uniform = np.allclose(norms, norms.mean(), rtol=1e-5)
    if not selects_top_k(spec.architecture) or uniform:
        c = np.maximum(norms, 1e-12)
        out["W_dec"] = out["W_dec"] / c[:, None]
        out["W_enc"] = out["W_enc"] * c[None, :]
        # every bias and threshold scales with its pre-activation; gated's r_mag is a ratio
        # of the two paths' scales, which the same factor on both leaves unchanged
        for name in latent_vectors(spec.architecture):
            if name != "r_mag":
                out[name] = out[name] * c
        return out, "decoder rows unit-norm"
    return out, "decoder norms kept (non-uniform norms cannot be folded into a TopK exactly)"


def load_native(path: str) -> LoadedSAE:
    native = read_native(path)
    info = native["info"]
    params, _ = fold_to_model_units(
        native["params"], native["spec"], info["input_scale"], info.get("target_scale")
    )
    info.setdefault("target_hook", None)  # written before transcoders
    return LoadedSAE({k: jnp.asarray(v) for k, v in params.items()}, native["spec"], info)


def check_params(params: dict, spec: S.SAESpec, where: str) -> None:
    """Every parameter the architecture needs, with the shape the spec says: a damaged or
    mismatched weights file is one clear error, not a shape error deep inside JAX."""
    if spec.architecture not in ARCHITECTURES:
        raise SaejaxError(f"{where}: unknown architecture {spec.architecture!r}")
    shapes = {
        "W_enc": (spec.d_in, spec.d_sae),
        "W_dec": (spec.d_sae, spec.d_out),
        "b_dec": (spec.d_out,),
    }
    if spec.skip_connection:
        shapes["W_skip"] = (spec.d_out, spec.d_in)
    shapes |= {name: (spec.d_sae,) for name in latent_vectors(spec.architecture)}
    for name, shape in shapes.items():
        if name not in params:
            raise SaejaxError(f"{where} lacks the parameter {name}; the SAE files are damaged")
        if tuple(params[name].shape) != shape:
            raise SaejaxError(
                f"{where}: {name} has shape {list(params[name].shape)} but the SAE's settings "
                f"need {list(shape)}; the SAE files are damaged or do not belong together"
            )


def _damaged(path: str, error: Exception) -> SaejaxError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SaejaxError(f"the SAE at {path} cannot be read ({reason}); its files are damaged")


# What a damaged JSON or safetensors file raises while being parsed.
_PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, SafetensorError)


def read_native(sae_dir: str) -> dict:
    if os.path.isdir(os.path.join(sae_dir, "sae")):
        sae_dir = os.path.join(sae_dir, "sae")  # a run directory
    if not os.path.exists(os.path.join(sae_dir, "sae.json")):
        raise SaejaxError(f"{sae_dir} holds no trained SAE (no sae.json; has the run finished?)")
    weights = os.path.join(sae_dir, "sae_weights.safetensors")
    if not os.path.exists(weights):
        raise SaejaxError(f"{sae_dir} has sae.json but no sae_weights.safetensors")
    try:
        with open(os.path.join(sae_dir, "sae.json")) as f:
            info = json.load(f)
        spec_fields = dict(info["spec"])
        if "sparse_topk" in spec_fields:  # written before the kernel name replaced the flag
            spec_fields["topk_kernel"] = "sparse" if spec_fields.pop("sparse_topk") else "dense"
        spec = S.SAESpec(**spec_fields)
        float(info["input_scale"])
        if spec.transcoder:
            float(info["target_scale"])
        params = load_file(weights)
    except _PARSE_ERRORS as e:
        raise _damaged(sae_dir, e) from None
    check_params(params, spec, weights)
    return {"params": params, "spec": spec, "info": info}


def saelens_input_convention(cfg: dict, path: str) -> bool:
    """SAELens's `apply_b_dec_to_input` (the spec's field of the same name: false, as in Gemma
    Scope and many third-party releases, encodes x W_enc + b_enc, the weights kept as they
    are), or one line on what cannot be honoured: input normalisation and reshaping have no
    saejax counterpart here, so such folders are refused rather than silently misread."""
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SaejaxError(
            f"{path}: SAELens normalize_activations={norm!r} is not supported "
            "(only 'none': fold the scaling into the weights first)"
        )
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise SaejaxError(f"{path}: SAELens reshape_activations={reshape!r} is not supported")
    apply = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply, bool):
        raise SaejaxError(f"{path}: apply_b_dec_to_input must be true or false, got {apply!r}")
    return apply


# SAELens's architecture names → saejax's (a "jumprelu" exported from batchtopk says so in
# its metadata, see `_saelens_spec`)
SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
# SAELens's transcoders (sae_lens/saes/transcoder.py) → (saejax architecture, skip connection)
SAELENS_TRANSCODERS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
}


def load_sae(path: str) -> LoadedSAE:
    """Load a saejax run or SAE folder, a SAELens export or a sparsify export; damaged files
    are one SaejaxError."""
    try:
        sae = _load_any(path)
    except _PARSE_ERRORS as e:
        raise _damaged(path, e) from None
    if sae.info.get("format") != "saejax":  # exports: the native loader checked its own
        check_params({k: np.asarray(v) for k, v in sae.params.items()}, sae.spec, path)
    return sae


def _with_hooks(cfg: dict) -> dict:
    """A SAELens cfg as LoadedSAE.info: the cfg, with "hook" and "target_hook" (the input and
    output hooks, from its metadata: hook_name and hook_name_out) at the top level."""
    meta = cfg.get("metadata") or {}
    hook = cfg.get("hook_name") or meta.get("hook_name")
    target = cfg.get("hook_name_out") or meta.get("hook_name_out")
    return {**cfg, "hook": hook, "target_hook": target}


# saejax architectures that SAELens saves as "jumprelu" (their running threshold), named in
# the export's metadata as saejax_architecture so that loading gives them back
_SAVED_AS_JUMPRELU = ("batchtopk", "matryoshka_batchtopk")


def _saelens_spec(cfg: dict, arch: str, **extra) -> S.SAESpec:
    """The SAESpec of a SAELens cfg.json whose architecture maps to saejax's `arch`; `extra`
    holds the fields only some folders set (a transcoder's d_out and skip, an SAE's input
    convention). A "jumprelu" that saejax exported from an architecture it can load back as
    itself (a transcoder only where that architecture has transcoders) is loaded as it."""
    trained_as = (cfg.get("metadata") or {}).get("saejax_architecture")
    transcoder = extra.get("transcoder", False)
    if (
        arch == "jumprelu"
        and trained_as in _SAVED_AS_JUMPRELU
        and (not transcoder or supports_transcoder(trained_as))
    ):
        arch = trained_as
    return S.SAESpec(arch, int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg.get("k", 32)), **extra)


def _saelens_transcoder(cfg: dict, w: dict, path: str) -> LoadedSAE:
    """A SAELens transcoder, skip transcoder or JumpReLU transcoder. SAELens refuses
    apply_b_dec_to_input for them (b_dec has width d_out), as saejax's transcoders never
    centre their input, so the weights act as they are."""
    if cfg.get("apply_b_dec_to_input"):
        raise SaejaxError(f"{path}: a SAELens transcoder cannot have apply_b_dec_to_input: true")
    # the same refusal of input normalisation and reshaping as for SAEs (no b_dec to fold)
    saelens_input_convention({**cfg, "apply_b_dec_to_input": True}, path)
    arch, skip = SAELENS_TRANSCODERS[cfg["architecture"]]
    spec = _saelens_spec(cfg, arch, d_out=int(cfg["d_out"]), transcoder=True, skip_connection=skip)
    return LoadedSAE({k: jnp.asarray(v) for k, v in w.items()}, spec, _with_hooks(cfg))


def _load_any(path: str) -> LoadedSAE:
    if os.path.isdir(os.path.join(path, "sae")):
        path = os.path.join(path, "sae")
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if "sae.json" in files:
        return load_native(path)
    if "cfg.json" in files and "sae_weights.safetensors" in files:
        with open(os.path.join(path, "cfg.json")) as f:
            cfg = json.load(f)
        w = load_file(os.path.join(path, "sae_weights.safetensors"))
        if cfg["architecture"] in SAELENS_TRANSCODERS:
            return _saelens_transcoder(cfg, w, path)
        arch = SAELENS_ARCHITECTURES.get(cfg["architecture"])
        if arch is None:
            raise SaejaxError(f"SAELens architecture {cfg['architecture']!r} is not supported")
        spec = _saelens_spec(cfg, arch, apply_b_dec_to_input=saelens_input_convention(cfg, path))
        return LoadedSAE({k: jnp.asarray(v) for k, v in w.items()}, spec, _with_hooks(cfg))
    if "cfg.json" in files and "sae.safetensors" in files:
        with open(os.path.join(path, "cfg.json")) as f:
            cfg = json.load(f)
        w = load_file(os.path.join(path, "sae.safetensors"))
        params = {
            "W_enc": w["encoder.weight"].T,
            "b_enc": w["encoder.bias"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        }
        # sparsify's transcoders (cfg transcode) encode x uncentred; W_skip [d_in, d_in]
        skip = bool(cfg.get("skip_connection")) and "W_skip" in w
        if skip:
            params["W_skip"] = w["W_skip"]
        transcoder = bool(cfg.get("transcode")) or skip
        spec = S.SAESpec(
            "topk",
            int(cfg.get("d_in", params["W_dec"].shape[1])),
            int(params["W_dec"].shape[0]),
            int(cfg["k"]),
            d_out=int(params["W_dec"].shape[1]),
            transcoder=transcoder,
            skip_connection=skip,
        )
        info = {**cfg, "target_hook": cfg.get("target_hook") if transcoder else None}
        return LoadedSAE(
            {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in params.items()}, spec, info
        )
    raise SaejaxError(f"{path} is not a saejax, SAELens or sparsify SAE folder")
