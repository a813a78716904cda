"""Hook points, named as the ecosystem names them, on transformers models.

    blocks.L.hook_resid_pre    input of block L
    blocks.L.hook_resid_post   output of block L
    blocks.L.hook_attn_out     what block L adds to the residual stream from its attention
    blocks.L.hook_mlp_out      what block L adds to the residual stream from its MLP
    blocks.L.mlp.hook_pre      MLP pre-activation: the projection that enters the activation
                               function (for gated MLPs the gate projection)
    blocks.L.hook_resid_mid    the residual stream between attention and MLP: resid_pre plus
                               what attention added, the input of the MLP's norm
    blocks.L.ln2.hook_normalized  the normalised MLP input: the output of the MLP's norm,
                               exactly what the MLP receives (transcoders read it)

Inside a block the points come in this order (`hook_order`): resid_pre, attn_out, resid_mid,
ln2.hook_normalized, mlp.hook_pre, mlp_out, resid_post. The two MLP-input points are defined in
sequential pre-norm blocks (`block_form`). Parallel blocks (GPT-J, Pythia, Falcon) have no
residual stream between attention and MLP, so no resid_mid; of them only Pythia's MLP has a norm
of its own for ln2.hook_normalized (GPT-J's and Falcon's read the attention's input norm, and a
splice there would change the attention too). OPT-350m's post-norm blocks feed the MLP a
normalised residual, so neither name means there what it means elsewhere. Those are refused.

Where each point lives differs per family, so it is written down per `model_type` in
`LAYOUTS` (each layout is checked against a plain forward-hook reference in
tests/extract/test_hook_families.py). A family not listed is refused: a guessed module
can be off by a norm or a residual term and would extract the wrong thing silently.

`Capture` attaches forward hooks and stops the forward pass right after the
deepest hooked point, so no compute is spent on later layers; `Splice` replaces
the activation at one point (eval's SAE reconstruction, zero ablation, steering);
`SpliceFrom` replaces one point by a function of an earlier point of the same forward pass
(a transcoder's output in place of the MLP output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saejax.errors import SaejaxError

_HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_resid_mid|hook_attn_out|hook_mlp_out"
    r"|mlp\.hook_pre|ln2\.hook_normalized)$"
)
_KINDS = {"mlp.hook_pre": "mlp_pre", "ln2.hook_normalized": "ln2_normalized"}
# where each kind sits inside a block, in the order the forward pass reaches it
ORDER = ("resid_pre", "attn_out", "resid_mid", "ln2_normalized", "mlp_pre", "mlp_out", "resid_post")
_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
)


@dataclass(frozen=True)
class Layout:
    """Where a family's hook points are: module paths relative to the causal LM / a block.

    `attn_out` and `mlp_out` name the module whose output is added to the residual stream
    as it is (Gemma 2 normalises both outputs before adding them, so its norms are named).
    `gate_half`: the pre-activation module is a fused gate+up projection whose first half
    is the gate (Phi-3). `flat_rows`: the MLP modules see [batch*positions, d] rows (OPT).
    In OPT-350m's post-norm blocks the two outputs are still the terms added to the residual,
    before the norm that follows each sum.
    `mlp_norm`: the norm whose input is resid_mid and whose output the MLP receives, in
    sequential blocks (None: the family has no sequential form). `parallel_mlp_norm`: in
    parallel blocks, a norm of the block input used by the MLP alone (Pythia's), if any.
    """

    blocks: str
    attn_out: str
    mlp_out: str
    mlp_pre: str
    gate_half: bool = False
    flat_rows: bool = False
    mlp_norm: str | None = None
    parallel_mlp_norm: str | None = None


_LLAMA = Layout(
    "model.layers", "self_attn", "mlp", "mlp.gate_proj", mlp_norm="post_attention_layernorm"
)
_GPT2 = Layout("transformer.h", "attn", "mlp", "mlp.c_fc", mlp_norm="ln_2")
LAYOUTS = {
    "gpt2": _GPT2,
    "gpt_neo": _GPT2,
    "gptj": Layout("transformer.h", "attn", "mlp", "mlp.fc_in"),
    "gpt_neox": Layout(
        "gpt_neox.layers",
        "attention",
        "mlp",
        "mlp.dense_h_to_4h",
        mlp_norm="post_attention_layernorm",
        parallel_mlp_norm="post_attention_layernorm",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    # Gemma 2 adds post_attention_layernorm(attention) to the residual, so resid_mid is the
    # input of pre_feedforward_layernorm
    "gemma2": Layout(
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "mlp.gate_proj",
        mlp_norm="pre_feedforward_layernorm",
    ),
    "phi3": Layout(
        "model.layers",
        "self_attn",
        "mlp",
        "mlp.gate_up_proj",
        gate_half=True,
        mlp_norm="post_attention_layernorm",
    ),
    "opt": Layout(
        "model.decoder.layers",
        "self_attn",
        "fc2",
        "fc1",
        flat_rows=True,
        mlp_norm="final_layer_norm",
    ),
    "falcon": Layout(
        "transformer.h",
        "self_attention",
        "mlp",
        "mlp.dense_h_to_4h",
        mlp_norm="post_attention_layernorm",
    ),
}


def block_form(model) -> str:
    """'sequential' (the MLP reads the residual after attention through its own norm),
    'parallel' (attention and MLP both read the block input) or 'post_norm' (OPT-350m)."""
    kind, config = model_type(model), getattr(model, "config", None)
    if kind == "gptj":
        return "parallel"
    if kind == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        return "parallel"
    if kind == "falcon" and (
        getattr(config, "parallel_attn", True) or getattr(config, "new_decoder_architecture", False)
    ):
        return "parallel"
    if kind == "opt" and not getattr(config, "do_layer_norm_before", True):
        return "post_norm"
    return "sequential"


def mlp_input_norm(model, point: HookPoint, layout: Layout) -> str:
    """The norm module (path in a block) behind resid_mid / ln2.hook_normalized, or one
    SaejaxError line saying why this model has no such point."""
    form, kind = block_form(model), model_type(model)
    if form == "sequential" and layout.mlp_norm:
        return layout.mlp_norm
    if form == "parallel" and point.kind == "ln2_normalized" and layout.parallel_mlp_norm:
        return layout.parallel_mlp_norm
    why = {
        "parallel": "runs attention and the MLP in parallel on the block input, so there is no "
        "residual stream between them",
        "post_norm": "normalises after each residual sum (post-norm), so the MLP reads a "
        "normalised residual and the point would mean something else here",
    }.get(form, "has no norm of its own in front of the MLP")
    if form == "parallel" and point.kind == "ln2_normalized":
        why = "runs attention and the MLP in parallel with no norm known to be the MLP's own "
        why += "(a splice of a norm both read would change the attention too)"
    raise SaejaxError(f"hook {point.name}: model type '{kind}' {why}; it is refused")


def model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def layout_of(model, point: HookPoint) -> Layout:
    """The family's layout, or one SaejaxError line naming the model type and the hook."""
    kind = model_type(model)
    if kind not in LAYOUTS:
        raise SaejaxError(
            f"hook {point.name}: model type '{kind}' has no known hook layout, "
            f"so it is refused rather than extracted from a guessed module "
            f"(known: {', '.join(sorted(LAYOUTS))})"
        )
    return LAYOUTS[kind]


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str  # one of ORDER


def hook_order(point: HookPoint) -> tuple[int, int]:
    """Where a point is reached in the forward pass: (layer, place inside the block)."""
    return point.layer, ORDER.index(point.kind)


def parse_hooks(spec: str | list[str]) -> list[HookPoint]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise SaejaxError("no hook given (e.g. --hooks blocks.15.hook_resid_post)")
    points = []
    for name in names:
        match = _HOOK_RE.match(name)
        if not match:
            raise SaejaxError(
                f"unknown hook name '{name}'; expected blocks.L.hook_resid_pre, hook_resid_post, "
                "hook_resid_mid, hook_attn_out, hook_mlp_out, blocks.L.mlp.hook_pre or "
                "blocks.L.ln2.hook_normalized"
            )
        kind = _KINDS.get(match.group(2), match.group(2)[len("hook_") :])
        points.append(HookPoint(name, int(match.group(1)), kind))
    if len({p.name for p in points}) != len(points):
        raise SaejaxError(f"hook listed twice in {names}")
    return points


def _get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model):
    """The list of transformer blocks of a transformers causal LM."""
    layout = LAYOUTS.get(model_type(model))
    for path in (layout.blocks,) if layout else _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if blocks is not None and hasattr(blocks, "__len__"):
            return blocks
    raise SaejaxError(
        f"cannot find the transformer blocks of {type(model).__name__}; "
        f"known layouts: {', '.join(_BLOCK_PATHS)}"
    )


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _block_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _Site:
    """One hook point resolved on one model: the module to hook, and how to read the
    activation [batch, positions, width] from its output and write a replacement back."""

    def __init__(self, model, point: HookPoint):
        layout = layout_of(model, point)
        blocks = find_blocks(model)
        self.point, self.block = point, blocks[point.layer]
        if point.kind in ("resid_pre", "resid_post"):
            self.module = self.block
        else:
            if point.kind in ("resid_mid", "ln2_normalized"):
                path = mlp_input_norm(model, point, layout)
            else:
                path = getattr(layout, point.kind)
            self.module = _get_path(self.block, path)
            if self.module is None:
                raise SaejaxError(
                    f"hook {point.name}: {type(self.block).__name__} has no "
                    f"'{path}' module, which the '{model_type(model)}' layout expects"
                )
        # resid_pre is the block's input, resid_mid the input of the MLP's norm
        self.on_input = point.kind in ("resid_pre", "resid_mid")
        self.gate_half = layout.gate_half and point.kind == "mlp_pre"
        self.flat_rows = layout.flat_rows and point.kind in (
            "mlp_pre",
            "mlp_out",
            "resid_mid",
            "ln2_normalized",
        )
        self.rows_shape = None  # (batch, positions) of the running forward, for flat rows

    def attach(self, pre=None, post=None) -> list:
        """Register `pre(args, kwargs)` (on the module's input: resid_pre, resid_mid) or
        `post(output)` hooks; returns handles."""
        handles = []
        if self.flat_rows:

            def shape(module, args, kwargs):
                self.rows_shape = tuple(_block_input(args, kwargs).shape[:-1])

            handles.append(self.block.register_forward_pre_hook(shape, with_kwargs=True))
        if self.on_input:
            handles.append(
                self.module.register_forward_pre_hook(
                    lambda module, args, kwargs: pre(args, kwargs), with_kwargs=True
                )
            )
        else:
            handles.append(
                self.module.register_forward_hook(lambda module, args, output: post(output))
            )
        return handles

    def read(self, output):
        x = _first(output)
        if self.gate_half:  # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
            x = x[..., : x.shape[-1] // 2]
        if self.flat_rows:
            x = x.reshape(*self.rows_shape, x.shape[-1])
        return x

    def write(self, output, new):
        x = _first(output)
        if self.flat_rows:
            new = new.reshape(*x.shape[:-1], new.shape[-1])
        if self.gate_half:
            import torch

            new = torch.cat([new, x[..., x.shape[-1] // 2 :]], dim=-1)
        # a copy: Falcon adds attention into the MLP output in place after this hook
        new = new.clone()
        return (new, *output[1:]) if isinstance(output, tuple) else new


def validate_hooks(points: list[HookPoint], model) -> None:
    """One SaejaxError line for a layer out of range or a family/hook not understood."""
    n_layers = len(find_blocks(model))
    for p in points:
        if p.layer >= n_layers:
            raise SaejaxError(
                f"hook {p.name}: layer {p.layer} is out of range; "
                f"the model has layers 0..{n_layers - 1}"
            )
        _Site(model, p)


def hook_width(point: HookPoint, model) -> int:
    """Width of the activation at a hook point."""
    site = _Site(model, point)
    if point.kind == "mlp_pre":
        module = site.module
        weight = module.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        width = int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])
        return width // 2 if site.gate_half else width
    c = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(c, key, None), int):
            return int(getattr(c, key))
    raise SaejaxError(f"cannot tell the hidden size of {type(model).__name__}")


class StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


class Capture:
    """Context manager: run `model(ids)` inside it; `captured[name]` holds each hook's tensor
    [batch, positions, width], a copy (a later in-place update must not reach it)."""

    def __init__(self, model, points: list[HookPoint], stop_early: bool = True):
        self.model, self.points, self.stop_early = model, points, stop_early
        self.captured: dict = {}
        self._handles = []

    def __enter__(self):
        sites = [_Site(self.model, p) for p in self.points]  # refuse before hooking anything
        for site in sites:

            def pre(args, kwargs, name=site.point.name, site=site):
                self.captured[name] = site.read(_block_input(args, kwargs)).detach().clone()

            def post(output, name=site.point.name, site=site):
                self.captured[name] = site.read(output).detach().clone()

            self._handles += site.attach(pre=pre, post=post)
        if self.stop_early:
            self._add_stop(find_blocks(self.model))
        return self

    def _add_stop(self, blocks):
        deepest = max(p.layer for p in self.points)
        only_pre = all(p.kind == "resid_pre" for p in self.points if p.layer == deepest)

        def stop(*_args, **_kwargs):
            raise StopForward

        if only_pre:
            self._handles.append(blocks[deepest].register_forward_pre_hook(stop))
        else:
            self._handles.append(blocks[deepest].register_forward_hook(stop))

    def run(self, input_ids):
        """Forward pass truncated after the deepest hook; returns {hook: tensor}."""
        self.captured = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        missing = [p.name for p in self.points if p.name not in self.captured]
        if missing:
            raise SaejaxError(f"hooks {missing} never fired on {type(self.model).__name__}")
        return self.captured

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


class Splice:
    """Context manager: replace the activation at one hook point by `replace(tensor)`.

    Used to run a model with an SAE's reconstruction (or zeros) substituted at its hook.
    `replace` gets and returns a tensor [batch, positions, width], the same view Capture
    records (for Phi-3's mlp.hook_pre the gate half only, for OPT's MLP rows unflattened).
    hook_resid_mid is replaced where it is made, so both the MLP and the residual sum after
    it see the replacement (not only the MLP's norm).
    """

    def __init__(self, model, point: HookPoint, replace):
        self.model, self.point, self.replace = model, point, replace
        self._handles = []

    def __enter__(self):
        site = _Site(self.model, self.point)
        if self.point.kind == "resid_mid":
            self._handles = _splice_resid_mid(self.model, site, self.replace)
            return self

        def pre(args, kwargs):
            if args:
                return (self.replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.replace(kwargs["hidden_states"])}

        def post(output):
            return site.write(output, self.replace(site.read(output)))

        self._handles = site.attach(pre=pre, post=post)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


def _splice_resid_mid(model, site: _Site, replace) -> list:
    """Both the MLP's norm and the sum after the MLP read resid_mid = resid_pre + attn_out, so
    it is replaced where it is made: attention's term becomes replace(resid_mid) − resid_pre."""
    point = site.point
    attn = _Site(model, HookPoint(point.name, point.layer, "attn_out"))
    block_input = {}

    def remember(module, args, kwargs):
        block_input["x"] = _block_input(args, kwargs)

    def post(output):
        x = block_input["x"]
        return attn.write(output, replace(x + attn.read(output)) - x)

    handles = [site.block.register_forward_pre_hook(remember, with_kwargs=True)]
    return handles + attn.attach(post=post)


class SpliceFrom:
    """Context manager: replace the activation at `target` by `replace(source, target)`, where
    `source` is the activation at a point the same forward pass reaches first.

    A transcoder spliced in for the MLP reads the MLP's normalised input and writes the MLP's
    output, within one forward: upstream of `source` nothing changes, so the input is exactly
    what the model computes there.
    """

    def __init__(self, model, source: HookPoint, target: HookPoint, replace):
        if hook_order(source) >= hook_order(target):
            raise SaejaxError(
                f"input hook {source.name} is not reached before target hook {target.name} in "
                "the forward pass, so the target cannot be computed from it"
            )
        self.capture = Capture(model, [source], stop_early=False)
        self.splice = Splice(
            model, target, lambda t: replace(self.capture.captured[source.name], t)
        )

    def __enter__(self):
        self.capture.__enter__()
        try:
            self.splice.__enter__()
        except BaseException:
            self.capture.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.splice.__exit__(*exc)
        self.capture.__exit__(*exc)
        return False
