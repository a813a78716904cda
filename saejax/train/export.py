"""`saejax export`: a trained SAE in SAELens's or sparsify's layout, in the model's own units
(the input scale folded in, decoder rows unit-norm where that is exact; see
`sae_files.fold_to_model_units`). Written whole into a temporary folder, then renamed; never
into the run or SAE folder it reads, and never over a folder that is not an earlier export."""

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


def export_saelens(sae_dir: str, out: str) -> str:
    _check_out(sae_dir, out)
    native = read_native(sae_dir)
    spec, info = native["spec"], native["info"]
    params, note = fold_to_model_units(native["params"], spec, info["input_scale"])
    arch = _SAELENS_ARCH[spec.architecture]
    names = ("W_enc", "W_dec", "b_dec") + latent_vectors(spec.architecture)
    weights = {k: params[k] for k in names}  # gated: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec
    cfg = {
        "architecture": arch,
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": spec.apply_b_dec_to_input,
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
    params, _ = fold_to_model_units(native["params"], spec, info["input_scale"])
    b_enc = params["b_enc"]
    if not spec.apply_b_dec_to_input:  # sparsify always encodes x − b_dec: fold b_dec·W_enc back
        b_enc = (b_enc + params["b_dec"].astype(np.float64) @ params["W_enc"]).astype(np.float32)
    weights = {
        "encoder.weight": np.ascontiguousarray(params["W_enc"].T),
        "encoder.bias": b_enc,
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }
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
        "skip_connection": False,
        "hook": info.get("hook"),
        "model": info.get("model"),
    }
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
