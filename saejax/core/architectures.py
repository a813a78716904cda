"""The SAE architectures and the rules that follow from the name alone.

No JAX here, so the config, the dry run and the command line share these rules with the
maths in `core.sae` without importing an accelerator runtime.
"""

from __future__ import annotations

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk")
# TopK's paths: "dense" matmuls (the reference), or the sparse gather/scatter on the k selected
# latents through "sparse" (the backend's own kernels: C++ on the CPU, XLA's primitives
# elsewhere), "pallas", or "auto" (the path measured fastest for the backend)
TOPK_KERNELS = ("auto", "sparse", "pallas", "dense")


def selects_top_k(architecture: str) -> bool:
    """TopK and BatchTopK keep a fixed number of latents (`sae.k`) instead of a penalty."""
    return architecture in ("topk", "batchtopk", "matryoshka_batchtopk")


def batch_selects(architecture: str) -> bool:
    """BatchTopK and Matryoshka BatchTopK: k·rows latents kept over the whole batch in
    training, a learned threshold (a running statistic) at inference."""
    return architecture in ("batchtopk", "matryoshka_batchtopk")


def matryoshka_prefixes(widths, d_sae: int) -> tuple[int, ...]:
    """The nested prefix widths a Matryoshka SAE reconstructs from, the whole dictionary last
    (added when missing); none given: d_sae/16, d_sae/4 and d_sae (those below 1 left out)."""
    widths = tuple(int(w) for w in widths) or (d_sae // 16, d_sae // 4)
    widths = tuple(w for w in widths if w >= 1)
    return widths if widths and widths[-1] == d_sae else widths + (d_sae,)


def has_threshold(architecture: str) -> bool:
    """JumpReLU learns a threshold per latent; BatchTopK keeps its inference threshold there."""
    return architecture in ("jumprelu", "batchtopk", "matryoshka_batchtopk")


def uses_sparse_kernels(architecture: str, topk_kernel: str) -> bool:
    """Only TopK trains through the sparse gather/scatter kernels (BatchTopK's per-row
    counts vary, so it and Matryoshka BatchTopK train densely)."""
    return architecture == "topk" and topk_kernel != "dense"


def has_l1_penalty(architecture: str) -> bool:
    """relu penalises its latents; gated its gate's ReLU (both with sae.l1_coefficient)."""
    return architecture in ("relu", "gated")


def is_gated(architecture: str) -> bool:
    """Gated (Rajamanoharan et al. 2024): a gate and a magnitude path share the encoder
    directions, with b_gate, r_mag and b_mag in place of b_enc."""
    return architecture == "gated"


def latent_vectors(architecture: str) -> tuple[str, ...]:
    """The [d_sae] parameters besides the weight matrices, in the layout SAELens names them."""
    if is_gated(architecture):
        return ("b_gate", "r_mag", "b_mag")
    return ("b_enc", "threshold") if has_threshold(architecture) else ("b_enc",)


def revived_vectors(architecture: str) -> tuple[str, ...]:
    """The [d_sae] parameters a resampled latent starts again from zero (the threshold keeps
    its value: it is a scale, not a bias)."""
    return ("b_gate", "r_mag", "b_mag") if is_gated(architecture) else ("b_enc",)


# Transcoders (input from one hook, target from another) work with these activations; gated
# and matryoshka_batchtopk are refused (their extra reconstructions assume x̂ ≈ x)
TRANSCODER_ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


def supports_transcoder(architecture: str) -> bool:
    """Whether `architecture` may be trained as a transcoder (`data.target_hook`)."""
    return architecture in TRANSCODER_ARCHITECTURES
