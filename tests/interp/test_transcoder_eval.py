"""A transcoder judged by its language model: its output spliced in for the MLP output.

The transcoder here is a stand-in with only what eval uses (`info["hook"]`,
`info["target_hook"]`, `spec`, `reconstruct`, `encode`): the block's own MLP (a perfect
transcoder) or zeros. The store holds both hooks of the same rows, so the MLP applied to a
row of the normalised MLP input gives the same row of the MLP output.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from extract.hooks import SpliceFrom, parse_hooks  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.errors import SaejaxError  # noqa: E402
from saejax.interp.eval import check_transcoder_hooks, run_lm_eval  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402
from saejax.train.data import ArraySource, split_columns  # noqa: E402
from saejax.train.evaluate import evaluate_rows  # noqa: E402

LAYER = 1
IN_HOOK = f"blocks.{LAYER}.ln2.hook_normalized"
OUT_HOOK = f"blocks.{LAYER}.hook_mlp_out"
VALIDATION = 600


class MLPTranscoder:
    """A transcoder whose output is `mlp` of its input (zeros when `mlp` is None); its latents
    are the MLP's hidden units (GPT-2's `act(c_fc(x))`)."""

    def __init__(self, mlp, width: int, hook=IN_HOOK, target_hook=OUT_HOOK):
        self.mlp = mlp
        self.info = {"hook": hook, "target_hook": target_hook}
        hidden = mlp.c_fc.weight.shape[1] if hasattr(mlp, "c_fc") else width
        self.spec = SimpleNamespace(d_in=width, d_out=width, d_sae=hidden)

    def reconstruct(self, x):
        x = torch.from_numpy(np.asarray(x, np.float32))
        if self.mlp is None:
            return np.zeros(x.shape, np.float32)
        with torch.no_grad():
            return self.mlp(x.to(next(self.mlp.parameters()).dtype)).float().numpy()

    def encode(self, x):
        with torch.no_grad():
            return self.mlp.act(self.mlp.c_fc(torch.from_numpy(np.asarray(x, np.float32)))).numpy()


@pytest.fixture(scope="module")
def two_hook_store(trained_gpt2, corpus_file, tmp_path_factory):
    """The trained tiny GPT-2's layer-1 MLP input and output, 3000 rows, one extraction."""
    from extract.extractor import ExtractConfig, run_extract

    out = str(tmp_path_factory.mktemp("transcoder_store") / "store")
    config = ExtractConfig(
        out=out,
        model=trained_gpt2,
        corpus=corpus_file,
        hooks=[IN_HOOK, OUT_HOOK],
        tokens=3000,
        context=32,
        batch_size=8,
        dtype="float32",
    )
    run_extract(config, progress=False)
    return out


@pytest.fixture(scope="module")
def mlp(trained_gpt2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(trained_gpt2).eval().transformer.h[LAYER].mlp


def lm_eval(sae, store_path):
    store = ActivationStore.open(store_path)
    return run_lm_eval(sae, store, None, 8, 4, sae.info["hook"], VALIDATION, device="cpu")


def test_rows_of_the_two_hooks_are_aligned(two_hook_store, mlp):
    """Row i of the MLP output is the MLP of row i of its normalised input: one forward wrote
    both, so a transcoder trained on these pairs learns the real map."""
    source = ArraySource(two_hook_store, IN_HOOK, also=[OUT_HOOK])
    x, y = split_columns(source.read(0, source.n_rows), source.widths)
    with torch.no_grad():
        mapped = mlp(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    np.testing.assert_allclose(mapped, y, rtol=1e-4, atol=1e-5)
    assert not np.allclose(y[1:], y[:-1], atol=1e-3)  # rows differ: a shift would show


def test_a_perfect_transcoder_recovers_all_of_the_loss(two_hook_store, mlp):
    width = ActivationStore.open(two_hook_store).d_in_of(IN_HOOK)
    lm = lm_eval(MLPTranscoder(mlp, width), two_hook_store)
    assert lm["ce_zero"] > lm["ce_clean"] + 0.01  # deleting the MLP output hurts
    assert lm["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert lm["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert lm["target_hook"] == OUT_HOOK and lm["ablated_hook"] == OUT_HOOK


def relu_identity(d: int, transcoder: bool) -> tuple[dict, S.SAESpec]:
    """A ReLU SAE (or transcoder) whose output is its input: W_enc = [I, −I], W_dec = [I; −I]."""
    eye = np.eye(d, dtype=np.float32)
    params = {
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    return params, S.SAESpec("relu", d, 2 * d, transcoder=transcoder)


def test_held_out_rows_of_a_perfect_map_have_fvu_zero(two_hook_store):
    """evaluate_rows given the target rows beside the input (as `saejax eval` gives a
    transcoder's): a map whose output is exactly the target, here the identity applied to
    the target hook's own held-out rows, has FVU 0 and fires latents."""
    source = ArraySource(two_hook_store, IN_HOOK, also=[OUT_HOOK])
    _, y = split_columns(source.read(source.n_rows - VALIDATION, source.n_rows), source.widths)
    params, spec = relu_identity(y.shape[1], transcoder=True)
    rows = evaluate_rows(params, spec, 1.0, y, target=y)
    assert rows["fvu"] == pytest.approx(0.0, abs=1e-6) and rows["tokens"] == VALIDATION
    assert rows["l0"] > 0


def test_a_target_beside_the_input_gives_the_figures_of_paired_rows():
    """A transcoder's held-out metrics are the same whether its rows come as one [x | y]
    array (training's validation) or as x with the target y beside it (`saejax eval`), and an
    SAE whose info names a target hook is judged against that target the same way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 8)) + 0.1 * rng.normal(size=(300, 8))).astype(np.float32)
    y[:3] *= 40  # outlier rows, so the figures without them differ
    params, spec = relu_identity(8, transcoder=True)
    paired = evaluate_rows(params, spec, 1.0, np.concatenate([x, y], 1), batch_size=128)
    beside = evaluate_rows(params, spec, 1.0, x, batch_size=128, target=y)
    assert paired.keys() == beside.keys() and paired["outlier_rows"] == 3
    for name, value in paired.items():
        assert beside[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name  # float32 sums
    sae_params, sae_spec = relu_identity(8, transcoder=False)  # uncentred: b_dec is zero
    as_sae = evaluate_rows(sae_params, sae_spec, 1.0, x, batch_size=128, target=y)
    assert as_sae["fvu"] == pytest.approx(paired["fvu"], rel=1e-6)


def test_a_zero_transcoder_recovers_nothing(two_hook_store, mlp, trained_gpt2):
    """Against the baseline that zeroes the MLP output where the splice acts (BOS left clean)
    a zero transcoder recovers exactly nothing; the headline baseline zeroes the MLP output at
    every position, as a plain hook on the MLP does."""
    from transformers import AutoModelForCausalLM

    width = ActivationStore.open(two_hook_store).d_in_of(IN_HOOK)
    lm = lm_eval(MLPTranscoder(None, width), two_hook_store)
    assert lm["ce_loss_recovered_bos_kept"] == pytest.approx(0.0, abs=1e-4)
    assert lm["ce_spliced"] == pytest.approx(lm["ce_zero_bos_kept"], rel=1e-5)

    store = ActivationStore.open(two_hook_store)
    model = AutoModelForCausalLM.from_pretrained(trained_gpt2).eval()
    doc = store.doc(0, len(store))[:, 0]
    total = count = 0
    handle = model.transformer.h[LAYER].mlp.register_forward_hook(
        lambda module, args, out: torch.zeros_like(out)
    )
    with torch.no_grad():
        for seq in lm["sequence_ids"]:
            ids = torch.tensor(store.sequence_input(seq, int(np.argmax(doc == seq))))[None].long()
            logits = model(input_ids=ids).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            scored = ~torch.isin(ids[0, :-1], torch.tensor(lm["special_token_ids"]))
            total, count = total + float(ce[scored].sum()), count + int(scored.sum())
    handle.remove()
    assert lm["ce_zero"] == pytest.approx(total / count, rel=1e-4)


def test_an_input_hook_after_the_target_is_one_line(two_hook_store, mlp):
    width = ActivationStore.open(two_hook_store).d_in_of(IN_HOOK)
    backwards = MLPTranscoder(mlp, width, hook=OUT_HOOK, target_hook=IN_HOOK)
    for call in (
        lambda: check_transcoder_hooks(OUT_HOOK, IN_HOOK),
        lambda: lm_eval(backwards, two_hook_store),
        lambda: SpliceFrom(mlp, *parse_hooks([OUT_HOOK, IN_HOOK]), lambda x, t: x),
    ):
        with pytest.raises(SaejaxError) as err:
            call()
        message = str(err.value)
        assert OUT_HOOK in message and IN_HOOK in message and "\n" not in message


def test_saejax_eval_on_a_saved_linear_transcoder(capsys, two_hook_store, tmp_path):
    """The whole `saejax eval RUN` path: a saved ReLU SAE whose W_enc = [A, −A] and
    W_dec = [I; −I] computes x·A, here A the least-squares linear map from MLP input to MLP
    output on the training rows; its info names the target hook (written by hand until the
    trainer writes it). A linear map is a fair but imperfect MLP: it recovers part of the
    loss, and its row FVU is that of the least-squares fit on the held-out target rows."""
    import json

    from saejax.cli import main
    from saejax.config import load_config
    from saejax.core import sae as S
    from saejax.io import write_json
    from saejax.train.sae_files import save_sae

    source = ArraySource(two_hook_store, IN_HOOK, also=[OUT_HOOK])
    x, y = split_columns(source.read(0, source.n_rows), source.widths)
    cut = source.n_rows - VALIDATION
    A = np.linalg.lstsq(x[:cut], y[:cut], rcond=None)[0].astype(np.float32)
    d = A.shape[0]
    eye = np.eye(d, dtype=np.float32)
    cfg = load_config(None, [f"data.path={two_hook_store}", f"sae.d_sae={2 * d}"], check=False)
    params = {
        "W_enc": np.concatenate([A, -A], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    run = tmp_path / "linear"
    store = ActivationStore.open(two_hook_store)
    save_sae(str(run / "sae"), params, S.SAESpec("relu", d, 2 * d), 1.0, cfg, store.meta, IN_HOOK)
    info = json.loads((run / "sae" / "sae.json").read_text())
    write_json(str(run / "sae" / "sae.json"), {**info, "target_hook": OUT_HOOK})

    assert main(["eval", str(run), "--sequences", "8", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"at {IN_HOOK} → {OUT_HOOK}" in printed
    result = json.loads((run / "eval_lm.json").read_text())
    lm, rows = result["lm"], result["sae"]
    assert 0.0 < lm["ce_loss_recovered"] < 1.0 and 0.0 < lm["kl_spliced"] < lm["kl_zero"]
    held_x, held_y = x[-rows["tokens"] :], y[-rows["tokens"] :]
    residual = held_y - held_x @ A
    expected = np.sum(residual**2) / np.sum((held_y - held_y.mean(0)) ** 2)
    assert rows["fvu"] == pytest.approx(expected, rel=1e-3) and 0.0 < rows["fvu"] < 1.0


@pytest.mark.slow
def test_builtin_model_layer_15_mlp_as_a_transcoder(tmp_path):
    """On the built-in model (SmolLM2-135M): layer 15's normalised MLP input and MLP output,
    extracted in one pass, are aligned row for row, and the MLP itself spliced in as a
    transcoder recovers all of the loss while zeros recover none. Two model loads and a few
    short forwards: about a minute on two idle cores."""
    from extract.extractor import ExtractConfig, run_extract
    from saejax.interp.lm import load_cached

    hooks = ["blocks.15.ln2.hook_normalized", "blocks.15.hook_mlp_out"]
    out = str(tmp_path / "store")
    config = ExtractConfig(
        out=out, hooks=hooks, tokens=1024, context=128, batch_size=8, dtype="float32"
    )
    run_extract(config, progress=False)
    source = ArraySource(out, hooks[0], also=[hooks[1]])
    x, y = split_columns(source.read(0, source.n_rows), source.widths)
    # the model eval will use (the same cache entry), so it loads once more, not twice; the
    # transcoder is a copy of the MLP (eval hooks the model's own MLP output)
    model = load_cached("builtin", None, "float32", "cpu").model
    mlp = copy.deepcopy(model.model.layers[15].mlp)
    with torch.no_grad():
        mapped = mlp(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    np.testing.assert_allclose(mapped, y, rtol=1e-3, atol=1e-3)

    store = ActivationStore.open(out)

    def evaluate(module):
        sae = MLPTranscoder(module, x.shape[1], hook=hooks[0], target_hook=hooks[1])
        return run_lm_eval(sae, store, None, 2, 2, hooks[0], 256, device="cpu")

    perfect, zero = evaluate(mlp), evaluate(None)
    assert perfect["ce_zero"] > perfect["ce_clean"] + 0.01  # deleting the MLP output hurts
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert zero["ce_loss_recovered_bos_kept"] == pytest.approx(0.0, abs=1e-3)
