"""`saejax search`: find latents from example prompts, the two rankings of the seed pipeline.

The model runs on the positive (and optional negative) prompts; the activation at the
SAE's hook of every token (BOS excluded) is encoded. Per latent:
    contrast    mean activation over positive tokens minus over negative tokens, each
                latent normalised by its largest activation seen in these prompts
    top-share   the fraction of positive tokens in whose top percentile of latents it falls
                (minus the same fraction over negative tokens)
"""

from __future__ import annotations

import numpy as np

from saejax.errors import SaejaxError


def rank_latents(pos: np.ndarray, neg: np.ndarray | None, percentile: float = 1.0) -> dict:
    """pos [n_pos, d_sae], neg [n_neg, d_sae] latent activations of tokens → both scores."""
    both = pos if neg is None or len(neg) == 0 else np.concatenate([pos, neg])
    scale = np.maximum(both.max(axis=0), 1e-12)
    contrast = (pos / scale).mean(axis=0)
    d_sae = pos.shape[1]
    top_n = max(1, int(round(d_sae * percentile / 100.0)))

    def share(acts):
        top = np.argpartition(-acts, top_n - 1, axis=1)[:, :top_n]
        in_top = np.zeros_like(acts, dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        in_top &= acts > 0
        return in_top.mean(axis=0)

    top_share = share(pos)
    if neg is not None and len(neg):
        contrast = contrast - (neg / scale).mean(axis=0)
        top_share = top_share - share(neg)
    return {"contrast": contrast, "top_share": top_share}


def token_latents(loaded, sae, point, prompts: list[str]) -> np.ndarray:
    """SAE activations [tokens, d_sae] of every non-BOS token of the prompts."""
    import torch

    from extract.hooks import Capture

    tok, out = loaded.tokenizer, []
    with Capture(loaded.model, [point]) as capture, torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            skip = 0
            if tok.bos_token_id is not None:
                if not ids or ids[0] != tok.bos_token_id:
                    ids = [tok.bos_token_id] + ids
                skip = 1
            inputs = torch.tensor([ids], device=loaded.device)
            acts = capture.run(inputs)[point.name][0, skip:].float().cpu().numpy()
            if len(acts):
                out.append(np.asarray(sae.encode(acts)))
    if not out:
        raise SaejaxError("the prompts have no tokens")
    return np.concatenate(out)


def _examples_printer(run: str, sae, store_path: str | None, n: int = 3):
    """Prints a latent's top store examples when `saejax features RUN` has been run."""
    from extract.models import load_tokenizer
    from saejax.interp.contexts import marked_context
    from saejax.interp.eval import resolve_run_store
    from saejax.interp.features import examples_key, read_examples_cache

    try:
        store, hook = resolve_run_store(run, sae, store_path)
    except SaejaxError:
        store = None
    result = None
    if store is not None:
        key = examples_key(run, store, hook, 1, 1, len(store))
        wanted = {name: key[name] for name in ("store", "n_tokens", "hook", "sae")}
        result = read_examples_cache(run, wanted)
    if result is None:
        print(f"(run `saejax features {run}` to see each latent's top examples here)")
        return lambda latent: None
    tok = load_tokenizer(store.meta)

    def show(latent: int) -> None:
        for value, row in list(zip(result["top_vals"][latent], result["top_rows"][latent]))[:n]:
            if row < 0 or value <= 0:
                continue
            ids, at = store.context(int(row), before=10, after=2)
            print(f"      {value:8.3f}  {marked_context(tok, ids, at)}")

    return show


def search(
    run: str,
    positive: list[str],
    negative: list[str] = (),
    top: int = 10,
    percentile: float = 1.0,
    model: str | None = None,
    store_path: str | None = None,
    device: str | None = None,
    model_dtype: str | None = None,
) -> dict:
    """Rank the SAE's latents on the prompts and print both rankings with their examples;
    returns the scores. The model runs on `device` in `model_dtype` (None: the defaults)."""
    from extract.models import resolve_device, resolve_model_dtype
    from saejax.interp.lm import model_at_hook
    from saejax.train.sae_files import load_sae

    positive = [p for p in positive if p.strip()]
    negative = [p for p in negative if p.strip()]
    if not positive:
        raise SaejaxError("give at least one non-empty --positive prompt")
    if not 0 < percentile <= 100:
        raise SaejaxError(f"--percentile must be in (0, 100], got {percentile:g}")
    if top < 1:
        raise SaejaxError(f"--top must be at least 1, got {top}")
    device = resolve_device(device)
    model_dtype = resolve_model_dtype(model_dtype, device)
    sae = load_sae(run)
    loaded, point = model_at_hook(sae, model, model_dtype, device)
    pos = token_latents(loaded, sae, point, positive)
    neg = token_latents(loaded, sae, point, negative) if negative else None
    scores = rank_latents(pos, neg, percentile)
    examples = _examples_printer(run, sae, store_path)
    for name, label in (
        ("contrast", "normalised mean activation, positive − negative"),
        ("top_share", f"share of tokens with the latent in their top {percentile:g}%"),
    ):
        order = np.argsort(-scores[name])[:top]
        print(f"by {label}:")
        for latent in order:
            print(
                f"  latent {int(latent):>7}  {scores[name][latent]:+.4f}   "
                f"(max on positives {pos[:, latent].max():.3f})"
            )
            examples(int(latent))
    return scores
