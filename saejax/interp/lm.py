"""The language model an SAE belongs to: one rule for which model, one cache of it.

eval, steer, search and the dashboard all ask here, so an SAE is always read against the
same model: the one named on the command line, else the one its store was extracted with
(the extraction's own model argument, so 'builtin' stays the built-in GGUF file), else the
model id recorded in the SAE.
"""

from __future__ import annotations

from saejax.errors import SaejaxError

_CACHE: dict = {}  # the last model loaded, reused by consecutive evaluations (sweeps, demo)


def model_for(
    sae_info: dict, store_meta: dict | None = None, override: str | None = None
) -> tuple[str, str | None]:
    """(model name or path, revision) for an SAE, by the rule in the module docstring."""
    from extract.models import BUILTIN_MODEL, BUILTIN_MODEL_ID

    meta = store_meta or {}
    extracted = meta.get("extract_config") or {}
    if override:
        return override, None
    name = (
        sae_info.get("model_spec")
        or extracted.get("model")
        or sae_info.get("model")
        or meta.get("model")
        or (sae_info.get("metadata") or {}).get("model_name")
    )
    if not name:
        raise SaejaxError("the SAE does not record which model it came from; pass --model")
    return (BUILTIN_MODEL if name == BUILTIN_MODEL_ID else name), extracted.get("revision")


def load_cached(
    name: str, revision: str | None = None, dtype: str | None = None, device: str | None = None
):
    """extract.models.load_model, keeping the last model loaded for the next call.

    `device` / `dtype` None take the defaults (the GPU in bfloat16 when torch sees one, else
    the CPU in float32); the cache is keyed by the resolved values, so a model is never
    reused on another device or in another dtype.
    """
    from extract.models import load_model, resolve_device, resolve_model_dtype

    device = resolve_device(device)
    dtype = resolve_model_dtype(dtype, device)
    key = (name, revision, dtype, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_model(name, revision=revision, dtype=dtype, device=device)
    return _CACHE[key]


def model_at_hook(
    sae, override: str | None = None, dtype: str | None = None, device: str | None = None
):
    """(loaded model, hook point): the SAE's language model (on `device` in `dtype`, None: the
    defaults), with the SAE's hook checked on it."""
    from extract.hooks import parse_hooks, validate_hooks

    hook = hook_of(sae.info)
    if not hook:
        raise SaejaxError("the SAE does not record which hook it was trained on")
    loaded = load_cached(*model_for(sae.info, override=override), dtype, device)
    point = parse_hooks(hook)[0]
    validate_hooks([point], loaded.model)
    return loaded, point


def hook_of(sae_info: dict) -> str | None:
    """The hook point an SAE was trained on (saejax's record or SAELens's metadata)."""
    return sae_info.get("hook") or (sae_info.get("metadata") or {}).get("hook_name")
