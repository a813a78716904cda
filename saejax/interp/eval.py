"""`saejax eval RUN`: an SAE judged by the language model it came from.

On held-out sequences of the run's store (the validation rows: the end of the store, never
trained on), the model runs clean, with the SAE's reconstruction substituted at its hook, and
with the hook zero-ablated. The conventions are SAELens's (sae_lens/evals.py,
`get_recons_loss` and `get_downstream_reconstruction_metrics`), so the numbers compare with
papers, SAEBench and Neuronpedia:

- The splice replaces the activation at every position except those whose input token is a
  special token of the tokenizer (BOS, EOS, PAD, ...), which keep their clean activation
  (SAELens's default `exclude_special_tokens=True`: `torch.where(mask, sae_out, act)`).
- The zero-ablation baseline zeroes the hook at EVERY position, BOS included.
- Scored positions: CE and KL are averaged over the positions whose input token is not
  special; CE over the positions that predict a next token, KL over all of them (the last
  position too), as SAELens does.
- `ce_loss_recovered` = (CE_zero − CE_spliced) / (CE_zero − CE_clean) and
  `kl_div_score` = (KL_zero − KL_spliced) / KL_zero (1: the SAE loses nothing; 0: as bad as
  deleting the activation).
- Beside them, `ce_zero_bos_kept` / `kl_zero_bos_kept` / `ce_loss_recovered_bos_kept`: the
  baseline zero-ablates only the positions the splice replaces (BOS and other special
  positions keep their clean activation). This was saejax's headline before; it is the
  harder baseline (a zero reconstruction scores 0 on it exactly).

eval_lm.json records the convention (`scored_positions`, `special_token_ids`) and the ids
of the evaluated sequences. Alongside, the SAE's own held-out metrics (train.evaluate:
explained variance, FVU with and without outlier rows, median relative error, L0, ...) in
model units.

Transcoders (`info["target_hook"]` set: the input from `info["hook"]`, the output in place of
the target hook, e.g. blocks.L.ln2.hook_normalized → blocks.L.hook_mlp_out) are judged the
same way with the target in the SAE's place: in one forward pass the input hook is read and
the target hook replaced by the transcoder's output of it, and the zero-ablation baselines
zero the target hook. So ce_loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean) with
CE_zero the model with the target (the MLP output) deleted. The held-out row metrics compare
the transcoder's output with the target hook's rows, read beside the input rows (same rows of
one store, aligned by construction); FVU and its outliers are those of the target rows.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from saejax.errors import SaejaxError
from saejax.interp.lm import load_cached, model_for
from saejax.io import write_json

SCORED_POSITIONS = (
    "positions whose input token is not a special token; CE over those that predict a next "
    "token, KL over all of them (SAELens's exclude_special_tokens=True)"
)


def held_out_sequences(store, validation_tokens: int, limit: int) -> list[tuple[int, int]]:
    """(sequence id, one of its rows) for whole sequences inside the validation rows."""
    from saejax.train.data import split_rows

    split = split_rows(len(store), validation_tokens, store)
    doc = store.doc(split.train_rows, len(store))
    first_row = {}
    for offset, seq in enumerate(doc[:, 0].tolist()):
        first_row.setdefault(seq, split.train_rows + offset)
    seqs = sorted(first_row)
    if split.train_rows > 0 and seqs:
        before = int(store.doc(split.train_rows - 1, split.train_rows)[0, 0])
        if before == seqs[0]:
            seqs = seqs[1:]  # the first began in the training rows
    return [(s, first_row[s]) for s in seqs[:limit]]


def special_token_ids(tokenizer) -> list[int]:
    """Every special token id the tokenizer names (as SAELens's get_special_token_ids)."""
    ids = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)}
    ids |= {getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None)}
    ids |= set(getattr(tokenizer, "all_special_ids", []) or [])
    return sorted(int(i) for i in ids if i is not None)


def _log_probs(model, ids):
    import torch

    logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), -1).cpu()  # scored on the host beside the mask


def _scores(logp_clean, logp, ids, mask) -> tuple[float, float, int, int]:
    """(CE sum, KL(clean ‖ logp) sum, CE count, KL count) over the scored positions."""
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
    ce_mask = mask[:, :-1]
    return (
        float(ce[ce_mask].sum()),
        float(kl[mask].sum()),
        int(ce_mask.sum()),
        int(mask.sum()),
    )


def check_transcoder_hooks(hook: str, target_hook: str | None) -> None:
    """One line when a transcoder's input hook is not reached before its target hook."""
    from extract.hooks import hook_order, parse_hooks

    if target_hook is None:
        return
    source, target = parse_hooks(hook)[0], parse_hooks(target_hook)[0]
    if hook_order(source) >= hook_order(target):
        raise SaejaxError(
            f"the transcoder's input hook {hook} is not reached before its target hook "
            f"{target_hook} in the forward pass, so it cannot be spliced in for the target"
        )


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

    from extract.hooks import Splice, SpliceFrom, parse_hooks, validate_hooks

    target_hook = sae.info.get("target_hook")
    check_transcoder_hooks(hook, target_hook)
    meta = store.meta
    first_kept = 1 if meta.get("prepend_bos") and meta.get("bos_dropped", True) else 0
    if int(meta.get("skip_positions") or 0) > first_kept:
        raise SaejaxError(
            f"the store {store.path} skipped the first {meta['skip_positions']} positions of "
            "each context, so it cannot rebuild the model's inputs for the LM eval"
        )
    loaded = load_cached(*model_for(sae.info, meta, model_name), model_dtype, device)
    point = parse_hooks(hook)[0]
    target = parse_hooks(target_hook)[0] if target_hook else None
    validate_hooks([point] + ([target] if target else []), loaded.model)
    ablated = target or point  # the point the splice replaces and the baselines zero
    special = special_token_ids(loaded.tokenizer)
    sequences = held_out_sequences(store, validation_tokens, n_sequences)
    if not sequences:
        raise SaejaxError(f"the store {store.path} has no whole held-out sequence to evaluate on")

    def reconstruct(t, like=None):
        """The SAE runs in JAX on float32 host arrays; its output goes back where `like` (the
        activation it replaces: t itself for an SAE, the target for a transcoder) lives."""
        like = t if like is None else like
        flat = t.detach().float().cpu().numpy().reshape(-1, t.shape[-1])
        recon = np.array(sae.reconstruct(flat), np.float32)  # a writable copy
        if recon.shape != (flat.shape[0], like.shape[-1]):
            raise SaejaxError(
                f"the SAE maps {t.shape[-1]} inputs to {recon.shape[1:]} outputs, but "
                f"{ablated.name} has width {like.shape[-1]}"
            )
        return torch.from_numpy(recon.reshape(like.shape)).to(device=like.device, dtype=like.dtype)

    def spliced(keep):
        """The context that puts the SAE's output in place, where `keep` is true."""
        if target is None:
            return Splice(model, point, lambda t: torch.where(keep, reconstruct(t), t))
        return SpliceFrom(
            model, point, target, lambda x, t: torch.where(keep, reconstruct(x, like=t), t)
        )

    names = ("clean", "spliced", "zero", "zero_bos_kept")
    ce = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    n_ce = n_kl = 0
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
            ids = torch.tensor(np.stack(group), dtype=torch.long)
            mask = ~torch.isin(ids, torch.tensor(special, dtype=torch.long))
            keep = mask[..., None].to(loaded.device)  # where the splice acts
            ids_on_model = ids.to(loaded.device)

            logp = {"clean": _log_probs(model, ids_on_model)}
            for name, context in (
                ("spliced", spliced(keep)),
                ("zero", Splice(model, ablated, torch.zeros_like)),
                (
                    "zero_bos_kept",
                    Splice(
                        model,
                        ablated,
                        lambda t, keep=keep: torch.where(keep, torch.zeros_like(t), t),
                    ),
                ),
            ):
                with context:
                    logp[name] = _log_probs(model, ids_on_model)
            for name in names:
                c, k, nc, nk = _scores(logp["clean"], logp[name], ids, mask)
                ce[name] += c
                kl[name] += k
            n_ce, n_kl = n_ce + nc, n_kl + nk
    if n_ce == 0:
        raise SaejaxError("the held-out sequences have no position to score (all special tokens)")
    out = {f"ce_{name}": ce[name] / n_ce for name in names}
    out.update({f"kl_{name}": kl[name] / n_kl for name in names[1:]})
    out["ce_loss_recovered"] = _recovered(out["ce_zero"], out["ce_spliced"], out["ce_clean"])
    out["ce_loss_recovered_bos_kept"] = _recovered(
        out["ce_zero_bos_kept"], out["ce_spliced"], out["ce_clean"]
    )
    out["kl_div_score"] = _recovered(out["kl_zero"], out["kl_spliced"], 0.0)
    out.update(
        sequences=len(inputs),
        sequence_ids=[int(s) for s, _ in sequences],
        predicted_tokens=n_ce,
        kl_tokens=n_kl,
        scored_positions=SCORED_POSITIONS,
        special_token_ids=special,
        zero_ablation="every position",
        model=loaded.model_id,
        hook=hook,
        target_hook=target_hook,
        ablated_hook=ablated.name,
        bos_left_clean=bool(meta.get("prepend_bos")),
    )
    return out


def _recovered(baseline: float, spliced: float, clean: float) -> float | None:
    gap = baseline - clean
    return (baseline - spliced) / gap if gap > 0 else None


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
    target = sae.info.get("target_hook")
    if target:
        d_out = getattr(sae.spec, "d_out", None) or sae.spec.d_in
        if target not in store.hooks:
            raise SaejaxError(
                f"the store {store_path} has no hook {target}, the transcoder's target "
                f"(it has {store.hooks})"
            )
        if store.d_in_of(target) != d_out:
            raise SaejaxError(
                f"the transcoder has d_out {d_out} but {target} in {store_path} has "
                f"width {store.d_in_of(target)}"
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
    from saejax.train.data import ArraySource, split_columns, validation_rows
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
    check_transcoder_hooks(hook, sae.info.get("target_hook"))
    store_path = store.path
    data_cfg = cfg.data if cfg else load_config(None, [f"data.path={store_path}"]).data
    target = sae.info.get("target_hook")
    if target:  # the input and target rows side by side, the same rows of one store
        source = ArraySource(store_path, hook, also=[target])
        x, y = split_columns(validation_rows(source, data_cfg), source.widths)
        metrics = evaluate_rows(sae.params, sae.spec, 1.0, x, target=y)
        result = {"sae": {**metrics, "compared_with": "the target hook's rows (a transcoder)"}}
    else:
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
