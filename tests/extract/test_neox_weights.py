"""GPT-NeoX MLP weights for analysis/ (issue 17): the MLP reads post_attention_layernorm
with the parallel residual (every Pythia) as with the sequential one, so that is the norm
folded into W_in. Checked against plain loops over the HF modules and against the MLP's own
pre-activations in a forward pass."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analysis.weight_stats import weight_statistics  # noqa: E402
from analysis.weights import process_weights  # noqa: E402
from extract.analysis_io import mlp_weights  # noqa: E402


def random_neox(parallel: bool):
    """A tiny GPT-NeoX with every weight, bias and LayerNorm parameter random."""
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        use_parallel_residual=parallel,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # norm scales around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.1)
        for block in model.gpt_neox.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.add_(1.0)
    return model


def plain_p(model):
    """p[l][j] = ‖centred(ln.w ⊙ W_in[:, j])‖₂ · (b_in[j] + Σ_d W_in[d, j] ln.b[d]) by loops,
    with ln the module the MLP reads, post_attention_layernorm (transformers' GPTNeoXLayer)."""
    out = []
    for block in model.gpt_neox.layers:
        ln = block.post_attention_layernorm
        lnw, lnb = ln.weight.double().tolist(), ln.bias.double().tolist()
        w = block.mlp.dense_h_to_4h.weight.double().tolist()  # nn.Linear: [d_mlp, d_model]
        b = block.mlp.dense_h_to_4h.bias.double().tolist()
        layer = []
        for j in range(len(w)):
            col = [w[j][d] * lnw[d] for d in range(len(lnw))]
            mean = sum(col) / len(col)
            norm = math.sqrt(sum((c - mean) ** 2 for c in col))
            layer.append(norm * (b[j] + sum(w[j][d] * lnb[d] for d in range(len(lnb)))))
        out.append(layer)
    return out


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_neox_weight_statistic_matches_plain_loops(parallel):
    model = random_neox(parallel)
    stats = weight_statistics(process_weights(mlp_weights(model)))
    np.testing.assert_allclose(stats["p"], plain_p(model), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_folded_weights_reproduce_the_mlp_pre_activations(parallel):
    """normalise(x) @ W_in + b_in, with the processed weights, equals what dense_h_to_4h
    computes, x being the residual the MLP reads: the block input with the parallel
    residual, the block input plus the attention output with the sequential one."""
    model = random_neox(parallel)
    processed = process_weights(mlp_weights(model))
    seen, handles = {}, []

    def block_input(m, args, kwargs, l):
        seen[("in", l)] = (args[0] if args else kwargs["hidden_states"]).clone()

    for layer, block in enumerate(model.gpt_neox.layers):
        handles += [
            block.register_forward_pre_hook(
                lambda m, args, kwargs, l=layer: block_input(m, args, kwargs, l), with_kwargs=True
            ),
            block.attention.register_forward_hook(
                lambda m, a, out, l=layer: seen.__setitem__(("attn", l), out[0].clone())
            ),
            block.mlp.dense_h_to_4h.register_forward_hook(
                lambda m, a, out, l=layer: seen.__setitem__(("pre", l), out.clone())
            ),
        ]
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    eps = model.config.layer_norm_eps
    for layer in range(processed.n_layers):
        x = seen[("in", layer)].double()
        if not parallel:
            x = x + seen[("attn", layer)].double()
        normalised = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + eps
        )
        predicted = normalised.numpy() @ processed.w_in[layer] + processed.b_in[layer]
        np.testing.assert_allclose(
            predicted, seen[("pre", layer)].double().numpy(), rtol=1e-4, atol=1e-4
        )
