"""Pulling MLP weights and MLP pre-activations out of transformers models for analysis/.

Layouts (the norm that feeds the MLP, the input projection, the output projection):
    GPT-2, GPT-Neo   ln_2, mlp.c_fc, mlp.c_proj          (GPT-2 Conv1D stores [in, out])
    GPT-J            ln_1 (parallel block, shared), mlp.fc_in, mlp.fc_out
    GPT-NeoX         post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h; the MLP
                     reads post_attention_layernorm with the parallel residual (Pythia) too:
                     of the residual then, not of residual + attention
    Llama, Mistral,  post_attention_layernorm (RMSNorm), mlp.up_proj (W_in, as in
    Qwen2            TransformerLens), mlp.down_proj; no biases
    Gemma, Gemma 2   as Llama, but the RMSNorm scales by 1 + weight, and Gemma 2's MLP
                     reads pre_feedforward_layernorm
Other families are refused: a guessed norm (OLMo 2's post_attention_layernorm comes after
the attention, not before the MLP) would be folded into W_in silently.
"""

from __future__ import annotations

import numpy as np

from analysis.weights import MLPWeights
from extract.hooks import Capture, find_blocks, parse_hooks
from saejax.errors import SaejaxError


def _linear(module) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight as [in, out], bias) of an nn.Linear or a GPT-2 Conv1D, in float32."""
    weight = module.weight.detach().float().cpu().numpy()
    if type(module).__name__ != "Conv1D":
        weight = weight.T
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else bias.detach().float().cpu().numpy()


def _norm(module, plus_one: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scale, bias) of a norm; `plus_one` for Gemma's RMSNorm, which scales by 1 + weight."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    scale = None if w is None else w.detach().float().cpu().numpy() + (1.0 if plus_one else 0.0)
    return scale, None if b is None else b.detach().float().cpu().numpy()


_LLAMA_TYPES = ("llama", "mistral", "qwen2")


def _block_parts(block, model_type: str):
    """(arch, norm feeding the MLP, whether it scales by 1 + weight, W_in module, W_out module)."""
    mlp = block.mlp
    if model_type in ("gpt2", "gpt_neo"):
        return model_type, block.ln_2, False, mlp.c_fc, mlp.c_proj
    if model_type == "gptj":
        return "gptj", block.ln_1, False, mlp.fc_in, mlp.fc_out
    if model_type == "gpt_neox":  # both residual layouts: mlp(post_attention_layernorm(...))
        return (
            "gpt_neox",
            block.post_attention_layernorm,
            False,
            mlp.dense_h_to_4h,
            mlp.dense_4h_to_h,
        )
    if model_type in _LLAMA_TYPES:
        return "llama-style", block.post_attention_layernorm, False, mlp.up_proj, mlp.down_proj
    if model_type == "gemma":
        return "llama-style", block.post_attention_layernorm, True, mlp.up_proj, mlp.down_proj
    if model_type == "gemma2":
        return "llama-style", block.pre_feedforward_layernorm, True, mlp.up_proj, mlp.down_proj
    raise SaejaxError(
        f"no MLP weight layout known for model type '{model_type}' (known: gpt2, "
        f"gpt_neo, gptj, gpt_neox, {', '.join(_LLAMA_TYPES)}, gemma, gemma2)"
    )


def mlp_weights(model) -> MLPWeights:
    """Stack every layer's MLP weights (unprocessed) from a transformers causal LM."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    layers = {k: [] for k in ("w_in", "b_in", "w_out", "b_out", "ln_w", "ln_b")}
    arch = model_type
    for block in find_blocks(model):
        arch, norm, plus_one, up, down = _block_parts(block, model_type)
        w_in, b_in = _linear(up)
        w_out, b_out = _linear(down)
        ln_w, ln_b = _norm(norm, plus_one)
        for key, value in zip(layers, (w_in, b_in, w_out, b_out, ln_w, ln_b)):
            layers[key].append(value)

    def stack(key):
        values = layers[key]
        return None if any(v is None for v in values) else np.stack(values)

    return MLPWeights(arch=arch, **{k: stack(k) for k in layers})


def last_token_mlp_pre(loaded, prompts: list[str], progress: bool = False) -> np.ndarray:
    """MLP pre-activations (blocks.L.mlp.hook_pre) at each prompt's last token: [L, N, d_mlp].

    One prompt per forward pass, so the last token is the last real one (no padding);
    BOS is prepended when the tokenizer has one and did not add it, as TransformerLens does.
    """
    import torch
    from tqdm import tqdm

    model, tokenizer = loaded.model, loaded.tokenizer
    n_layers = len(find_blocks(model))
    points = parse_hooks([f"blocks.{layer}.mlp.hook_pre" for layer in range(n_layers)])
    bos = tokenizer.bos_token_id
    limit = loaded.max_context or 2048
    out = None
    with Capture(model, points) as capture, torch.inference_mode():
        for i, prompt in enumerate(tqdm(prompts, desc="prompts", disable=not progress)):
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if len(ids) > limit:  # keep BOS and the end of the prompt
                ids = ids[:1] + ids[len(ids) - limit + 1 :]
            captured = capture.run(torch.tensor([ids], device=loaded.device))
            for layer, p in enumerate(points):
                vec = captured[p.name][0, -1].float().cpu().numpy()
                if out is None:
                    out = np.zeros((n_layers, len(prompts), vec.shape[0]), np.float32)
                out[layer, i] = vec
    return out
