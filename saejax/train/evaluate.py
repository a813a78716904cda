"""An SAE judged on held-out rows, with the field's conventions (SAELens's evals are the
reference):

A transcoder is judged on its target y (the second hook of each row, `split_target`): every
x below is then y, and x̂ its reconstruction from the input hook.

- `fvu` = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², pooled over every held-out token, and
  `explained_variance` = 1 − fvu. This is SAELens's `explained_variance` ("the new, correct
  formula": 1 − mean residual sum of squares / total variance over the batch), not a mean of
  per-token ratios. (SAELens v6's code subtracts the square of the mean of x² rather than
  ‖mean x‖² from E‖x‖²; we use ‖mean x‖², the variance its comment describes.)
- `explained_variance_legacy`: SAELens's older per-token form, the mean over tokens of
  1 − ‖x − x̂‖² / ‖x − mean(x)‖², kept for comparison with older reports.
- `fvu_without_outliers` / `explained_variance_without_outliers`: the same on the rows whose
  norm is at most OUTLIER_NORM_RATIO × the median row norm. Attention-sink tokens (the first
  positions after BOS) can carry most of the variance, so the overall FVU alone can look
  good while ordinary tokens are reconstructed badly, or the other way round.
- `median_relative_error`: the median over tokens of ‖x − x̂‖ / ‖x‖.
- `silent_in_eval_fraction`: latents that never fired on these held-out rows (a few thousand
  tokens). This is not the training notion of dead (no firing within `dead_tokens` training
  tokens); `dead_fraction` is the same number under its old name, kept for older readers.
- `density_hist` over log10 firing frequency with `density_edges`; latents that never fired
  fall below the first edge and are counted in `never_fired` (and not in the histogram), and
  latents that fired but less often than the first edge in `density_underflow`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.core import sae as S
from saejax.train.data import validation_rows
from saejax.train.step import DENSITY_EDGES

# a row is an outlier when its norm exceeds this × the median norm (the training metric
# fvu_without_outliers applies the same rule within each batch)
OUTLIER_NORM_RATIO = S.OUTLIER_NORM_RATIO


def split_target(rows, input_scale, spec: S.SAESpec) -> tuple:
    """(x, target) of raw rows, each in training units: the target is x for an SAE, and the
    y beside x for a transcoder (`input_scale` then holds x's and y's scales)."""
    if not spec.transcoder:
        return rows * input_scale, rows * input_scale
    return rows[:, : spec.d_in] * input_scale[0], rows[:, spec.d_in :] * input_scale[1]


def evaluate_rows(
    params,
    spec: S.SAESpec,
    input_scale,
    rows: np.ndarray,
    batch_size: int = 4096,
    target: np.ndarray | None = None,
) -> dict:
    """The metrics above on `rows` (raw units; errors are measured after `input_scale`, a
    float, or a transcoder's (x's, y's); one float scales both). `target`: the rows y the
    output is compared with, when `rows` hold the input x alone (a transcoder read as two
    arrays, or any map from one hook to another); None: y is in `rows` (`split_target`)."""
    if spec.transcoder or target is not None:
        input_scale = tuple(float(s) for s in np.broadcast_to(input_scale, (2,)))

    def pair(chunk, target_chunk, dtype) -> tuple:
        """(x, y) of a chunk in training units."""
        if target_chunk is None:
            return split_target(chunk.astype(dtype), input_scale, spec)
        return chunk.astype(dtype) * input_scale[0], target_chunk.astype(dtype) * input_scale[1]

    @jax.jit
    def stats(rows, target_rows):
        x, y = pair(rows, target_rows, jnp.float32)
        x_hat, f, _ = S.forward(params, x, spec, training=False)
        row_err = jnp.sum(jnp.square(y - x_hat), -1)
        return row_err, jnp.sum(f > 0, 0), jnp.sum(f > 0)

    def chunks(i):
        """Rows i.. of the input and of the target (None: in the input)."""
        end = i + batch_size
        return rows[i:end], None if target is None else target[i:end]

    def targets(i):
        chunk, target_chunk = chunks(i)
        on_host = None if target_chunk is None else np.asarray(target_chunk)
        return pair(np.asarray(chunk), on_host, np.float64)[1]

    n = len(rows)
    row_err = np.zeros(n)
    fires = np.zeros(spec.d_sae)
    l0 = 0.0
    total = np.zeros(spec.d_out)
    row_sq = np.zeros(n)
    for i in range(0, n, batch_size):
        chunk, target_chunk = chunks(i)
        on_device = None if target_chunk is None else jnp.asarray(target_chunk)
        e, fc, nz = jax.device_get(stats(jnp.asarray(chunk), on_device))
        row_err[i : i + len(chunk)] = e
        fires += fc
        l0 += float(nz)
        x = targets(i)
        total += x.sum(0)
        row_sq[i : i + len(chunk)] = np.sum(x * x, -1)
    norms = np.sqrt(row_sq)
    inliers = norms <= OUTLIER_NORM_RATIO * np.median(norms)
    mean = total / n
    # ‖x − mean‖² per row, for the per-token (legacy) explained variance
    centred_sq = np.zeros(n)
    inlier_total = np.zeros(spec.d_out)
    for i in range(0, n, batch_size):
        x = targets(i)
        centred_sq[i : i + len(x)] = np.sum(np.square(x - mean), -1)
        inlier_total += x[inliers[i : i + len(x)]].sum(0)
    fvu = _fvu(row_err, row_sq, total, np.ones(n, bool))
    fvu_in = _fvu(row_err, row_sq, inlier_total, inliers)
    freq = fires / n
    fired = freq > 0
    log_freq = np.log10(freq[fired])
    hist = np.histogram(log_freq, bins=np.asarray(DENSITY_EDGES))[0]
    silent = float(np.mean(~fired))
    return {
        "tokens": n,
        "mse": float(row_err.sum() / n),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "explained_variance_legacy": float(np.mean(1.0 - row_err / np.maximum(centred_sq, 1e-12))),
        "fvu_without_outliers": fvu_in,
        "explained_variance_without_outliers": None if fvu_in is None else 1.0 - fvu_in,
        "outlier_rows": int(n - inliers.sum()),
        "outlier_norm_ratio": OUTLIER_NORM_RATIO,
        "outlier_variance_share": _outlier_share(row_sq, total, inliers, inlier_total),
        "median_relative_error": float(np.median(np.sqrt(row_err) / np.maximum(norms, 1e-12))),
        "l0": l0 / n,
        "silent_in_eval_fraction": silent,
        "dead_fraction": silent,
        "dense_fraction": float(np.mean(freq > 0.1)),
        "never_fired": int(np.sum(~fired)),
        "density_underflow": int(np.sum(log_freq < DENSITY_EDGES[0])),
        "density_hist": hist.tolist(),
        "density_edges": list(DENSITY_EDGES),
    }


def _fvu(row_err, row_sq, total, mask) -> float | None:
    """Σ‖x − x̂‖² / Σ‖x − mean‖² over the rows in `mask` (None when there are none)."""
    m = int(mask.sum())
    if m == 0:
        return None
    variance = float(row_sq[mask].sum() - np.sum(total**2) / m)
    return float(row_err[mask].sum() / max(variance, 1e-12))


def _outlier_share(row_sq, total, inliers, inlier_total) -> float:
    """The share of the held-out variance (about the overall mean) that the outlier rows hold."""
    n = len(row_sq)
    variance = float(row_sq.sum() - np.sum(total**2) / n)
    m = int(inliers.sum())
    inlier_var = float(row_sq[inliers].sum() - np.sum(inlier_total**2) / max(m, 1))
    # the inliers' own variance plus what their mean's offset from the overall mean adds
    offset = m * float(np.sum(np.square(inlier_total / max(m, 1) - total / n)))
    return float(max(0.0, 1.0 - (inlier_var + offset) / max(variance, 1e-12)))


def evaluate(params, spec, input_scale, source, data_cfg) -> dict:
    rows = validation_rows(source, data_cfg)
    return evaluate_rows(params, spec, input_scale, rows)


def describe_metrics(m: dict) -> str:
    """One line of the held-out figures, as train, eval and the demo print them: FVU overall
    and without outlier rows (attention sinks can carry most of the variance), explained
    variance, L0, the median relative error and the latents silent on these rows."""
    return (
        f"FVU {m['fvu']:.4f} (without {m['outlier_rows']} outlier rows "
        f"{m['fvu_without_outliers']:.4f})   explained variance {m['explained_variance']:.4f}   "
        f"L0 {m['l0']:.1f}   median rel. error {m['median_relative_error']:.3f}   "
        f"silent in eval {m['silent_in_eval_fraction']:.1%}"
    )
