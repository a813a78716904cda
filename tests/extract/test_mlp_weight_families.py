"""Llama-style MLP weights for analysis/: the norm folded into W_in (= up_proj) is the one the
MLP reads, with Gemma's 1 + weight scale; families without a known layout are refused."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analysis.weights import process_weights  # noqa: E402
from extract.analysis_io import mlp_weights  # noqa: E402
from saejax.errors import SaejaxError  # noqa: E402

SMALL = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# the module whose output the residual stream receives from the MLP, per family
CONFIGS = {
    "llama": (lambda: transformers.LlamaConfig(**SMALL), "mlp"),
    "gemma": (lambda: transformers.GemmaConfig(**SMALL, head_dim=4), "mlp"),
    "gemma2": (
        lambda: transformers.Gemma2Config(**SMALL, head_dim=4, sliding_window=4),
        "post_feedforward_layernorm",
    ),
}


def random_model(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=gen))
    return model


@pytest.mark.parametrize("family", list(CONFIGS))
def test_folded_up_projection_reproduces_the_mlp(family):
    """rms_normalise(x) @ W_in, with the processed weights, equals what up_proj computes,
    x being what the MLP's norm reads: the block output minus the MLP's contribution."""
    make_config, mlp_out = CONFIGS[family]
    model = random_model(make_config())
    processed = process_weights(mlp_weights(model))
    seen, handles = {}, []
    for layer, block in enumerate(model.model.layers):

        def keep(key):
            return lambda m, a, out: seen.__setitem__(key, out.detach().clone())

        handles += [
            block.register_forward_hook(keep(("out", layer))),
            getattr(block, mlp_out).register_forward_hook(keep(("mlp", layer))),
            block.mlp.up_proj.register_forward_hook(keep(("up", layer))),
        ]
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for layer in range(processed.n_layers):
        x = (seen[("out", layer)] - seen[("mlp", layer)]).double()
        normalised = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
        np.testing.assert_allclose(
            normalised.numpy() @ processed.w_in[layer],
            seen[("up", layer)].double().numpy(),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "config",
    [
        lambda: transformers.Olmo2Config(**SMALL),  # its post_attention_layernorm follows attention
        lambda: transformers.Phi3Config(**SMALL),  # fused gate_up_proj
    ],
    ids=["olmo2", "phi3"],
)
def test_a_family_without_a_known_layout_is_refused(config):
    model = transformers.AutoModelForCausalLM.from_config(config())
    with pytest.raises(SaejaxError, match=f"model type '{model.config.model_type}'"):
        mlp_weights(model)
