"""`saejax steer`: generate with a latent's decoder direction added (or the latent clamped).

At the SAE's hook, at every position, the activation x becomes
    boost:  x + boost · d_i
    clamp:  x + (value − f_i(x)) · d_i      (the latent set to `value`, the rest untouched)
where d_i is latent i's decoder row in the model's own activation units (unit norm; the
SAE's input scaling is folded in) and f_i(x) its activation. Greedy decoding, so the
steered and unsteered texts differ only by the intervention.
"""

from __future__ import annotations

import sys

import numpy as np

from saejax.errors import SaejaxError


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with a latent's direction added or clamped")
    p.add_argument("run", help="run directory or SAE folder")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--boost", type=float, default=None, help="add boost × the decoder direction")
    p.add_argument("--clamp", type=float, default=None, help="set the latent to this value")
    p.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    p.add_argument("--model", default=None, help="model (default: the SAE's)")
    p.set_defaults(func=_cmd_steer)


def decoder_direction(sae, latent: int) -> np.ndarray:
    if not 0 <= latent < sae.spec.d_sae:
        raise SaejaxError(f"latent {latent} is out of range: the SAE has latents 0..{sae.spec.d_sae - 1}")
    row = np.asarray(sae.params["W_dec"][latent], np.float32)
    return row / max(float(np.linalg.norm(row)), 1e-12)


def intervention(sae, latent: int, boost: float | None, clamp: float | None):
    """A function tensor [B, T, d] → tensor, for `extract.hooks.Splice`."""
    import torch

    direction = decoder_direction(sae, latent)
    scale = float(np.linalg.norm(np.asarray(sae.params["W_dec"][latent])))

    def apply(t):
        d = torch.from_numpy(direction).to(t.dtype)
        if clamp is None:
            return t + boost * d
        flat = t.detach().float().cpu().numpy().reshape(-1, t.shape[-1])
        f = np.asarray(sae.encode(flat))[:, latent].reshape(t.shape[:-1])
        delta = torch.from_numpy((clamp - f).astype(np.float32) * scale).to(t.dtype)
        return t + delta[..., None] * d
    return apply


def generate(loaded, prompt: str, n_tokens: int, point=None, fn=None) -> tuple[list[int], list]:
    """Greedy continuation (token ids) and the next-token log-probabilities at each step."""
    import torch

    from extract.hooks import Splice

    tok, model = loaded.tokenizer, loaded.model
    ids = tok(prompt)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    steps = []
    with torch.inference_mode():
        ctx = Splice(model, point, fn) if fn is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for _ in range(n_tokens):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                logp = torch.log_softmax(logits.float(), -1)
                steps.append(logp.numpy())
                ids.append(int(logp.argmax()))
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return ids, steps


def _cmd_steer(args) -> int:
    from extract.hooks import parse_hooks, validate_hooks
    from extract.models import load_model
    from saejax.saved import load_sae

    if (args.boost is None) == (args.clamp is None):
        raise SaejaxError("give exactly one of --boost or --clamp")
    prompts = [p for p in args.prompt if p.strip()]
    if not prompts:
        raise SaejaxError("--prompt is empty")
    sae = load_sae(args.run)
    decoder_direction(sae, args.latent)  # range check before loading the model
    hook = sae.info.get("hook") or (sae.info.get("metadata") or {}).get("hook_name")
    from extract.models import BUILTIN_MODEL, BUILTIN_MODEL_ID

    recorded = sae.info.get("model_spec") or sae.info.get("model")
    model_name = args.model or (BUILTIN_MODEL if recorded == BUILTIN_MODEL_ID else recorded)
    if not hook or not model_name:
        raise SaejaxError("the SAE does not record its hook and model; pass --model")
    loaded = load_model(model_name)
    point = parse_hooks(hook)[0]
    validate_hooks([point], loaded.model)
    fn = intervention(sae, args.latent, args.boost, args.clamp)
    what = f"boost {args.boost:+g}" if args.boost is not None else f"clamp {args.clamp:g}"
    for prompt in prompts:
        plain, _ = generate(loaded, prompt, args.tokens)
        steered, _ = generate(loaded, prompt, args.tokens, point, fn)
        n = len(plain) - args.tokens
        print(f"prompt       {prompt!r}")
        print(f"unsteered    {loaded.tokenizer.decode(plain[n:])!r}")
        print(f"latent {args.latent} {what}: {loaded.tokenizer.decode(steered[n:])!r}")
        print()
    sys.stdout.flush()
    return 0
