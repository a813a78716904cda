"""Transcoders and skip transcoders: the input from one hook of a store, the target from
another (`data.target_hook`), an optional skip W_skip [d_out, d_in] (`sae.skip_connection`).
Ground truth on toy pairs, the maths of the sparse path and of resampling, meshes, resume,
the SAELens and sparsify layouts, the dry run, and bad configs."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_store, mean_max_cosine, run_on_fake_devices, small_config

from saejax.cli import main
from saejax.config import load_config
from saejax.core import sae as S
from saejax.errors import SaejaxError
from saejax.train import step as T
from saejax.train.dryrun import estimate
from saejax.train.export import export_saelens, export_sparsify
from saejax.train.run import load_run_config, train
from saejax.train.sae_files import load_sae, save_sae

D_IN, D_OUT = 32, 48


def toy_pairs(n, d_in=D_IN, d_out=D_OUT, m=128, p=0.03, noise=0.05, seed=0):
    """x = codes·F_in + noise, y = codes·F_out: sparse codes over m features seen through two
    different dictionaries (an MLP's input and output, say)."""
    rng = np.random.default_rng(seed)
    F_in = rng.normal(size=(m, d_in))
    F_in /= np.linalg.norm(F_in, axis=1, keepdims=True)
    F_out = rng.normal(size=(m, d_out))
    F_out /= np.linalg.norm(F_out, axis=1, keepdims=True)
    codes = (rng.random((n, m)) < p) * rng.uniform(0.5, 1.5, (n, m))
    x = codes @ F_in + noise * rng.normal(size=(n, d_in))
    return x.astype(np.float32), (codes @ F_out).astype(np.float32), F_in, F_out


def unit(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    x, y, F_in, F_out = toy_pairs(60_000)
    path = str(tmp_path_factory.mktemp("tc") / "store")
    make_store(path, {"in": x * 7.0, "out": y * 0.2})  # far from norm sqrt(width) both
    return path, F_in, F_out


def transcoder_config(store, run_dir, *overrides):
    return small_config(store, run_dir, "data.hook=in", "data.target_hook=out", *overrides)


def test_transcoder_recovers_both_dictionaries_with_its_defaults(toy_store, tmp_path):
    """Only the shape, the data and the budget are set (the architecture is the default
    topk). The decoder must hold F_out; each matched latent's encoder column must point at
    its own feature's F_in (of all 128 input directions, the nearest) - with superposition
    the encoder also steers away from the other features, so it is not F_in[i] exactly."""
    store, F_in, F_out = toy_store
    cfg = transcoder_config(
        store,
        str(tmp_path / "run"),
        "sae.d_sae=256",
        "sae.k=4",
        "train.tokens=600000",
        "train.batch_size=512",
        "train.log_every=100",
        "data.block_rows=8192",
    )
    result = train(cfg)
    sae = load_sae(str(tmp_path / "run"))  # model units: the two input scales folded back
    assert sae.info["hook"] == "in" and sae.info["target_hook"] == "out"
    assert sae.spec.transcoder and sae.spec.d_out == D_OUT
    W_dec, W_enc = np.asarray(sae.params["W_dec"]), np.asarray(sae.params["W_enc"]).T
    score = mean_max_cosine(F_out, W_dec)
    matched = (F_out @ unit(W_dec).T).argmax(1)  # the latent of each true feature
    encoder = unit(W_enc[matched]) @ F_in.T  # [feature, F_in direction]
    own = np.diag(encoder)
    print(f"decoder {score:.3f}, encoder {own.mean():.3f}, fvu {result.final_metrics['fvu']:.3f}")
    assert score >= 0.95
    assert np.mean(encoder.argmax(1) == np.arange(len(F_in))) >= 0.9
    assert own.mean() >= 0.7
    assert result.final_metrics["fvu"] < 0.5  # measured on y, not x


def test_skip_transcoder_learns_the_linear_part(tmp_path):
    """y = codes·F_out + x·Aᵀ. In superposition part of codes·F_out is itself linear in x,
    and the skip takes it with A (measured: W_skip is about as far from A as the least-squares
    map of y on x is, 0.6·‖A‖): so the skip is asserted to carry most of A, the whole to beat
    the best linear map by far, and the decoder to hold most of F_out."""
    x, y, _, F_out = toy_pairs(60_000, d_out=D_IN, seed=1)
    A = np.random.default_rng(2).normal(size=(D_IN, D_IN)).astype(np.float32) / np.sqrt(D_IN)
    store = str(tmp_path / "store")
    make_store(store, {"in": x, "out": (y + x @ A.T).astype(np.float32)})
    cfg = transcoder_config(
        store,
        str(tmp_path / "run"),
        "sae.skip_connection=true",
        "sae.d_sae=256",
        "sae.k=4",
        "train.tokens=400000",
        "train.batch_size=512",
        "train.log_every=100",
        "data.block_rows=8192",
    )
    result = train(cfg)
    sae = load_sae(str(tmp_path / "run"))
    assert set(sae.params) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    W_skip = np.asarray(sae.params["W_skip"])
    skip_error = np.linalg.norm(W_skip - A) / np.linalg.norm(A)
    print(f"skip error {skip_error:.3f}, fvu {result.final_metrics['fvu']:.3f}")
    x_raw, y_raw = x[-1000:], (y + x @ A.T)[-1000:]  # held-out rows
    X1 = np.c_[x, np.ones(len(x))]
    linear = X1 @ np.linalg.lstsq(X1, y + x @ A.T, rcond=None)[0] - (y + x @ A.T)
    linear_fvu = np.sum(linear**2) / np.sum((y + x @ A.T - (y + x @ A.T).mean(0)) ** 2)
    assert skip_error < 0.75
    assert result.final_metrics["fvu"] < 0.6 * linear_fvu  # measured 0.16 against 0.36
    assert mean_max_cosine(F_out, sae.params["W_dec"]) >= 0.75  # measured 0.82
    # load_sae's reconstruct includes the skip, in raw units
    err = np.sum((np.asarray(sae.reconstruct(x_raw)) - y_raw) ** 2)
    assert err / np.sum((y_raw - y_raw.mean(0)) ** 2) < 0.3


def random_transcoder(arch="relu", skip=True, d_in=6, d_out=9, d_sae=16, seed=0):
    spec = S.SAESpec(arch, d_in, d_sae, 3, d_out=d_out, transcoder=True, skip_connection=skip)
    rng = np.random.default_rng(seed)
    params = dict(S.init_params(spec, jax.random.PRNGKey(seed)))
    params["b_enc"] = jnp.asarray(rng.normal(0, 0.3, d_sae), jnp.float32)
    params["b_dec"] = jnp.asarray(rng.normal(0, 0.3, d_out), jnp.float32)
    if skip:
        params["W_skip"] = jnp.asarray(rng.normal(0, 0.3, (d_out, d_in)), jnp.float32)
    if "threshold" in params:
        params["threshold"] = jnp.full(d_sae, 0.2, jnp.float32)
    x = jnp.asarray(rng.normal(size=(64, d_in)), jnp.float32)
    return spec, params, x


def test_forward_is_uncentred_encoder_decoder_and_skip():
    spec, params, x = random_transcoder()
    assert params["W_dec"].shape == (16, 9) and params["b_dec"].shape == (9,)
    assert not np.asarray(S.init_params(spec, jax.random.PRNGKey(1))["W_skip"]).any()
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    f = np.maximum(np.asarray(x) @ w["W_enc"] + w["b_enc"], 0)  # b_dec never touches x
    expected = f @ w["W_dec"] + w["b_dec"] + np.asarray(x) @ w["W_skip"].T
    np.testing.assert_allclose(S.forward(params, x, spec)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_topk_path_equals_the_dense_one(skip):
    """Loss, AuxK and every gradient (W_skip's included) agree between the sparse kernels and
    dense matmuls, with y the target and some latents dead."""
    spec, params, x = random_transcoder("topk", skip, d_sae=32)
    y = jnp.asarray(np.random.default_rng(5).normal(size=(64, 9)), jnp.float32)
    dead = jnp.arange(32) % 3 == 0
    out = {}
    for kernel in ("sparse", "dense"):
        s = S.SAESpec(
            "topk", 6, 32, 3, aux_k=8, topk_kernel=kernel, d_out=9, transcoder=True,
            skip_connection=skip,
        )  # fmt: skip
        fn = jax.jit(S.loss_and_grads, static_argnums=2)
        out[kernel] = fn(params, x, s, dead, 0.0, 1 / 32, y)
    sparse, dense = out["sparse"], out["dense"]
    assert float(dense[0]["aux_loss"]) > 0
    for key in ("loss", "fvu", "aux_loss"):
        np.testing.assert_allclose(sparse[0][key], dense[0][key], rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(sparse[3][name], dense[3][name], rtol=1e-4, atol=1e-5)
    # the FVU is measured on y
    y_hat = np.asarray(S.forward(params, x, spec)[0], np.float64)
    yc = np.asarray(y, np.float64)
    fvu = np.sum((yc - y_hat) ** 2) / np.sum((yc - yc.mean(0)) ** 2)
    np.testing.assert_allclose(dense[0]["fvu"], fvu, rtol=1e-4)


def test_resampled_latent_takes_the_residual_and_the_input_of_one_row():
    """A revived latent's decoder row is the unit residual y − ŷ (width d_out) and its encoder
    column the unit x (width d_in) of the same sampled row."""
    spec, params, _ = random_transcoder("relu", True, d_sae=16)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.normal(size=(40, 9)).astype(np.float32)
    scale = (2.0, 0.5)
    tx = optax.adam(1e-3)
    state = T.init_state(params, tx, 0, scale)
    dead = np.arange(16) < 5
    state = state.replace(tokens_since_fired=jnp.asarray(np.where(dead, 10**6, 0), jnp.int32))
    x_t, y_t = x * scale[0], y * scale[1]
    residual = y_t - np.asarray(S.forward(params, jnp.asarray(x_t), spec)[0])
    before = {k: np.asarray(v) for k, v in params.items()}  # resample donates the state
    new = T.resample(state, jnp.asarray(np.concatenate([x, y], 1)), spec, 1000)
    W_enc, W_dec = np.asarray(new.params["W_enc"]).T, np.asarray(new.params["W_dec"])
    for i in np.flatnonzero(dead):
        row = int(np.argmax(unit(x_t) @ unit(W_enc[i])))
        np.testing.assert_allclose(unit(W_enc[i]), unit(x_t[row]), atol=1e-5)
        np.testing.assert_allclose(W_dec[i], unit(residual[row]), atol=1e-5)
    live = ~dead
    np.testing.assert_array_equal(W_dec[live], before["W_dec"][live])
    np.testing.assert_array_equal(new.params["W_skip"], before["W_skip"])


MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from helpers import small_config
    from saejax.train.run import train

    store, out, arch = sys.argv[2:5]
    extra = {
        "relu": ["sae.architecture=relu", "sae.l1_coefficient=20.0", "sae.l1_warmup_steps=4"],
        "topk": ["sae.architecture=topk", "sae.k=4", "sae.dead_tokens=256",
                 "train.resample.enabled=true", "train.resample.steps=[20]"],
    }[arch]
    for mesh in ("1,1", "8,1", "4,2", "1,8"):
        d, m = mesh.split(",")
        cfg = small_config(
            store, f"{out}/{arch}{d}x{m}", "data.hook=in", "data.target_hook=out",
            "sae.skip_connection=true", "sae.d_sae=128", "train.tokens=8192", "train.lr=1e-2",
            "train.grad_clip=0", "train.lr_warmup_steps=0", f"mesh.data={d}", f"mesh.model={m}",
            *extra,
        )
        result = train(cfg)
        params = {k: np.asarray(v) for k, v in result.state.params.items()}
        np.savez(
            f"{out}/{arch}{d}x{m}.npz", **params,
            resampled=np.asarray(result.state.resampled_total),
            shards=len(result.state.params["W_dec"].sharding.device_set),
        )
    """
)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_meshes_match_one_device(arch, tmp_path):
    """(8,1), (4,2) and (1,8) against one device with 8 fake devices, both with a skip path:
    relu (dense, L1), and topk through the sparse kernels, AuxK and a resampling event (with
    uncentred inputs relu's latents keep firing on this toy: none die in 32 steps)."""
    x, y, _, _ = toy_pairs(16384, d_in=16, d_out=24, m=64, p=0.05)
    make_store(str(tmp_path / "store"), {"in": x, "out": y})
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = run_on_fake_devices(
        [str(script), tests_dir, str(tmp_path / "store"), str(tmp_path), arch]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = {m: dict(np.load(tmp_path / f"{arch}{m}.npz")) for m in ("1x1", "8x1", "4x2", "1x8")}
    ref = out["1x1"]
    for mesh, got in out.items():
        d, m = map(int, mesh.split("x"))
        assert int(got["shards"]) == d * m
        for key in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            np.testing.assert_allclose(
                got[key], ref[key], rtol=2e-3, atol=5e-5, err_msg=f"{mesh}: {key}"
            )
    if arch == "topk":
        assert int(ref["resampled"]) > 0


def test_stop_and_resume_equals_uninterrupted(toy_store, tmp_path):
    store = toy_store[0]
    """Across resampling events (topk, resampling on, 256 latents: some die), the pool of a
    resumed run refilled from the data stream."""
    extra = [
        "sae.skip_connection=true",
        "sae.d_sae=256",
        "train.resample.enabled=true",
        "train.resample.every_steps=20",
        "sae.dead_tokens=512",
    ]
    full = train(transcoder_config(store, str(tmp_path / "full"), *extra))
    stopped = train(transcoder_config(store, str(tmp_path / "part"), *extra), max_steps=27)
    resumed = train(load_run_config(str(tmp_path / "part")), resume=True)
    assert int(stopped.state.step) == 27 and int(resumed.state.step) == 64
    assert int(full.state.resampled_total) == int(resumed.state.resampled_total) > 0
    for key, value in full.state.params.items():
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(resumed.state.params[key]), rtol=1e-5, atol=1e-6
        )
    assert full.final_metrics["fvu"] == pytest.approx(resumed.final_metrics["fvu"], rel=1e-5)


def saved_transcoder(tmp_path, arch, skip, d_out=9, name="sae"):
    """A transcoder saved as training would save it, with scales far from 1."""
    spec, params, x = random_transcoder(arch, skip, d_out=d_out)
    cfg = load_config(
        None,
        [f"data.path={tmp_path}/store", "data.hook=in", "data.target_hook=out"],
        check=False,
    )
    path = str(tmp_path / name)
    scales = (3.0, 0.25)
    save_sae(path, params, spec, scales, cfg, {"model": "toy"}, "in")
    # the output for raw x, in raw y units: trained on (3·x) → 0.25·y
    y_raw = np.asarray(S.forward(params, x * scales[0], spec)[0]) / scales[1]
    return path, np.asarray(x), y_raw


def saelens_forward(cfg, w, x):
    """SAELens 6's Transcoder / SkipTranscoder / JumpReLUTranscoder forward, in NumPy."""
    pre = x @ w["W_enc"] + w["b_enc"]  # process_sae_in: no b_dec on the input
    f = np.maximum(pre, 0)
    if cfg["architecture"] == "jumprelu_transcoder":
        f = f * (pre > w["threshold"])
    out = f @ w["W_dec"] + w["b_dec"]
    if cfg["architecture"] == "skip_transcoder":
        out = out + x @ w["W_skip"].T
    return out


@pytest.mark.parametrize(
    "arch, skip, name",
    [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", False, "jumprelu_transcoder"),
        ("batchtopk", False, "jumprelu_transcoder"),
    ],
)
def test_saelens_export_layout_and_round_trip(tmp_path, arch, skip, name):
    from safetensors.numpy import load_file

    path, x, y_raw = saved_transcoder(tmp_path, arch, skip)
    out = export_saelens(path, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    w = load_file(os.path.join(out, "sae_weights.safetensors"))
    assert cfg["architecture"] == name
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (6, 9, 16)
    assert cfg["apply_b_dec_to_input"] is False  # SAELens's TranscoderConfig refuses True
    assert cfg["metadata"]["hook_name"] == "in" and cfg["metadata"]["hook_name_out"] == "out"
    shapes = {"W_enc": (6, 16), "b_enc": (16,), "W_dec": (16, 9), "b_dec": (9,)}
    shapes |= {"W_skip": (9, 6)} if skip else {}
    shapes |= {"threshold": (16,)} if name == "jumprelu_transcoder" else {}
    assert {k: v.shape for k, v in w.items()} == shapes
    np.testing.assert_allclose(saelens_forward(cfg, w, x), y_raw, rtol=1e-4, atol=1e-4)
    for folder in (path, out):  # saejax's own folder and the export load alike
        sae = load_sae(folder)
        assert sae.info["hook"] == "in" and sae.info["target_hook"] == "out"
        assert sae.spec.d_out == 9 and sae.spec.skip_connection == skip
        np.testing.assert_allclose(sae.reconstruct(x), y_raw, rtol=1e-4, atol=1e-4)


def test_sparsify_export_layout_and_round_trip(tmp_path):
    from safetensors.numpy import load_file

    path, x, y_raw = saved_transcoder(tmp_path, "topk", True, d_out=6)
    out = export_sparsify(path, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    w = load_file(os.path.join(out, "sae.safetensors"))
    assert cfg["transcode"] is True and cfg["skip_connection"] is True
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (6, 16, 3)
    assert cfg["hook"] == "in" and cfg["target_hook"] == "out"
    assert {k: v.shape for k, v in w.items()} == {
        "encoder.weight": (16, 6),
        "encoder.bias": (16,),
        "W_dec": (16, 6),
        "b_dec": (6,),
        "W_skip": (6, 6),
    }
    # sparsify's SparseCoder.forward with transcode: topk of relu(x W_encᵀ + b), no centring
    pre = np.maximum(x @ w["encoder.weight"].T + w["encoder.bias"], 0)
    keep = pre >= np.sort(pre, axis=1)[:, -3:][:, :1]
    mine = (pre * keep) @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    np.testing.assert_allclose(mine, y_raw, rtol=1e-4, atol=1e-4)
    sae = load_sae(out)
    assert sae.spec.transcoder and sae.spec.skip_connection and sae.info["target_hook"] == "out"
    np.testing.assert_allclose(sae.reconstruct(x), y_raw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch, skip, export, d_out, message",
    [
        ("topk", False, export_saelens, 9, "SAELens has no TopK transcoder"),
        ("jumprelu", True, export_saelens, 9, "skip transcoder is ReLU only"),
        ("topk", True, export_sparsify, 9, "maps 6 to 9"),
    ],
)
def test_exports_without_a_layout_are_refused(tmp_path, arch, skip, export, d_out, message):
    path, _, _ = saved_transcoder(tmp_path, arch, skip, d_out=d_out)
    with pytest.raises(SaejaxError, match=message):
        export(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_dry_run_counts_the_output_width_and_the_skip(toy_store, tmp_path):
    """The parameters the estimate counts are the bytes the placed state holds."""
    from saejax.train.setup import open_source, prepare

    cfg = transcoder_config(toy_store[0], str(tmp_path / "run"), "sae.skip_connection=true")
    _, _, state, _ = prepare(cfg, open_source(cfg))
    held = sum(np.asarray(v).nbytes for v in state.params.values())
    est = estimate(cfg, D_IN)
    assert est["d_out"] == D_OUT
    assert est["bytes_per_device"]["parameters"] == held
    assert held == 4 * (64 * (D_IN + D_OUT) + D_OUT + 64 + D_OUT * D_IN)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.target_hook=out"], "needs an activation store"),
        (["sae.skip_connection=true"], "needs data.target_hook"),
    ],
)
def test_bad_config_on_npy_is_one_line(tmp_path, capsys, overrides, message):
    np.save(tmp_path / "rows.npy", np.zeros((100, 4), np.float32))
    args = ["train", str(tmp_path / "rows.npy"), f"--set=run_dir={tmp_path / 'run'}"]
    assert main(args + [f"--set={o}" for o in overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.target_hook=nope"], "has no hook 'nope'"),
        (["data.target_hook=in"], "must differ from data.hook"),
        (["sae.architecture=gated"], "not gated"),
    ],
)
def test_bad_transcoder_configs_are_refused(toy_store, tmp_path, overrides, message):
    with pytest.raises(SaejaxError, match=message):
        train(transcoder_config(toy_store[0], str(tmp_path / "run"), *overrides))
    assert not os.path.exists(tmp_path / "run")


def test_a_transcoder_sweep_member_equals_its_separate_run(toy_store, tmp_path, capsys):
    """`saejax sweep` trains transcoders as `saejax train` does ([x | y] rows, both scales,
    d_out), so a member ends bit for bit where its separate run ends; --hooks (other hooks)
    cannot be combined with a target hook."""
    from safetensors.numpy import load_file

    sets = [
        f"data.path={toy_store[0]}",
        "data.hook=in",
        "data.target_hook=out",
        "sae.skip_connection=true",
        "sae.architecture=relu",
        "train.tokens=8192",
        "train.batch_size=256",
        "data.validation_tokens=1024",
        "log.progress=false",
    ]
    out = tmp_path / "sweep"
    args = ["sweep", *[f"--set={s}" for s in sets], "--quiet", "--no-time-alone"]
    assert main([*args, "--d-sae", "32,64", "--out", str(out)]) == 0
    member = next(p for p in out.iterdir() if p.is_dir() and p.name.endswith("d64"))
    separate = train(load_config(None, [*sets, "sae.d_sae=64", f"run_dir={tmp_path / 'alone'}"]))
    saved = load_file(str(member / "sae" / "sae_weights.safetensors"))
    alone = load_file(str(tmp_path / "alone" / "sae" / "sae_weights.safetensors"))
    assert sorted(saved) == sorted(alone) and "W_skip" in saved
    for name in alone:
        np.testing.assert_array_equal(saved[name], alone[name], err_msg=name)
    assert load_sae(str(member)).info["target_hook"] == "out"
    assert separate.spec.d_out == D_OUT

    capsys.readouterr()
    assert main([*args, "--hooks", "in,out", "--d-sae", "32", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_hook" in err[0], err
    assert not os.path.exists(tmp_path / "both")
