"""`saejax steer`: generate with a latent's decoder direction added (or the latent clamped).

At the SAE's hook, at every position, the activation x becomes
    boost:  x + boost · d_i
    clamp:  x + (value − f_i(x)) · d_i      (the latent set to `value`, the rest untouched)
where d_i is latent i's decoder row in the model's own activation units (unit norm; the
SAE's input scaling is folded in) and f_i(x) its activation. Greedy decoding, so the
steered and unsteered texts differ only by the intervention.

A transcoder writes to its target hook (the MLP output, say) from its input hook: the edit is
made at the target, with f_i read from the input hook of the same forward pass (the MLP's
own output stays in place; the edit is added to it).
"""

from __future__ import annotations

import numpy as np

from saejax.errors import SaejaxError


def decoder_direction(sae, latent: int) -> np.ndarray:
    if not 0 <= latent < sae.spec.d_sae:
        raise SaejaxError(
            f"latent {latent} is out of range: the SAE has latents 0..{sae.spec.d_sae - 1}"
        )
    row = np.asarray(sae.params["W_dec"][latent], np.float32)
    return row / max(float(np.linalg.norm(row)), 1e-12)


def intervention(sae, latent: int, boost: float | None, clamp: float | None):
    """A function tensor [B, T, d] → tensor, for `extract.hooks.Splice` (an SAE: it reads and
    writes the same hook)."""
    edit = transcoder_intervention(sae, latent, boost, clamp)
    return lambda t: edit(t, t)


def transcoder_intervention(sae, latent: int, boost: float | None, clamp: float | None):
    """A function (x, t) → t edited, for `extract.hooks.SpliceFrom`: x the activation at the
    input hook (what the latent is read from), t at the hook the decoder writes to."""
    import torch

    direction = decoder_direction(sae, latent)
    scale = float(np.linalg.norm(np.asarray(sae.params["W_dec"][latent])))

    def apply(x, t):
        # the SAE runs in JAX on float32 host arrays; what it adds goes where t lives
        d = torch.from_numpy(direction).to(device=t.device, dtype=t.dtype)
        if clamp is None:
            return t + boost * d
        flat = x.detach().float().cpu().numpy().reshape(-1, x.shape[-1])
        f = np.asarray(sae.encode(flat))[:, latent].reshape(t.shape[:-1])
        delta = torch.from_numpy((clamp - f).astype(np.float32) * scale)
        return t + delta.to(device=t.device, dtype=t.dtype)[..., None] * d

    return apply


def generate(
    loaded, prompt: str, n_tokens: int, point=None, fn=None, source=None
) -> tuple[list[int], list]:
    """Greedy continuation (token ids) and the next-token log-probabilities at each step, with
    `fn` spliced in at `point` (fn(t); with a `source` point: fn(x at source, t))."""
    import torch

    from extract.hooks import Splice, SpliceFrom

    tok, model = loaded.tokenizer, loaded.model
    ids = tok(prompt)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    steps = []
    with torch.inference_mode():
        ctx = None
        if fn is not None:
            ctx = (
                Splice(model, point, fn) if source is None else SpliceFrom(model, source, point, fn)
            )
        if ctx is not None:
            ctx.__enter__()
        try:
            for _ in range(n_tokens):
                inputs = torch.tensor([ids], device=loaded.device)
                logits = model(input_ids=inputs, use_cache=False).logits[0, -1]
                logp = torch.log_softmax(logits.float(), -1).cpu()
                steps.append(logp.numpy())
                ids.append(int(logp.argmax()))
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return ids, steps


def steer(
    run: str,
    latent: int,
    prompts: list[str],
    boost: float | None = None,
    clamp: float | None = None,
    n_tokens: int = 24,
    model: str | None = None,
    device: str | None = None,
    model_dtype: str | None = None,
) -> list[dict]:
    """For each prompt, the greedy continuation without and with the intervention, the
    model on `device` in `model_dtype` (None: the defaults of extract.models.resolve_device)."""
    from extract.models import resolve_device, resolve_model_dtype
    from saejax.interp.lm import model_at_hook
    from saejax.train.sae_files import load_sae

    if (boost is None) == (clamp is None):
        raise SaejaxError("give exactly one of --boost or --clamp")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise SaejaxError("--prompt is empty")
    device = resolve_device(device)
    model_dtype = resolve_model_dtype(model_dtype, device)
    sae = load_sae(run)
    decoder_direction(sae, latent)  # range check before loading the model
    loaded, point = model_at_hook(sae, model, model_dtype, device)
    target = target_point(sae, loaded)
    if target is None:
        where = dict(point=point, fn=intervention(sae, latent, boost, clamp))
    else:
        fn = transcoder_intervention(sae, latent, boost, clamp)
        where = dict(point=target, fn=fn, source=point)
    results = []
    for prompt in prompts:
        plain, _ = generate(loaded, prompt, n_tokens)
        steered, _ = generate(loaded, prompt, n_tokens, **where)
        n = len(plain) - n_tokens
        results.append(
            {
                "prompt": prompt,
                "unsteered": loaded.tokenizer.decode(plain[n:]),
                "steered": loaded.tokenizer.decode(steered[n:]),
            }
        )
    return results


def target_point(sae, loaded):
    """A transcoder's target hook point, checked on the model and against its input hook
    (None for an SAE)."""
    from extract.hooks import parse_hooks, validate_hooks
    from saejax.interp.eval import check_transcoder_hooks
    from saejax.interp.lm import hook_of

    target_hook = sae.info.get("target_hook")
    if not target_hook:
        return None
    check_transcoder_hooks(hook_of(sae.info), target_hook)
    target = parse_hooks(target_hook)[0]
    validate_hooks([target], loaded.model)
    return target
