"""eval and steer with --device cpu and --model-dtype float32 / bfloat16: the SAE splice runs
with the activations in the model's dtype (JAX on float32 host arrays in between)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.interp import lm  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402
from saejax.train.sae_files import save_sae  # noqa: E402

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def identity_run(tiny_gpt2, corpus_file, tmp_path_factory):
    """A store of the tiny GPT-2 and an SAE that reconstructs exactly."""
    root = tmp_path_factory.mktemp("lm_devices")
    store_path = str(root / "store")
    run_extract(
        ExtractConfig(
            out=store_path,
            model=tiny_gpt2,
            corpus=corpus_file,
            hooks=[HOOK],
            tokens=400,
            context=32,
            dtype="float32",
            device="cpu",
        ),
        progress=False,
    )
    d = ActivationStore.open(store_path).d_in
    eye = np.eye(d, dtype=np.float32)
    cfg = load_config(
        None, [f"data.path={store_path}", "sae.architecture=relu", f"sae.d_sae={2 * d}"]
    )
    params = {  # relu(x) - relu(-x) = x
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    store = ActivationStore.open(store_path)
    run = root / "run"
    save_sae(str(run / "sae"), params, S.SAESpec("relu", d, 2 * d), 1.0, cfg, store.meta, HOOK)
    return str(run), store_path


def _eval(capsys, run, store, dtype):
    argv = ["eval", run, "--store", store, "--sequences", "4", "--batch-size", "2", "--json"]
    assert main([*argv, "--device", "cpu", "--model-dtype", dtype]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lm"]


def test_eval_on_cpu_in_float32_and_bfloat16(identity_run, capsys):
    run, store = identity_run
    f32 = _eval(capsys, run, store, "float32")
    assert next(iter(lm._CACHE))[2:] == ("float32", "cpu")
    bf16 = _eval(capsys, run, store, "bfloat16")
    assert next(iter(lm._CACHE))[2:] == ("bfloat16", "cpu"), "cached per dtype and device"
    assert f32["ce_spliced"] == pytest.approx(f32["ce_clean"], abs=1e-5)
    assert f32["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    # in bfloat16 the exact SAE's output is rounded back to bfloat16: the model barely moves
    assert bf16["ce_spliced"] == pytest.approx(bf16["ce_clean"], rel=1e-2)
    assert 0.0 <= bf16["kl_spliced"] < 1e-2
    assert bf16["ce_clean"] == pytest.approx(f32["ce_clean"], rel=0.02)
    assert bf16["ce_clean"] != f32["ce_clean"], "the bfloat16 model really ran in bfloat16"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_steer_on_cpu(identity_run, dtype, capsys):
    run, _ = identity_run
    argv = ["steer", run, "--latent", "3", "--prompt", "The quick", "--tokens", "3"]
    for how in (["--boost", "40"], ["--clamp", "5"]):
        assert main([*argv, *how, "--device", "cpu", "--model-dtype", dtype]) == 0
        assert "unsteered" in capsys.readouterr().out
    assert next(iter(lm._CACHE))[2:] == (dtype, "cpu")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "RUN", "--store", "STORE"],
        ["steer", "RUN", "--latent", "0", "--boost", "1", "--prompt", "x"],
        ["search", "RUN", "--positive", "x"],
        ["dashboard", "RUN", "--out", "OUT"],
        ["analyze", "weights", "MODEL", "--out", "OUT"],
        ["analyze", "decorrelation", "MODEL", "--prompts", "PROMPTS", "--out", "OUT"],
        ["demo", "--out", "OUT", "--quiet"],
        ["sweep", "--set", "data.path=STORE", "--d-sae", "16", "--out", "OUT", "--ce"],
    ],
    ids=lambda argv: "-".join(argv[:2]) if argv[0] == "analyze" else argv[0],
)
def test_cuda_without_a_gpu_is_one_line_and_exit_2(identity_run, tiny_gpt2, argv, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run, store = identity_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    names = {"RUN": run, "STORE": store, "MODEL": tiny_gpt2, "PROMPTS": str(prompts)}
    names["data.path=STORE"] = f"data.path={store}"
    names["OUT"] = str(tmp_path / "out")
    assert main([names.get(a, a) for a in argv] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch sees no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing is written"


def test_decorrelation_on_cpu_in_bfloat16_is_close_to_float32(tiny_gpt2, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\njumps over the lazy dog\nand runs away\n")
    scores = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["analyze", "decorrelation", tiny_gpt2, "--prompts", str(prompts), "--no-plot"]
        assert main([*argv, "--out", str(out), "--device", "cpu", "--model-dtype", dtype]) == 0
        report = json.loads((out / "decorrelation.json").read_text())
        scores[dtype] = np.array(next(iter(report["models"].values()))["decorrelation"])
    capsys.readouterr()
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], atol=0.02)
