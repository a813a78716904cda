"""`saejax export`: a trained SAE in SAELens's or sparsify's layout, in the model's own units
(the input scale folded in, decoder rows unit-norm where that is exact; see
`sae_files.fold_to_model_units`). Written whole into a temporary folder, then renamed; never
into the run or SAE folder it reads, and never over a folder that is not an earlier export.

Transcoders: SAELens 6 names them "transcoder" (ReLU), "skip_transcoder" (ReLU + W_skip
[d_out, d_in]) and "jumprelu_transcoder" (JumpReLU, and BatchTopK by its threshold), with
`d_out` in the cfg, apply_b_dec_to_input false and the output hook as metadata.hook_name_out;
TopK transcoders and skip connections on other activations have no SAELens class. sparsify's
layout holds TopK transcoders (`transcode: true`, `skip_connection` with W_skip) whose output
has the input's width (its b_dec and W_skip are sized by d_in)."""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

from saejax import __version__, io
from saejax.core.architectures import latent_vectors
from saejax.errors import SaejaxError
from saejax.train.sae_files import fold_to_model_units, read_native

SAELENS_VERSION = "6.0.0"
_SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "gated": "gated",
    "matryoshka_batchtopk": "jumprelu",  # as SAELens saves it: the running threshold
}


def _saelens_transcoder_arch(spec) -> str:
    """SAELens's class name for a transcoder, or one line on why it has none."""
    if spec.architecture == "relu":
        return "skip_transcoder" if spec.skip_connection else "transcoder"
    if spec.architecture in ("jumprelu", "batchtopk") and not spec.skip_connection:
        return "jumprelu_transcoder"
    if spec.architecture == "topk":
        why = "SAELens has no TopK transcoder (export it with --format sparsify)"
    else:
        why = "SAELens's skip transcoder is ReLU only"
    raise SaejaxError(
        f"this {spec.architecture} transcoder"
        f"{' with a skip connection' if spec.skip_connection else ''} has no SAELens layout: {why}"
    )


def _model_units(native: dict) -> tuple[dict, str]:
    info = native["info"]
    return fold_to_model_units(
        native["params"], native["spec"], info["input_scale"], info.get("target_scale")
    )


def export_saelens(sae_dir: str, out: str) -> str:
    _check_out(sae_dir, out)
    native = read_native(sae_dir)
    spec, info = native["spec"], native["info"]
    if spec.transcoder:
        arch = _saelens_transcoder_arch(spec)
    else:
        arch = _SAELENS_ARCH[spec.architecture]
    params, note = _model_units(native)
    names = ("W_enc", "W_dec", "b_dec") + latent_vectors(spec.architecture)
    names += ("W_skip",) if spec.skip_connection else ()
    weights = {k: params[k] for k in names}  # gated: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec
    cfg = {
        "architecture": arch,
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        # a transcoder's b_dec lives in the output space: SAELens refuses it on the input
        "apply_b_dec_to_input": spec.apply_b_dec_to_input and not spec.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": info.get("model"),
            "hook_name": info.get("hook"),
            "hook_head_index": None,
            "context_size": info.get("context_size"),
            "prepend_bos": info.get("prepend_bos"),
            "dataset_path": info.get("data_path"),
            "exported_by": f"saejax {__version__}",
            "saejax_architecture": spec.architecture,
            "export_note": note,
        },
    }
    if arch == "topk":
        cfg["k"] = spec.k
    if spec.transcoder:
        cfg["d_out"] = spec.d_out
        cfg["metadata"]["hook_name_out"] = info.get("target_hook")
        cfg["metadata"]["hook_head_index_out"] = None
    return _write_export(out, "sae_weights.safetensors", weights, cfg)


def export_sparsify(sae_dir: str, out: str) -> str:
    _check_out(sae_dir, out)
    native = read_native(sae_dir)
    spec, info = native["spec"], native["info"]
    if spec.architecture != "topk":
        raise SaejaxError(
            f"the sparsify layout holds TopK SAEs only; this SAE is {spec.architecture} "
            "(export it with --format saelens)"
        )
    if spec.d_out != spec.d_in:
        raise SaejaxError(
            f"sparsify's transcoders output the input's width; this one maps {spec.d_in} to "
            f"{spec.d_out}"
        )
    params, _ = _model_units(native)
    b_enc = params["b_enc"]
    if not spec.apply_b_dec_to_input and not spec.transcoder:
        # sparsify always encodes x − b_dec: fold b_dec·W_enc back into the encoder bias
        b_enc = (b_enc + params["b_dec"].astype(np.float64) @ params["W_enc"]).astype(np.float32)
    weights = {
        "encoder.weight": np.ascontiguousarray(params["W_enc"].T),
        "encoder.bias": b_enc,
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }
    if spec.skip_connection:
        weights["W_skip"] = params["W_skip"]
    cfg = {
        "d_in": spec.d_in,
        "num_latents": spec.d_sae,
        "k": spec.k,
        "expansion_factor": spec.d_sae // spec.d_in,
        # sparsify reads this as "decoder rows are unit-norm": true only when they are
        "normalize_decoder": bool(
            np.allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=0, atol=1e-4)
        ),
        "multi_topk": False,
        "skip_connection": spec.skip_connection,
        "transcode": spec.transcoder,
        "hook": info.get("hook"),
        "model": info.get("model"),
    }
    if spec.transcoder:  # not a sparsify field (it drops extra fields): saejax reads it back
        cfg["target_hook"] = info.get("target_hook")
    return _write_export(out, "sae.safetensors", weights, cfg)


def _check_out(sae_dir: str, out: str) -> None:
    """Refuse, before any work, an `out` that is or holds the run/SAE folder, lies inside it,
    or is an existing folder saejax did not write as an export."""
    io.check_output_dir(out, "export", reads=[sae_dir, os.path.join(sae_dir, "sae")])


def _write_export(out: str, weights_name: str, weights: dict, cfg: dict) -> str:
    """Weights + cfg.json into a temporary folder, renamed to `out` once both are written."""
    with io.atomic_dir(out, kind="export") as tmp:
        save_file(weights, os.path.join(tmp, weights_name))
        io.write_json(os.path.join(tmp, "cfg.json"), cfg)
    return out
