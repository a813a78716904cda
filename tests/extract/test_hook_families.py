"""Every hook kind, per model family, against a plain PyTorch reference (issue 17).

The reference shares no code with extract/hooks.py: transformers' own hidden states, plain
forward hooks registered here on the modules named in REF below, and identities of the
residual stream (attn_out + mlp_out = resid_post - resid_pre; for sequential blocks the
input of the norm that feeds the MLP is resid_pre + attn_out). Every norm weight and bias
is random, so a point taken on the wrong side of a norm differs.

The MLP-input points (issue 21, for transcoders) are checked the same way: hook_resid_mid is
the input of the norm that feeds the MLP and equals resid_pre + attn_out; ln2.hook_normalized
is what the MLP's first projection receives. Families whose blocks have no such point (parallel
attention and MLP, post-norm) refuse them in one line.
"""

import functools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from extract.hooks import (  # noqa: E402
    Capture,
    Splice,
    SpliceFrom,
    hook_width,
    parse_hooks,
    validate_hooks,
)
from saejax.errors import SaejaxError  # noqa: E402

N_LAYERS, VOCAB = 3, 64
KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre")
MLP_INPUT_KINDS = ("hook_resid_mid", "ln2.hook_normalized")
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA_LIKE = dict(SMALL, num_key_value_heads=2)


def _configs():
    t = transformers
    special = dict(bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": t.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
            n_inner=48,
            **special,
        ),
        "gpt_neo": t.GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=N_LAYERS,
            num_heads=4,
            intermediate_size=48,
            window_size=4,
            attention_types=[[["global", "local", "global"], 1]],
            max_position_embeddings=64,
            **special,
        ),
        "gptj": t.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
            rotary_dim=4,
            n_inner=48,
            **special,
        ),
        "gpt_neox_parallel": t.GPTNeoXConfig(**SMALL, use_parallel_residual=True),
        "gpt_neox_sequential": t.GPTNeoXConfig(**SMALL, use_parallel_residual=False),
        "llama": t.LlamaConfig(**LLAMA_LIKE),
        "mistral": t.MistralConfig(**LLAMA_LIKE),
        "qwen2": t.Qwen2Config(**LLAMA_LIKE),
        "gemma": t.GemmaConfig(**LLAMA_LIKE, head_dim=8),
        "gemma2": t.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=4),
        "phi3": t.Phi3Config(**LLAMA_LIKE),
        "opt": t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            do_layer_norm_before=True,
            enable_bias=True,
            pad_token_id=0,
        ),
        "opt_post_norm": t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            do_layer_norm_before=False,
            pad_token_id=0,
        ),
        "falcon_parallel": t.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            parallel_attn=True,
            bias=True,
            **special,
        ),
        "falcon_new_architecture": t.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            **special,
        ),
        "falcon_sequential": t.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            parallel_attn=False,
            bias=True,
            alibi=True,
            **special,
        ),
    }


# The plain reference, per family, relative to a block: the module whose output the residual
# stream receives from attention / from the MLP, the norm whose input is resid_pre + attn_out
# (sequential blocks only), the MLP input projection and how many leading output rows are the
# pre-activation (Phi-3 fuses gate and up), and for post-norm blocks the two norms.
_LLAMA_REF = dict(attn="self_attn", mlp="mlp", mid="post_attention_layernorm", up="mlp.gate_proj")
REF = {
    "gpt2": dict(blocks="transformer.h", attn="attn", mlp="mlp", mid="ln_2", up="mlp.c_fc"),
    "gpt_neo": dict(blocks="transformer.h", attn="attn", mlp="mlp", mid="ln_2", up="mlp.c_fc"),
    "gptj": dict(blocks="transformer.h", attn="attn", mlp="mlp", mid=None, up="mlp.fc_in"),
    "gpt_neox_parallel": dict(  # the MLP has a norm of its own, of the block input
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mid=None,
        up="mlp.dense_h_to_4h",
        mlp_norm="post_attention_layernorm",
    ),
    "gpt_neox_sequential": dict(
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mid="post_attention_layernorm",
        up="mlp.dense_h_to_4h",
    ),
    "llama": dict(blocks="model.layers", **_LLAMA_REF),
    "mistral": dict(blocks="model.layers", **_LLAMA_REF),
    "qwen2": dict(blocks="model.layers", **_LLAMA_REF),
    "gemma": dict(blocks="model.layers", **_LLAMA_REF),
    "gemma2": dict(
        blocks="model.layers",
        attn="post_attention_layernorm",
        mlp="post_feedforward_layernorm",
        mid="pre_feedforward_layernorm",
        up="mlp.gate_proj",
    ),
    "phi3": dict(blocks="model.layers", **dict(_LLAMA_REF, up="mlp.gate_up_proj"), gate_rows=48),
    "opt": dict(
        blocks="model.decoder.layers", attn="self_attn", mlp="fc2", mid="final_layer_norm", up="fc1"
    ),
    "opt_post_norm": dict(
        blocks="model.decoder.layers",
        attn="self_attn",
        mlp="fc2",
        mid=None,
        up="fc1",
        post_norms=("self_attn_layer_norm", "final_layer_norm"),
    ),
    "falcon_parallel": dict(
        blocks="transformer.h", attn="self_attention", mlp="mlp", mid=None, up="mlp.dense_h_to_4h"
    ),
    "falcon_new_architecture": dict(
        blocks="transformer.h", attn="self_attention", mlp="mlp", mid=None, up="mlp.dense_h_to_4h"
    ),
    "falcon_sequential": dict(
        blocks="transformer.h",
        attn="self_attention",
        mlp="mlp",
        mid="post_attention_layernorm",
        up="mlp.dense_h_to_4h",
    ),
}
FAMILIES = list(REF)


def mlp_input_kinds(ref) -> tuple:
    """The MLP-input points a family has: both in sequential pre-norm blocks, the normalised
    input alone where a parallel block's MLP has a norm of its own (Pythia)."""
    if ref["mid"]:
        return MLP_INPUT_KINDS
    return ("ln2.hook_normalized",) if ref.get("mlp_norm") else ()


def mlp_norm(ref):
    return ref["mid"] or ref.get("mlp_norm")


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


@functools.cache
def tiny_model(family):
    """A tiny random `family` model whose every norm weight and bias and every bias is random."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _configs()[family], attn_implementation="eager"
    ).eval()
    gen = torch.Generator().manual_seed(1)
    norms = 0
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            norms += is_norm
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if is_norm and name == "weight":
                    p.copy_(p + 0.5 * noise)  # around 1 (or 0 for Gemma's 1 + w)
                elif name == "bias":
                    p.copy_(0.3 * noise)
    assert norms >= N_LAYERS + 1, "every block's norms must be randomised"
    return model


def _ids():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))


def _rows(t, ids):
    """[batch, positions, d] from a tensor that may come flattened (OPT's MLP rows)."""
    return t.reshape(*ids.shape, t.shape[-1])


def _reference(model, ref, ids):
    """Plain forward hooks on the modules of REF, plus transformers' hidden states."""
    blocks = _get(model, ref["blocks"])
    seen, handles = {}, []

    def keep(key, fn):
        return lambda module, args, out: seen.__setitem__(key, fn(args, out).detach().clone())

    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    for layer, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda m, args, kwargs, layer=layer: seen.__setitem__(
                    ("in", layer), (args[0] if args else kwargs["hidden_states"]).clone()
                ),
                with_kwargs=True,
            )
        )
        handles.append(block.register_forward_hook(keep(("out", layer), lambda a, o: first(o))))
        handles.append(
            _get(block, ref["attn"]).register_forward_hook(
                keep(("attn", layer), lambda a, o: first(o))
            )
        )
        handles.append(
            _get(block, ref["mlp"]).register_forward_hook(
                keep(("mlp", layer), lambda a, o: first(o))
            )
        )
        handles.append(
            _get(block, ref["up"]).register_forward_hook(keep(("up_in", layer), lambda a, o: a[0]))
        )
        if ref["mid"]:
            handles.append(
                _get(block, ref["mid"]).register_forward_hook(
                    keep(("mid", layer), lambda a, o: a[0])
                )
            )
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    seen = {k: _rows(v, ids) for k, v in seen.items()}
    for layer, block in enumerate(blocks):  # the pre-activation from the weights themselves
        up = _get(block, ref["up"])
        w = up.weight if type(up).__name__ == "Conv1D" else up.weight.T
        pre = seen[("up_in", layer)] @ w
        if up.bias is not None:
            pre = pre + up.bias
        seen[("pre", layer)] = pre[..., : ref.get("gate_rows", pre.shape[-1])]
    return seen, out.hidden_states, out.logits


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_equals_the_plain_reference(family):
    model, ref, ids = tiny_model(family), REF[family], _ids()
    kinds = KINDS + mlp_input_kinds(ref)
    names = [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS) for kind in kinds]
    points = parse_hooks(names)
    validate_hooks(points, model)
    with Capture(model, points, stop_early=False) as capture, torch.no_grad():
        got = capture.run(ids)
    seen, hidden, _ = _reference(model, ref, ids)
    for layer in range(N_LAYERS):
        g = {kind: got[f"blocks.{layer}.{kind}"] for kind in kinds}
        pre, post = seen[("in", layer)], seen[("out", layer)]
        _close(pre, hidden[layer], f"{family}: block {layer} input vs hidden_states")
        if layer < N_LAYERS - 1:  # the last hidden state has the final norm applied
            _close(post, hidden[layer + 1], f"{family}: block {layer} output vs hidden_states")
        _close(g["hook_resid_pre"], pre, f"{family} L{layer} resid_pre")
        _close(g["hook_resid_post"], post, f"{family} L{layer} resid_post")
        _close(g["hook_attn_out"], seen[("attn", layer)], f"{family} L{layer} attn_out")
        _close(g["hook_mlp_out"], seen[("mlp", layer)], f"{family} L{layer} mlp_out")
        _close(g["mlp.hook_pre"], seen[("pre", layer)], f"{family} L{layer} mlp.hook_pre")
        if "ln2.hook_normalized" in g:  # what the MLP's first projection reads
            _close(g["ln2.hook_normalized"], seen[("up_in", layer)], f"{family} L{layer} ln2")
        if "hook_resid_mid" in g:
            _close(g["hook_resid_mid"], seen[("mid", layer)], f"{family} L{layer} resid_mid")
            _close(g["hook_resid_mid"], pre + g["hook_attn_out"], f"{family} L{layer} mid sum")
        for kind in kinds:
            assert g[kind].shape[-1] == hook_width(parse_hooks(f"blocks.{layer}.{kind}")[0], model)
        block = _get(model, ref["blocks"])[layer]
        if "post_norms" in ref:  # post-norm: resid_post = ln2(ln1(resid_pre + attn) + mlp)
            ln1, ln2 = (_get(block, n) for n in ref["post_norms"])
            with torch.no_grad():
                expected = ln2(ln1(pre + g["hook_attn_out"]) + g["hook_mlp_out"])
            _close(g["hook_resid_post"], expected, f"{family} L{layer} post-norm block")
            continue
        _close(
            g["hook_attn_out"] + g["hook_mlp_out"],
            post - pre,
            f"{family} L{layer} attn_out + mlp_out vs resid_post - resid_pre",
        )
        if ref["mid"]:  # sequential: the MLP's norm reads resid_pre + attn_out
            _close(g["hook_attn_out"], seen[("mid", layer)] - pre, f"{family} L{layer} attn_out")
            _close(g["hook_mlp_out"], post - seen[("mid", layer)], f"{family} L{layer} mlp_out")
    # the truncated forward that extraction uses records the same values
    early = parse_hooks([f"blocks.1.{kind}" for kind in kinds])
    with Capture(model, early) as capture, torch.no_grad():
        truncated = capture.run(ids)
    for p in early:
        _close(truncated[p.name], got[p.name], f"{family} {p.name} truncated forward")


def _edited_logits(model, ref, layer, kind, ids, edit):
    """Logits with `edit` applied to the activation [batch, positions, width] by a plain hook
    registered here (OPT's flattened rows unflattened, Phi-3's gate rows only)."""
    block = _get(model, ref["blocks"])[layer]
    handles = []
    if kind == "hook_resid_pre":

        def edit_input(m, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(edit_input, with_kwargs=True)
    elif kind == "hook_resid_mid":
        # the MLP's norm reads the edited value, and the block's output moves by the same
        # difference (the sum after the MLP reads resid_mid too)
        delta = {}

        def edit_norm_input(m, args):
            new = edit(_rows(args[0], ids)).reshape(args[0].shape)
            delta["d"] = new - args[0]
            return (new, *args[1:])

        def add_delta(m, args, out):
            t = out[0] if isinstance(out, tuple) else out
            new = t + delta["d"].reshape(t.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handles.append(_get(block, ref["mid"]).register_forward_pre_hook(edit_norm_input))
        handle = block.register_forward_hook(add_delta)
    else:
        path = {
            "hook_attn_out": ref["attn"],
            "hook_mlp_out": ref["mlp"],
            "mlp.hook_pre": ref["up"],
            "ln2.hook_normalized": mlp_norm(ref),
        }.get(kind)
        module = block if path is None else _get(block, path)
        rows = ref.get("gate_rows") if kind == "mlp.hook_pre" else None

        def edit_output(m, args, out):
            t = out[0] if isinstance(out, tuple) else out
            new = t.clone()
            if rows:
                new[..., :rows] = edit(_rows(t[..., :rows], ids)).reshape(new[..., :rows].shape)
            else:
                new = edit(_rows(t, ids)).reshape(t.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(edit_output)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in [handle, *handles]:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_matches_the_plain_reference(family):
    """Splicing in a hook's own value changes nothing; zeros, or the value plus a fixed
    perturbation (an SAE reconstruction is not a rescaling a norm would undo), change the
    logits exactly as the same edit made by a plain hook."""
    model, ref, ids = tiny_model(family), REF[family], _ids()
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
    layer = 1
    for kind in KINDS + mlp_input_kinds(ref):
        point = parse_hooks(f"blocks.{layer}.{kind}")[0]
        with Capture(model, [point]) as capture, torch.no_grad():
            own = capture.run(ids)[point.name]
        with Splice(model, point, lambda t: own.clone()), torch.no_grad():
            same = model(input_ids=ids, use_cache=False).logits
        _close(same, clean, f"{family} {point.name} spliced with its own value")
        noise = torch.randn(own.shape, generator=torch.Generator().manual_seed(3))
        for what, edit in (("zeros", torch.zeros_like), ("perturbed", lambda t: t + noise)):
            with Splice(model, point, edit), torch.no_grad():
                spliced = model(input_ids=ids, use_cache=False).logits
            expected = _edited_logits(model, ref, layer, kind, ids, edit)
            assert (expected - clean).abs().max() > 1e-3, f"{family} {point.name}: {what} no-op"
            _close(spliced, expected, f"{family} {point.name} {what}")


def test_an_unknown_family_is_refused_in_one_line():
    config = transformers.Olmo2Config(**LLAMA_LIKE)  # post-norm blocks: a guess would be wrong
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for kind in KINDS:
        point = parse_hooks(f"blocks.0.{kind}")[0]
        for call in (
            lambda: validate_hooks([point], model),
            lambda: hook_width(point, model),
            lambda: Capture(model, [point]).__enter__(),
            lambda: Splice(model, point, torch.zeros_like).__enter__(),
        ):
            with pytest.raises(SaejaxError) as err:
                call()
            message = str(err.value)
            assert "olmo2" in message and point.name in message and "\n" not in message
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", [f for f in FAMILIES if len(mlp_input_kinds(REF[f])) < 2])
def test_mlp_input_points_are_refused_where_the_block_has_none(family):
    """Parallel blocks have no residual stream between attention and MLP, GPT-J's and Falcon's
    MLP reads the attention's own norm output, OPT-350m is post-norm: one line each."""
    model = tiny_model(family)
    kind_name = model.config.model_type

    def n_hooks():  # transformers keeps hooks of its own once hidden states were asked for
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    for kind in MLP_INPUT_KINDS:
        if kind in mlp_input_kinds(REF[family]):
            continue
        point = parse_hooks(f"blocks.1.{kind}")[0]
        for call in (
            lambda: validate_hooks([point], model),
            lambda: Capture(model, [point]).__enter__(),
            lambda: Splice(model, point, torch.zeros_like).__enter__(),
        ):
            with pytest.raises(SaejaxError) as err:
                call()
            message = str(err.value)
            assert kind_name in message and point.name in message and "\n" not in message
            assert "refused" in message
    assert n_hooks() == before


@pytest.mark.parametrize("family", [f for f in FAMILIES if mlp_input_kinds(REF[f])])
def test_splice_from_the_mlp_input_into_the_mlp_output(family):
    """SpliceFrom hands the replacement the MLP input of the same forward: the result equals
    two passes, one capturing the clean input and one splicing a function of it by Splice."""
    model, ids = tiny_model(family), _ids()
    for kind in mlp_input_kinds(REF[family]):
        source, target = parse_hooks([f"blocks.1.{kind}", "blocks.1.hook_mlp_out"])
        with Capture(model, [source]) as capture, torch.no_grad():
            clean_input = capture.run(ids)[source.name]
        with Splice(model, target, lambda t: t + 0.5 * clean_input), torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
        with SpliceFrom(model, source, target, lambda x, t: t + 0.5 * x), torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
        _close(got, expected, f"{family} {source.name} -> {target.name}")
    with pytest.raises(SaejaxError, match="not reached before"):
        SpliceFrom(model, target, source, lambda x, t: x)
