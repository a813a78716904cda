"""Hook points, named as the ecosystem names them, on transformers models.

    blocks.L.hook_resid_pre    input of block L
    blocks.L.hook_resid_post   output of block L
    blocks.L.hook_attn_out     output of block L's attention
    blocks.L.hook_mlp_out      output of block L's MLP
    blocks.L.mlp.hook_pre      MLP up-projection before its activation (GPT-2/Neo
                               `c_fc`, GPT-J `fc_in`, GPT-NeoX `dense_h_to_4h`; for
                               gated Llama-style MLPs the gate projection, which is
                               what enters the activation)

`Capture` attaches forward hooks and stops the forward pass right after the
deepest hooked point, so no compute is spent on later layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saejax.errors import SaejaxError

_HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|mlp\.hook_pre)$")
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "transformer.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention")
_MLP_PRE_NAMES = ("c_fc", "fc_in", "gate_proj", "dense_h_to_4h", "fc1", "up_proj")


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str  # resid_pre | resid_post | attn_out | mlp_out | mlp_pre


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
                "hook_attn_out, hook_mlp_out or blocks.L.mlp.hook_pre")
        kind = {"mlp.hook_pre": "mlp_pre"}.get(match.group(2), match.group(2)[len("hook_"):])
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
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if blocks is not None and hasattr(blocks, "__len__"):
            return blocks
    raise SaejaxError(f"cannot find the transformer blocks of {type(model).__name__}; "
                      f"known layouts: {', '.join(_BLOCK_PATHS)}")


def _child(block, names, what: str, hook: HookPoint):
    for name in names:
        module = getattr(block, name, None)
        if module is not None:
            return module
    raise SaejaxError(f"hook {hook.name}: cannot find the {what} module of {type(block).__name__}")


def _hooked_module(block, point: HookPoint):
    """The module whose output is the activation at `point` (every kind but resid_pre,
    which is the block's input)."""
    if point.kind == "resid_post":
        return block
    if point.kind == "attn_out":
        return _child(block, _ATTN_NAMES, "attention", point)
    if point.kind == "mlp_out":
        return _child(block, ("mlp",), "MLP", point)
    return _child(_child(block, ("mlp",), "MLP", point), _MLP_PRE_NAMES, "MLP input", point)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def validate_hooks(points: list[HookPoint], model) -> None:
    n_layers = len(find_blocks(model))
    for p in points:
        if p.layer >= n_layers:
            raise SaejaxError(f"hook {p.name}: layer {p.layer} is out of range; "
                              f"the model has layers 0..{n_layers - 1}")


def hook_width(point: HookPoint, model) -> int:
    """Width of the activation at a hook point."""
    block = find_blocks(model)[point.layer]
    if point.kind == "mlp_pre":
        module = _hooked_module(block, point)
        weight = module.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])
    c = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(c, key, None), int):
            return int(getattr(c, key))
    raise SaejaxError(f"cannot tell the hidden size of {type(model).__name__}")


class StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


class Capture:
    """Context manager: run `model(ids)` inside it; `captured[name]` holds each hook's tensor."""

    def __init__(self, model, points: list[HookPoint], stop_early: bool = True):
        self.model, self.points, self.stop_early = model, points, stop_early
        self.captured: dict = {}
        self._handles = []

    def __enter__(self):
        blocks = find_blocks(self.model)
        for p in self.points:
            block = blocks[p.layer]
            if p.kind == "resid_pre":
                def pre(module, args, kwargs, name=p.name):
                    self.captured[name] = (args[0] if args else kwargs["hidden_states"]).detach()
                self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
                continue

            def post(module, args, output, name=p.name):
                self.captured[name] = _first(output).detach()
            self._handles.append(_hooked_module(block, p).register_forward_hook(post))
        if self.stop_early:
            self._add_stop(blocks)
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
    `replace` gets and returns a tensor [batch, positions, width].
    """

    def __init__(self, model, point: HookPoint, replace):
        self.model, self.point, self.replace = model, point, replace
        self._handle = None

    def __enter__(self):
        block = find_blocks(self.model)[self.point.layer]
        p = self.point
        if p.kind == "resid_pre":
            def pre(module, args, kwargs):
                if args:
                    return (self.replace(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self.replace(kwargs["hidden_states"])}
            self._handle = block.register_forward_pre_hook(pre, with_kwargs=True)
            return self
        module = _hooked_module(block, p)

        def post(module, args, output):
            if isinstance(output, tuple):
                return (self.replace(output[0]), *output[1:])
            return self.replace(output)
        self._handle = module.register_forward_hook(post)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False
