"""analysis/: the paper's weight statistic, DPO change and decorrelation, checked against
plain Python loops over the raw checkpoint tensors (no shared code with analysis/)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import build_tiny_model

torch = pytest.importorskip("torch")

# state-dict names of (norm feeding the MLP, MLP input projection, output projection);
# "T" marks nn.Linear weights stored [out, in]
LAYOUT = {
    "gpt2": (
        "transformer.h.{l}.ln_2",
        "transformer.h.{l}.mlp.c_fc",
        "transformer.h.{l}.mlp.c_proj",
        "",
    ),
    "gpt_neo": (
        "transformer.h.{l}.ln_2",
        "transformer.h.{l}.mlp.c_fc",
        "transformer.h.{l}.mlp.c_proj",
        "T",
    ),
    "gptj": (
        "transformer.h.{l}.ln_1",
        "transformer.h.{l}.mlp.fc_in",
        "transformer.h.{l}.mlp.fc_out",
        "T",
    ),
}


def randomised_model(tmp_path, arch, seed=0, name=None):
    """A tiny `arch` model whose every weight, bias and LayerNorm parameter is random."""
    from transformers import AutoModelForCausalLM

    directory = str(tmp_path / (name or arch))
    build_tiny_model(directory, arch)
    model = AutoModelForCausalLM.from_pretrained(directory)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.1)
    model.save_pretrained(directory)
    return directory


def plain_statistics(directory, arch):
    """Per layer: list of p_j, list of ‖w_out_j‖, list of cos(w_in_j, w_out_j), by loops."""
    from transformers import AutoModelForCausalLM

    sd = {
        k: v.double().numpy()
        for k, v in AutoModelForCausalLM.from_pretrained(directory).state_dict().items()
    }
    ln_name, in_name, out_name, stored = LAYOUT[arch]
    layers = []
    l = 0
    while f"{in_name.format(l=l)}.weight" in sd:
        lnw, lnb = sd[f"{ln_name.format(l=l)}.weight"], sd[f"{ln_name.format(l=l)}.bias"]
        w_in, b_in = sd[f"{in_name.format(l=l)}.weight"], sd[f"{in_name.format(l=l)}.bias"]
        w_out = sd[f"{out_name.format(l=l)}.weight"]
        if stored == "T":
            w_in, w_out = w_in.T, w_out.T
        d_model, d_mlp = w_in.shape
        ps, out_norms, coss = [], [], []
        for j in range(d_mlp):
            bias = b_in[j] + sum(w_in[d, j] * lnb[d] for d in range(d_model))
            col = [w_in[d, j] * lnw[d] for d in range(d_model)]
            mean = sum(col) / d_model
            col = [c - mean for c in col]
            row = [w_out[j, d] for d in range(d_model)]
            row_mean = sum(row) / d_model
            row = [r - row_mean for r in row]
            in_norm = math.sqrt(sum(c * c for c in col))
            out_norm = math.sqrt(sum(r * r for r in row))
            ps.append(in_norm * bias)
            out_norms.append(out_norm)
            coss.append(sum(c * r for c, r in zip(col, row)) / (in_norm * out_norm))
        layers.append(
            {"p": ps, "w_out_norm": out_norms, "cos": coss, "w_in": col_matrix(w_in, lnw)}
        )
        l += 1
    return layers


def col_matrix(w_in, lnw):
    """Processed W_in columns (folded and centred), as a list of lists [j][d]."""
    cols = []
    for j in range(w_in.shape[1]):
        col = [w_in[d, j] * lnw[d] for d in range(w_in.shape[0])]
        mean = sum(col) / len(col)
        cols.append([c - mean for c in col])
    return cols


def plain_median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "saejax", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gptj"])
def test_weight_statistic_matches_plain_loops(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from analysis.weight_stats import weight_statistics
    from analysis.weights import process_weights
    from extract.analysis_io import mlp_weights

    directory = randomised_model(tmp_path, arch)
    stats = weight_statistics(
        process_weights(mlp_weights(AutoModelForCausalLM.from_pretrained(directory)))
    )
    reference = plain_statistics(directory, arch)
    assert stats["p"].shape == (len(reference), len(reference[0]["p"]))
    for l, layer in enumerate(reference):
        np.testing.assert_allclose(stats["p"][l], layer["p"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["w_out_norm"][l], layer["w_out_norm"], rtol=1e-6)
        np.testing.assert_allclose(stats["cos_in_out"][l], layer["cos"], rtol=1e-6, atol=1e-9)
    medians = [plain_median(layer["p"]) for layer in reference]
    scale = max(plain_median([abs(v) for v in layer["p"]]) for layer in reference)
    np.testing.assert_allclose(stats["normalised"], [m / scale for m in medians], rtol=1e-6)
    n = len(reference)
    np.testing.assert_allclose(stats["relative_depth"], [l / (n - 1) for l in range(n)])


def test_dpo_change_selects_the_most_changed_neurons(tmp_path):
    from transformers import AutoModelForCausalLM

    base = randomised_model(tmp_path, "gpt2", seed=1, name="base")
    tuned_model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a "fine-tune": small changes everywhere, large ones on some neurons
        for block in tuned_model.transformer.h:
            w = block.mlp.c_fc.weight  # Conv1D: [d_model, d_mlp]
            w.add_(torch.randn(w.shape, generator=gen) * 0.01)
            hot = torch.randperm(w.shape[1], generator=gen)[:40]
            w[:, hot] += torch.randn(w.shape[0], 40, generator=gen)
            block.mlp.c_fc.bias.add_(torch.randn(w.shape[1], generator=gen) * 0.2)
    tuned = str(tmp_path / "tuned")
    tuned_model.save_pretrained(tuned)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(base, f)):
            with open(os.path.join(base, f)) as src, open(os.path.join(tuned, f), "w") as dst:
                dst.write(src.read())

    out = tmp_path / "out"
    result = run_cli("analyze", "dpo-change", base, tuned, "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "dpo_change.json").read_text())
    assert (out / "dpo_change.png").stat().st_size > 0

    ref_base, ref_tuned = plain_statistics(base, "gpt2"), plain_statistics(tuned, "gpt2")
    medians = {"base": [], "tuned": []}
    abs_medians = {"base": [], "tuned": []}
    for l, (lb, lt) in enumerate(zip(ref_base, ref_tuned)):
        change = [
            sum(abs(a - b) for a, b in zip(lt["w_in"][j], lb["w_in"][j]))
            for j in range(len(lb["w_in"]))
        ]
        order = sorted(range(len(change)), key=lambda j: (-change[j], j))[:100]
        assert report["selected_neurons"][l] == order
        for name, layer in (("base", lb), ("tuned", lt)):
            values = [layer["p"][j] for j in order]
            medians[name].append(plain_median(values))
            abs_medians[name].append(plain_median([abs(v) for v in values]))
    norm = {k: [m / max(abs_medians[k]) for m in medians[k]] for k in medians}
    np.testing.assert_allclose(report["base_normalised_median"], norm["base"], rtol=1e-6)
    np.testing.assert_allclose(report["tuned_normalised_median"], norm["tuned"], rtol=1e-6)
    expected = [(t - b) / abs(b) for b, t in zip(norm["base"], norm["tuned"])]
    np.testing.assert_allclose(report["relative_change"], expected, rtol=1e-6)


def test_decorrelation_matches_pairwise_loop():
    from analysis.decorrelation import decorrelation

    rng = np.random.default_rng(0)
    acts = rng.normal(size=(3, 6, 10)) + np.array([0.0, 1.0, 3.0])[:, None, None]
    acts[1, 2] = 0.0  # a zero vector: cosine 0 with everything
    got = decorrelation(acts)
    for l in range(3):
        total, pairs = 0.0, 0
        for i in range(6):
            for j in range(6):
                if i != j:
                    a, b = acts[l, i], acts[l, j]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    total += 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)
                    pairs += 1
        assert got[l] == pytest.approx(1 - total / pairs, rel=1e-9)
    assert got[2] < got[0]  # a shared offset makes prompts alike


def test_last_token_activations_are_the_mlp_input_projection(tiny_gpt2):
    """The vector at layer l is c_fc(ln_2(residual)) at the prompt's last token."""
    from extract.analysis_io import last_token_mlp_pre
    from extract.models import load_model

    loaded = load_model(tiny_gpt2)
    prompts = ["The quick brown fox", "Sparse autoencoders find features in activations"]
    acts = last_token_mlp_pre(loaded, prompts)
    assert acts.shape == (4, 2, 128)
    tok = loaded.tokenizer
    for i, prompt in enumerate(prompts):
        ids = [tok.bos_token_id] + tok(prompt)["input_ids"]
        seen = {}
        handles = [
            b.mlp.c_fc.register_forward_hook(
                lambda m, a, o, l=l: seen.__setitem__(l, o[0, -1].detach().numpy())
            )
            for l, b in enumerate(loaded.model.transformer.h)
        ]
        with torch.no_grad():
            loaded.model(torch.tensor([ids]))
        for h in handles:
            h.remove()
        for l in range(4):
            np.testing.assert_allclose(acts[l, i], seen[l], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_decorrelation_command_on_the_builtin_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "\n".join(
            [
                "The cat sat on the mat.",
                "def parse(text):",
                "Return the absolute value of a number.",
                "",
                "Paris is the capital of France.",
                "Raise ValueError if the list is empty.",
            ]
        )
        + "\n"
    )
    out = tmp_path / "decor"
    result = run_cli(
        "analyze", "decorrelation", "builtin", "--prompts", str(prompts), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "decorrelation.json").read_text())
    model = report["models"]["SmolLM2-135M-Instruct"]
    assert report["n_prompts"] == 5 and model["n_layers"] == 30 and model["d_mlp"] == 1536
    assert len(model["decorrelation"]) == 30
    assert all(0.0 < v < 2.0 for v in model["decorrelation"])
    acts = np.load(out / "SmolLM2-135M-Instruct.last_token_mlp_pre.npy")
    assert acts.shape == (30, 5, 1536)
    assert (out / "decorrelation.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs(tmp_path, tiny_llama):
    gpt2 = build_tiny_model(str(tmp_path / "gpt2"), "gpt2")
    neo = build_tiny_model(str(tmp_path / "neo"), "gpt_neo")
    cases = [
        (("analyze", "dpo-change", gpt2, neo), "does not have the architecture of base"),
        (("analyze", "weights", gpt2, tiny_llama), "has no MLP input bias"),
        (
            ("analyze", "decorrelation", gpt2, "--prompts", str(tmp_path / "empty.txt")),
            "has no prompts",
        ),
        (
            ("analyze", "decorrelation", gpt2, "--prompts", str(tmp_path / "missing.txt")),
            "not found",
        ),
        (("analyze", "weights", str(tmp_path / "nowhere")), "is not a model directory"),
    ]
    (tmp_path / "empty.txt").write_text("\n  \n")
    for args, message in cases:
        out = tmp_path / "out"
        result = run_cli(*args, "--out", str(out))
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()  # nothing written


def test_analysis_needs_only_numpy():
    code = (
        "import sys, analysis.weights, analysis.weight_stats, analysis.dpo_change, "
        "analysis.decorrelation, analysis.output, analysis.plots; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    mods = set(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        .stdout.strip()
        .split(",")
    )
    assert not mods & {"torch", "jax", "transformers", "matplotlib", "flax"}
