"""The language model on a chosen device and dtype: extraction on the CPU in float32 and
bfloat16, --batch-tokens, the host-copy fallback, and a device that is not there."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.extractor import ExtractConfig, HostCopies, run_extract  # noqa: E402
from extract.models import resolve_device, resolve_model_dtype  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.errors import SaejaxError  # noqa: E402
from saejax.store import ActivationStore, read_meta  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
NO_GPU = not torch.cuda.is_available()


def _extract(model_dir, corpus, out, **kw):
    settings = dict(hooks=[HOOK], tokens=300, context=32, batch_size=4, dtype="float32")
    settings.update(kw)
    cfg = ExtractConfig(out=str(out), model=model_dir, corpus=corpus, **settings)
    return run_extract(cfg, progress=False)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_bfloat16_model_extracts_rows_close_to_float32(fixture, request, corpus_file, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    f32 = _extract(model_dir, corpus_file, tmp_path / "f32", device="cpu", model_dtype="float32")
    bf16 = _extract(model_dir, corpus_file, tmp_path / "bf", device="cpu", model_dtype="bfloat16")
    assert f32["extract_config"]["model_dtype"] == "float32"
    assert bf16["extract_config"]["model_dtype"] == "bfloat16"
    assert bf16["extract_config"]["device"] == f32["extract_config"]["device"] == "cpu"
    a = ActivationStore.open(str(tmp_path / "f32"))
    b = ActivationStore.open(str(tmp_path / "bf"))
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    x, y = a.read(0, len(a), HOOK), b.read(0, len(b), HOOK)
    assert not np.array_equal(x, y), "the bfloat16 model really ran in bfloat16"
    # bfloat16 keeps 8 bits of mantissa: through two blocks, rows stay within about 1%
    rel = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
    assert np.median(rel) < 0.01 and rel.max() < 0.03, (np.median(rel), rel.max())


def test_defaults_on_a_machine_without_gpu_are_cpu_float32(tiny_llama, corpus_file, tmp_path):
    if not NO_GPU:
        pytest.skip("this machine has a GPU")
    assert resolve_device(None) == "cpu" and resolve_model_dtype(None, "cpu") == "float32"
    assert resolve_model_dtype(None, "cuda:1") == "bfloat16"
    meta = _extract(tiny_llama, corpus_file, tmp_path / "s", tokens=100)
    assert meta["extract_config"]["device"] == "cpu"
    assert meta["extract_config"]["model_dtype"] == "float32"


def test_batch_tokens_sizes_the_forward_and_changes_no_row(tiny_llama, corpus_file, tmp_path):
    by_size = _extract(tiny_llama, corpus_file, tmp_path / "a", batch_size=2)
    by_tokens = _extract(tiny_llama, corpus_file, tmp_path / "b", batch_tokens=3 * 32 + 31)
    assert by_tokens["extract_config"]["batch_tokens"] == 127  # 3 contexts per forward
    a = ActivationStore.open(str(tmp_path / "a"))
    b = ActivationStore.open(str(tmp_path / "b"))
    assert len(a) == len(b) == by_size["n_tokens"] == by_tokens["n_tokens"] == 300
    np.testing.assert_array_equal(a.doc(), b.doc())
    np.testing.assert_allclose(a.read(0, 300, HOOK), b.read(0, 300, HOOK), rtol=1e-5, atol=1e-5)
    with pytest.raises(SaejaxError, match="less than one context"):
        _extract(tiny_llama, corpus_file, tmp_path / "c", batch_tokens=31)
    assert not (tmp_path / "c").exists()


def test_resume_in_another_model_dtype_is_refused(tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "s"
    _extract(tiny_llama, corpus_file, out, tokens=100, model_dtype="float32")
    before = read_meta(str(out))
    with pytest.raises(SaejaxError, match="--model-dtype float32 to continue"):
        _extract(tiny_llama, corpus_file, out, tokens=200, model_dtype="bfloat16")
    assert read_meta(str(out)) == before


def test_host_copies_without_pinned_memory_are_plain_float32_copies():
    captured = {"a": torch.randn(2, 5, 8).to(torch.bfloat16), "b": torch.randn(2, 5, 3)}
    arrays = HostCopies(captured, pinned=False).arrays()
    for name, t in captured.items():
        assert arrays[name].dtype == np.float32 and arrays[name].shape == tuple(t.shape)
        np.testing.assert_array_equal(arrays[name], t.float().numpy())


def test_pinned_path_copies_without_blocking_and_waits_before_reading(monkeypatch):
    """The CUDA branch's order of calls, with the pinned allocator and the event faked."""
    calls = []

    class FakeEvent:
        def record(self):
            calls.append("record")

        def synchronize(self):
            calls.append("synchronize")

    real_empty, real_copy = torch.empty, torch.Tensor.copy_

    def empty(*shape, pin_memory=False, **kw):
        calls.append(f"empty pin_memory={pin_memory}")
        return real_empty(*shape, **kw)

    def copy_(self, src, non_blocking=False):
        calls.append(f"copy non_blocking={non_blocking}")
        return real_copy(self, src)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    captured = {"a": torch.randn(2, 5, 8).to(torch.bfloat16)}
    copies = HostCopies(captured, pinned=True)
    assert calls == ["empty pin_memory=True", "copy non_blocking=True", "record"]
    arrays = copies.arrays()
    assert calls[-1] == "synchronize", "the host reads only after the copies are done"
    np.testing.assert_array_equal(arrays["a"], captured["a"].float().numpy())


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_host_copies_through_pinned_memory_on_a_gpu():
    captured = {"a": torch.randn(4, 16, 32, device="cuda").to(torch.bfloat16)}
    copies = HostCopies(captured, pinned=True)
    assert copies.tensors["a"].is_pinned()
    np.testing.assert_array_equal(copies.arrays()["a"], captured["a"].float().cpu().numpy())


@pytest.mark.parametrize(
    "device, says",
    [
        ("cuda", "torch sees no CUDA GPU"),
        ("cuda:3", "cuda:3"),
        ("tpu", "unknown --device 'tpu'"),
    ],
)
def test_a_device_that_is_not_there_is_one_line_and_exit_2(
    device, says, tiny_llama, corpus_file, tmp_path, capsys
):
    if (device == "cuda" and not NO_GPU) or (device == "cuda:3" and torch.cuda.device_count() > 3):
        pytest.skip("this machine has that GPU")
    out = tmp_path / "s"
    argv = ["extract", "--model", tiny_llama, "--corpus", corpus_file, "--hooks", HOOK]
    code = main([*argv, "--tokens", "64", "--context", "32", "--out", str(out), "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "nothing is written"


def test_an_unknown_model_dtype_is_one_line_and_exit_2(tiny_llama, corpus_file, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["extract", "--model", tiny_llama, "--corpus", corpus_file, "--hooks", HOOK]
    code = main([*argv, "--out", str(out), "--device", "cpu", "--model-dtype", "float64"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown --model-dtype 'float64'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_extract_command_with_device_and_dtype_flags(tiny_gpt2, corpus_file, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["extract", "--model", tiny_gpt2, "--corpus", corpus_file, "--hooks", HOOK, "--quiet"]
    argv += ["--tokens", "200", "--context", "32", "--batch-tokens", "64", "--dtype", "float32"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--model-dtype", "bfloat16"]) == 0
    capsys.readouterr()
    recorded = json.loads((out / "meta.json").read_text())["extract_config"]
    assert (recorded["device"], recorded["model_dtype"], recorded["batch_tokens"]) == (
        "cpu",
        "bfloat16",
        64,
    )
