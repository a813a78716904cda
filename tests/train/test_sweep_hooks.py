"""`saejax sweep --hooks`: many hooks of one store in one run. One loader pass reads every hook
at the same rows, every member trains in one compiled program on its hook's columns of the
batch, and each member ends where a separate `saejax train` with data.hook set ends."""

import collections
import json

import numpy as np
import pytest
import yaml
from helpers import make_store, superposition_data
from safetensors.numpy import load_file

from saejax.cli import main
from saejax.config import load_config
from saejax.store import ActivationStore
from saejax.train.run import train

N_ROWS = 8192
BLOCK = 256
SETS = [
    "train.tokens=1536",  # 12 steps: well inside one epoch, so no block is due twice
    "train.batch_size=128",
    "sae.k=4",
    "data.validation_tokens=1024",
    "train.log_every=4",
    "train.checkpoint_every=8",
    "log.progress=false",
    f"data.block_rows={BLOCK}",
    "data.shuffle_blocks=2",
]
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def three_hooks(path) -> None:
    """Hooks a and b 16 wide, c 48 wide (think resid and mlp.hook_pre), of different scales, so
    each member's input scale and b_dec must be its own hook's."""
    a, _ = superposition_data(N_ROWS, d=16, m=64, p=0.05, seed=1)
    b, _ = superposition_data(N_ROWS, d=16, m=64, p=0.05, seed=2)
    c, _ = superposition_data(N_ROWS, d=48, m=128, p=0.03, seed=3)
    make_store(path, {"a": a, "b": 10 * b + 1, "c": 0.1 * c})


def count_reads(monkeypatch) -> list:
    """Every ActivationStore read (read_async, and read_into, the loader's) as (hook, start,
    stop)."""
    calls = []
    real_async, real_into = ActivationStore.read_async, ActivationStore.read_into

    def read_async(self, start, stop, hook=None):
        calls.append((hook, start, stop))
        return real_async(self, start, stop, hook)

    def read_into(self, start, stop, out, hook=None):
        calls.append((hook, start, stop))
        return real_into(self, start, stop, out, hook)

    monkeypatch.setattr(ActivationStore, "read_async", read_async)
    monkeypatch.setattr(ActivationStore, "read_into", read_into)
    return calls


def training_reads(calls: list, hook: str) -> list:
    """The training reads of `hook`: whole blocks of training rows (the held-out evaluation
    reads the rows past the training split and is left out)."""
    return [(lo, hi) for h, lo, hi in calls if h == hook and hi - lo == BLOCK and lo % BLOCK == 0]


def max_difference(run_dir, params) -> float:
    saved = load_file(str(run_dir / "sae" / "sae_weights.safetensors"))
    return max(float(np.abs(saved[k] - np.asarray(params[k])).max()) for k in WEIGHTS)


def test_three_hooks_read_once_per_block_and_members_equal_separate_runs(tmp_path, monkeypatch):
    """`saejax sweep --hooks a,b,c --d-sae 32,64 --k 4`, through the library calls the command
    makes, without timing each member's step alone (nothing here reads that figure)."""
    from saejax.train.sweep import members_of, run_sweep, sweep_hooks
    from saejax.train.sweep_table import write_table

    store = tmp_path / "store"
    three_hooks(str(store))
    sets = [f"data.path={store}", *SETS]
    out = tmp_path / "sweep"
    calls = count_reads(monkeypatch)
    grid = members_of("topk", [32, 64], [4], [], hooks=sweep_hooks(str(store), ["a", "b", "c"]))
    rows = run_sweep(load_config(None, sets), grid, str(out), progress=False, time_alone=False)
    write_table(rows, str(out))

    # "once": each block of training rows is read once per hook (one read per hook per
    # block, issued together), however many members read that hook (two here), just as a
    # single-hook run reads each block of its hook once.
    swept = {h: training_reads(calls, h) for h in "abc"}
    assert len(swept["a"]) >= 12 * 128 // BLOCK  # at least the blocks the 12 steps needed
    assert swept["a"] == swept["b"] == swept["c"]  # the three hooks at the same rows
    assert max(collections.Counter(swept["a"]).values()) == 1

    table = json.loads((out / "sweep.json").read_text())["members"]
    assert [(m["hook"], m["d_sae"], m["k"]) for m in table] == [
        (h, d, 4) for h in "abc" for d in (32, 64)
    ]
    md = (out / "sweep.md").read_text()
    assert md.startswith("| hook | d_sae |") and "| c | 64 | 4 |" in md
    assert "c-d32_k4" in md

    for hook, d_in in (("a", 16), ("b", 16), ("c", 48)):
        member = out / f"{hook}-d64_k4"
        config = yaml.safe_load((member / "config.yaml").read_text())
        assert config["data"]["hook"] == hook and config["sae"]["d_sae"] == 64
        saved = json.loads((member / "sae" / "sae.json").read_text())
        assert (saved["hook"], saved["spec"]["d_in"]) == (hook, d_in)
        alone = tmp_path / f"alone-{hook}"
        calls.clear()
        separate = train(
            load_config(None, [*sets, f"data.hook={hook}", "sae.d_sae=64", f"run_dir={alone}"])
        )
        single = training_reads(calls, hook)
        assert max(collections.Counter(single).values()) == 1
        assert single[:6] == swept[hook][:6]  # the same blocks, in the same order
        assert separate.spec.d_in == d_in
        # bit for bit (on the CPU): the hook's columns sliced inside the sweep's program
        # give the same step as the separate run's own batch
        assert max_difference(member, separate.state.params) == 0.0, hook
        ours = json.loads((member / "eval.json").read_text())
        assert (ours["fvu"], ours["l0"]) == (
            separate.final_metrics["fvu"],
            separate.final_metrics["l0"],
        )


def test_a_stopped_hook_sweep_with_resampling_resumes_to_the_separate_runs(tmp_path):
    """Members of two widths revive dead latents from their own hook's pool (at steps 4 and 8);
    the sweep stops at step 7, so its resume refills that pool from the stream."""
    from saejax.train.sweep import members_of, run_sweep

    store = tmp_path / "store"
    three_hooks(str(store))
    sets = [
        f"data.path={store}",
        *SETS,
        "sae.k=1",  # few latents fire per batch: many are dead after one batch
        "sae.dead_tokens=128",
        "train.resample.enabled=true",
        "train.resample.steps=[4,8]",
        "train.resample.pool_batches=2",
    ]
    grid = members_of("topk", [64], [], [], hooks=["b", "c"])
    out = tmp_path / "sweep"
    run_sweep(
        load_config(None, sets), grid, str(out), progress=False, max_steps=7, time_alone=False
    )
    assert (out / "c-d64" / "checkpoints" / "7").is_dir()
    rows = run_sweep(load_config(None, sets), grid, str(out), progress=False, time_alone=False)
    assert [r["hook"] for r in rows] == ["b", "c"]
    for hook in ("b", "c"):
        alone = tmp_path / f"alone-{hook}"
        separate = train(
            load_config(None, [*sets, f"data.hook={hook}", "sae.d_sae=64", f"run_dir={alone}"])
        )
        assert separate.state.resampled_total > 0  # the revival happened and is compared
        assert max_difference(out / f"{hook}-d64", separate.state.params) == 0.0, hook


def test_bad_hooks_are_one_line_and_leave_nothing(tmp_path, capsys):
    store = tmp_path / "store"
    three_hooks(str(store))
    npy = tmp_path / "acts.npy"
    np.save(npy, np.ones((64, 4), np.float32))
    out = tmp_path / "sweep"
    for data, hooks, message in (
        (store, "a,z", "has no hook 'z'"),
        (store, "a,b,a", "names a hook twice (a)"),
        (store, ",", "--hooks needs at least one hook"),
        (npy, "a", "--hooks needs a store"),
    ):
        code = main(
            ["sweep", "--set", f"data.path={data}", *sum((["--set", s] for s in SETS), [])]
            + ["--hooks", hooks, "--d-sae", "32", "--out", str(out), "--quiet"]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_all_hooks_of_the_store(tmp_path):
    from saejax.train.sweep import sweep_hooks

    store = tmp_path / "store"
    three_hooks(str(store))
    assert sweep_hooks(str(store), ["all"]) == ["a", "b", "c"]
    assert sweep_hooks(str(store), ["c", "a"]) == ["c", "a"]


def test_a_transcoder_s_statistics_need_its_target_beside_the_input(tmp_path):
    """Every command reads a transcoder's rows through `open_source` ([x | y]); a library
    caller that opens the input hook alone gets one line saying how to open them instead."""
    from saejax.errors import SaejaxError
    from saejax.train.data import ArraySource
    from saejax.train.setup import data_statistics, open_source

    store = tmp_path / "store"
    three_hooks(str(store))
    cfg = load_config(None, [f"data.path={store}", "data.hook=a", "data.target_hook=c", *SETS])
    with pytest.raises(SaejaxError) as err:
        data_statistics(cfg, ArraySource(str(store), "a"))
    message = str(err.value)
    assert "data.target_hook c" in message and "open_source(cfg)" in message
    assert "\n" not in message
    (x_scale, y_scale), b_dec = data_statistics(cfg, open_source(cfg))
    assert x_scale > 0 and y_scale > 0 and b_dec.shape == (48,)  # b_dec in the target's width
