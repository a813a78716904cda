"""`saejax eval RUN`: an SAE judged by the language model it came from.

On held-out sequences of the run's store (the validation rows: the end of the store,
never trained on), the model runs three times per batch: clean, with the SAE's
reconstruction substituted at its hook, and with the hook zero-ablated. Reported:
cross-entropy of each, KL(clean ‖ spliced) and KL(clean ‖ zero) per token, and
    CE loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
(1: the SAE loses nothing; 0: as bad as deleting the activation). The BOS position is
left clean when the store dropped BOS rows, since the SAE never saw one. Alongside,
the SAE's own held-out metrics (MSE, FVU, L0, dead and dense fractions, density
histogram) in model units.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from saejax.errors import SaejaxError
from saejax.interp.lm import load_cached, model_for
from saejax.io import write_json


def held_out_sequences(store, validation_tokens: int, limit: int) -> list[tuple[int, int]]:
    """(sequence id, one of its rows) for whole sequences inside the validation rows."""
    from saejax.train.data import split_rows

    split = split_rows(len(store), validation_tokens)
    doc = store.doc(split.train_rows, len(store))
    first_row = {}
    for offset, seq in enumerate(doc[:, 0].tolist()):
        first_row.setdefault(seq, split.train_rows + offset)
    seqs = sorted(first_row)
    if split.train_rows > 0 and len(seqs) > 1:
        seqs = seqs[1:]  # the first may have begun in the training rows
    return [(s, first_row[s]) for s in seqs[:limit]]


def _token_losses(logits, ids):
    """Per-position next-token CE and log-probabilities."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return ce, logp


def run_lm_eval(
    sae,
    store,
    model_name: str | None,
    n_sequences: int,
    batch_size: int,
    hook: str,
    validation_tokens: int,
    progress: bool = False,
    device: str | None = None,
    model_dtype: str | None = None,
) -> dict:
    import torch
    from tqdm import tqdm

    from extract.hooks import Splice, parse_hooks, validate_hooks

    meta = store.meta
    loaded = load_cached(*model_for(sae.info, meta, model_name), model_dtype, device)
    point = parse_hooks(hook)[0]
    validate_hooks([point], loaded.model)
    keep_first_clean = bool(meta.get("prepend_bos")) and bool(meta.get("bos_dropped", True))
    sequences = held_out_sequences(store, validation_tokens, n_sequences)
    if not sequences:
        raise SaejaxError(f"the store {store.path} has no whole held-out sequence to evaluate on")

    def spliced(fn):
        def replace(t):
            out = fn(t)
            if keep_first_clean:
                out = torch.cat([t[:, :1], out[:, 1:]], dim=1)
            return out

        return replace

    def reconstruct(t):
        """The SAE runs in JAX on float32 host arrays; its output goes back where t lives."""
        flat = t.detach().float().cpu().numpy().reshape(-1, t.shape[-1])
        recon = np.array(sae.reconstruct(flat), np.float32).reshape(t.shape)  # a writable copy
        return torch.from_numpy(recon).to(device=t.device, dtype=t.dtype)

    totals = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl_spliced": 0.0, "kl_zero": 0.0}
    n_tokens = 0
    inputs = [store.sequence_input(seq, row) for seq, row in sequences]
    by_length: dict[int, list] = {}
    for ids in inputs:
        by_length.setdefault(len(ids), []).append(ids)
    batches = [
        group[i : i + batch_size]
        for group in by_length.values()
        for i in range(0, len(group), batch_size)
    ]
    model = loaded.model
    with torch.inference_mode():
        for group in tqdm(batches, desc="eval", disable=not progress, file=sys.stderr):
            ids = torch.tensor(np.stack(group), dtype=torch.long).to(loaded.device)
            ce_clean, logp_clean = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
            with Splice(model, point, spliced(reconstruct)):
                ce_sae, logp_sae = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
            with Splice(model, point, spliced(torch.zeros_like)):
                ce_zero, logp_zero = _token_losses(
                    model(input_ids=ids, use_cache=False).logits, ids
                )
            p_clean = logp_clean.exp()
            totals["ce_clean"] += float(ce_clean.sum())
            totals["ce_spliced"] += float(ce_sae.sum())
            totals["ce_zero"] += float(ce_zero.sum())
            totals["kl_spliced"] += float((p_clean * (logp_clean - logp_sae)).sum())
            totals["kl_zero"] += float((p_clean * (logp_clean - logp_zero)).sum())
            n_tokens += ce_clean.numel()
    out = {k: v / n_tokens for k, v in totals.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap > 0 else None
    out.update(
        sequences=len(inputs),
        predicted_tokens=n_tokens,
        model=loaded.model_id,
        hook=hook,
        bos_left_clean=keep_first_clean,
    )
    return out


def resolve_run_store(run: str, sae, store_path: str | None = None):
    """The store a run trained on (or `store_path`) and the SAE's hook, checked against the SAE."""
    from saejax.config import load_config
    from saejax.store import ActivationStore

    config_path = os.path.join(run, "config.yaml")
    cfg = load_config(config_path, check=False) if os.path.exists(config_path) else None
    store_path = store_path or (cfg.data.path if cfg else sae.info.get("data_path"))
    if not store_path:
        raise SaejaxError(f"{run} does not say which store it was trained on; pass --store")
    if str(store_path).endswith(".npy") and os.path.isfile(store_path):
        raise SaejaxError(
            f"{store_path} is a .npy file of rows, with no tokens; eval, features, search and "
            "dashboard need an activation store (it holds each row's tokens): pass --store STORE"
        )
    if not os.path.exists(os.path.join(store_path, "meta.json")):
        raise SaejaxError(
            f"the run's store {store_path} is missing (moved or deleted?); pass --store PATH"
        )
    store = ActivationStore.open(store_path)
    hook = (
        (cfg.data.hook if cfg and cfg.data.hook else None) or sae.info.get("hook") or store.hooks[0]
    )
    if hook not in store.hooks:
        raise SaejaxError(f"the store {store_path} has no hook {hook} (it has {store.hooks})")
    if store.d_in_of(hook) != sae.spec.d_in:
        raise SaejaxError(
            f"the SAE has d_in {sae.spec.d_in} but {hook} in {store_path} has "
            f"width {store.d_in_of(hook)}"
        )
    return store, hook


def evaluate_run(
    run: str,
    store_path: str | None = None,
    model: str | None = None,
    sequences: int = 32,
    batch_size: int = 8,
    progress: bool = False,
    device: str | None = None,
    model_dtype: str | None = None,
) -> dict:
    """Held-out SAE metrics and the LM splice metrics of a run; also written to
    RUN/eval_lm.json (atomically) when the run directory is writable. The model runs on
    `device` in `model_dtype` (None: the defaults of extract.models.resolve_device)."""
    from extract.models import resolve_device, resolve_model_dtype
    from saejax.config import load_config
    from saejax.train.data import ArraySource, validation_rows
    from saejax.train.evaluate import evaluate_rows
    from saejax.train.sae_files import load_sae

    if sequences < 1 or batch_size < 1:
        raise SaejaxError("--sequences and --batch-size must be at least 1")
    if not os.path.isdir(run):
        raise SaejaxError(f"run directory not found: {run}")
    device = resolve_device(device)  # a device that is not there fails before any work
    model_dtype = resolve_model_dtype(model_dtype, device)
    sae = load_sae(run)
    config_path = os.path.join(run, "config.yaml")
    cfg = load_config(config_path, check=False) if os.path.exists(config_path) else None
    store, hook = resolve_run_store(run, sae, store_path)
    store_path = store.path
    data_cfg = cfg.data if cfg else load_config(None, [f"data.path={store_path}"]).data
    rows = validation_rows(ArraySource(store_path, hook), data_cfg)
    result = {"sae": evaluate_rows(sae.params, sae.spec, 1.0, rows)}
    result["lm"] = run_lm_eval(
        sae,
        store,
        model,
        sequences,
        batch_size,
        hook,
        data_cfg.validation_tokens,
        progress=progress,
        device=device,
        model_dtype=model_dtype,
    )
    if os.access(run, os.W_OK):
        write_json(os.path.join(run, "eval_lm.json"), result)
    return result
