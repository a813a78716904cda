"""MLP weights of a model as stacked NumPy arrays, and TransformerLens-style processing.

`MLPWeights` holds, for L layers, the MLP input projection `w_in` [L, d_model, d_mlp]
(the matrix that maps the normalised residual stream to the pre-activation), its bias
`b_in` [L, d_mlp], the output projection `w_out` [L, d_mlp, d_model] and `b_out`
[L, d_model], and the norm that feeds the MLP (`ln_w`, `ln_b`; `ln_b` is None for
RMSNorm). A missing bias is None: Llama-style MLPs have none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class MLPWeights:
    arch: str
    w_in: np.ndarray
    b_in: np.ndarray | None
    w_out: np.ndarray
    b_out: np.ndarray | None
    ln_w: np.ndarray | None
    ln_b: np.ndarray | None

    @property
    def n_layers(self) -> int:
        return int(self.w_in.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w_in.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.w_in.shape[2])

    def shape_signature(self) -> dict:
        """What must agree between a base model and its fine-tune."""
        return {
            "arch": self.arch,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "b_in": self.b_in is not None,
        }


def process_weights(raw: MLPWeights) -> MLPWeights:
    """Fold the pre-MLP norm into W_in / b_in and centre, as TransformerLens does.

    b_in ← b_in + Σ_d W_in[d, j]·ln.b[d];  W_in ← diag(ln.w)·W_in;  then every neuron's
    W_in column minus its mean over d_model (the normalised input has zero mean, so the
    function is unchanged). With a LayerNorm TransformerLens also centres the writing
    weights: each W_out row and b_out lose their mean over d_model. Computed in float64.
    """
    w_in = raw.w_in.astype(np.float64)
    b_in = None if raw.b_in is None else raw.b_in.astype(np.float64)
    if raw.ln_b is not None and b_in is not None:
        b_in = b_in + np.einsum("ldj,ld->lj", w_in, raw.ln_b.astype(np.float64))
    if raw.ln_w is not None:
        w_in = w_in * raw.ln_w.astype(np.float64)[:, :, None]
    w_out = raw.w_out.astype(np.float64)
    b_out = None if raw.b_out is None else raw.b_out.astype(np.float64)
    layer_norm = raw.ln_b is not None  # RMSNorm models are left uncentred, as in TransformerLens
    if layer_norm:
        w_in = w_in - w_in.mean(axis=1, keepdims=True)
        w_out = w_out - w_out.mean(axis=2, keepdims=True)
        if b_out is not None:
            b_out = b_out - b_out.mean(axis=1, keepdims=True)
    return replace(raw, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, ln_w=None, ln_b=None)
