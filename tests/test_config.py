"""The config: one reference of every setting, forgiving number forms, strict values.

Bad inputs go through `saejax train ... --dry-run`, so a mistake that slipped through would
print an estimate and exit 0 instead of the one line and exit status 2 expected here.
"""

import argparse
import dataclasses
import pathlib
import typing

import numpy as np
import pytest

from saejax import config as C
from saejax.cli import main
from saejax.core.architectures import ARCHITECTURES, TOPK_KERNELS

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = (
    C.RunConfig,
    C.DataConfig,
    C.ResampleConfig,
    C.SAEConfig,
    C.TrainConfig,
    C.MeshConfig,
    C.LogConfig,
)


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32))
    return str(path)


def dry_run(capsys, *args):
    """`saejax train ARGS --dry-run`: (exit status, stdout, stderr lines)."""
    code = main(["train", *args, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def one_line_error(capsys, *args) -> str:
    code, out, err = dry_run(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("saejax: error: "), (code, out, err)
    return err[0]


# ---- the reference -------------------------------------------------------------------


def test_every_field_of_every_section_has_a_doc_and_is_in_the_reference():
    listed = {s.key: s for s in C.settings()}
    markdown, commented = C.reference_markdown(), C.reference_yaml()
    paths = {C.RunConfig: ""}  # section class -> its dotted prefix
    for cls in SECTIONS:
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} has no one-line doc"
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                paths[hint] = paths[cls] + f.name + "."
    for cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue
            key = paths[cls] + f.name
            assert listed[key].doc == f.metadata["doc"]
            assert f"| `{key}` |" in markdown and f.metadata["doc"] in markdown
            assert f"{f.name}: " in commented and f.metadata["doc"] in commented


def test_the_printed_reference_is_a_config_that_loads_as_the_defaults(tmp_path, capsys):
    assert main(["config"]) == 0
    printed = capsys.readouterr().out
    assert printed == C.reference_yaml()
    assert (
        "# the SAE's activation and sparsity rule "
        "(one of relu, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk)"
    ) in printed
    saved = tmp_path / "every_key.yaml"
    saved.write_text(printed)
    assert C.load_config(str(saved), check=False) == C.RunConfig()


def test_the_readme_table_is_the_output_of_saejax_config_markdown(capsys):
    assert main(["config", "--markdown"]) == 0
    table = capsys.readouterr().out
    text = README.read_text()
    begin, end = (
        "<!-- saejax config --markdown: begin -->\n",
        "<!-- saejax config --markdown: end -->",
    )
    in_readme = text[text.index(begin) + len(begin) : text.index(end)]
    assert in_readme == table, "refresh README.md with `python -m saejax config --markdown`"


def test_choices_come_from_the_types_and_architecture_from_core():
    hints = typing.get_type_hints(C.SAEConfig)
    assert C.choices_of(hints["architecture"]) == ARCHITECTURES
    assert C.choices_of(hints["topk_kernel"]) == TOPK_KERNELS
    with pytest.raises(C.SaejaxError, match=r"^sae.architecture must be one of relu, topk, batch"):
        C.load_config(None, ["data.path=x.npy", "sae.architecture=transcoder"])


def test_help_shows_defaults_and_points_at_saejax_config(capsys):
    for argv in (["train", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert "`saejax config` lists every key" in out
    assert "input width (default: 576)" in out


# ---- forgiving forms, strict values ----------------------------------------------------


@pytest.mark.parametrize("written", ["1e6", "1_000_000", "1000000", "1.0e6"])
def test_whole_numbers_in_scientific_or_grouped_form(tmp_path, written):
    assert C.load_config(None, ["data.path=x.npy", f"train.tokens={written}"]).train.tokens == (
        1_000_000
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  path: x.npy\ntrain:\n  tokens: {written}\n  lr: 3e-4\n")
    cfg = C.load_config(str(path))
    assert cfg.train.tokens == 1_000_000 and type(cfg.train.tokens) is int
    assert cfg.train.lr == 3e-4


def test_each_value_is_read_as_its_setting_s_type(tmp_path):
    cfg = C.load_config(
        None,
        [
            "data.path=x.npy",
            "run_dir=2024.10",  # text, not the number 2024.1
            "data.hook=12",
            "mesh.distributed=off",  # a choice, though YAML alone reads `off` as false
            "log.wandb=true",
            "train.resample.steps=[100, 2e3]",
        ],
    )
    assert (cfg.run_dir, cfg.data.hook, cfg.mesh.distributed) == ("2024.10", "12", "off")
    assert cfg.log.wandb is True and cfg.train.resample.steps == [100, 2000]
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: x.npy\n  hook: null\nmesh:\n  distributed: off\n")
    cfg = C.load_config(str(path))
    assert cfg.data.hook is None and cfg.mesh.distributed == "off"
    assert C.load_config(None, ["data.path=x.npy", "data.hook=null"]).data.hook is None


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.tokens=1500.5", "train.tokens must be a whole number, got 1500.5"),
        ("train.tokens=1.5005e3", "train.tokens must be a whole number, got 1500.5"),
        ("train.tokens=1,000,000", "train.tokens expects int, got '1,000,000'"),
        ("sae.d_sae=big", "sae.d_sae expects int, got 'big'"),
        ("train.tokens=1e999999999", "train.tokens is too large, got 1e999999999"),
        ("train.lr=fast", "train.lr expects float, got 'fast'"),
        ("log.wandb=maybe", "log.wandb expects true or false, got 'maybe'"),
        ("train.lr_schedule=step", "train.lr_schedule must be one of constant, cosine, linear"),
        ("sae.dtype=float16", "sae.dtype must be one of float32, bfloat16, got 'float16'"),
        ("sae.b_dec_init=median", "sae.b_dec_init must be one of geometric_median, mean, zeros"),
        ("mesh.distributed=on", "mesh.distributed must be one of off, auto, got 'on'"),
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("sae.l1_coefficient=-.inf", "sae.l1_coefficient must be a finite number, got -inf"),
        ("train.lr=-1e-3", "train.lr must be positive (or 0 for the automatic lr), got -0.001"),
        ("train.lr_decay_fraction=1.5", "train.lr_decay_fraction must be in [0, 1], got 1.5"),
        ("train.adam_b1=1", "train.adam_b1 must be in [0, 1), got 1.0"),
        ("train.adam_b2=-0.1", "train.adam_b2 must be in [0, 1), got -0.1"),
        ("train.grad_clip=-1", "train.grad_clip must be 0 or more, got -1.0"),
        ("sae.l1_coefficient=-2", "sae.l1_coefficient must be 0 or more"),
        ("sae.l0_coefficient=-2", "sae.l0_coefficient must be 0 or more"),
        ("sae.aux_coefficient=-2", "sae.aux_coefficient must be 0 or more"),
        ("data.validation_tokens=0", "data.validation_tokens must be at least 1, got 0"),
        ("data.block_rows=0", "data.block_rows must be at least 1, got 0"),
        ("data.shuffle_blocks=0", "data.shuffle_blocks must be at least 1, got 0"),
        ("data.prefetch=0", "data.prefetch must be at least 1, got 0"),
        ("data.loader_threads=-1", "data.loader_threads must be 0 or more, got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1, got 0"),
        ("sae.dead_tokens=0", "sae.dead_tokens must be at least 1, got 0"),
        ("train.resample.stop_after_fraction=0", "stop_after_fraction must be in (0, 1], got 0.0"),
        ("train.resample.stop_after_fraction=1.5", "must be in (0, 1], got 1.5"),
        ("train.resample.steps=[100,-5]", "train.resample.steps must all be at least 1"),
        ("train.resample.steps=[1.5]", "train.resample.steps[0] must be a whole number, got 1.5"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(capsys, rows_path, tmp_path, setting, message):
    err = one_line_error(
        capsys, f"--set=data.path={rows_path}", f"--set=run_dir={tmp_path}", f"--set={setting}"
    )
    assert message in err and "<class" not in err


def test_nan_in_a_yaml_file_is_refused(capsys, rows_path, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  path: {rows_path}\nsae:\n  jumprelu_bandwidth: .nan\n")
    assert "sae.jumprelu_bandwidth must be a finite number, got nan" in one_line_error(
        capsys, str(path)
    )


def test_a_config_built_in_code_is_checked_too():
    cfg = C.RunConfig(data=C.DataConfig(path="x.npy"), train=C.TrainConfig(lr=float("inf")))
    with pytest.raises(C.SaejaxError, match="train.lr must be a finite number"):
        C.validate(cfg)
    cfg = C.RunConfig(data=C.DataConfig(path="x.npy"), sae=C.SAEConfig(architecture="transcoder"))
    with pytest.raises(C.SaejaxError, match="sae.architecture must be one of"):
        C.validate(cfg)


# ---- data where the config belongs -----------------------------------------------------


def test_a_data_file_given_as_the_config_is_the_data(capsys, rows_path, tmp_path):
    code, out, err = dry_run(capsys, rows_path, f"--set=run_dir={tmp_path / 'r'}")
    assert code == 0, err
    assert C.load_config(rows_path).data.path == rows_path


def test_a_binary_config_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    err = one_line_error(capsys, str(path))
    assert f"config {path} is not a text file" in err and f"--set data.path={path}" in err


def test_a_run_directory_given_as_the_config_points_at_resume(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("run_dir: x\n")
    err = one_line_error(capsys, str(tmp_path))
    assert f"saejax train --resume {tmp_path}" in err


def test_whole_number_options_take_the_same_forms():
    from saejax.cli.command import whole_number

    assert whole_number("2.5e5") == whole_number("250_000") == 250_000
    for bad in ("1500.5", "1,000", "ten", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number"):
            whole_number(bad)


def test_lr_zero_is_the_automatic_lr_that_falls_with_the_dictionary_size():
    from saejax.config import SAEConfig, TrainConfig
    from saejax.train.step import resolve_lr

    assert TrainConfig().lr == 0.0  # the shipped default is automatic
    assert resolve_lr(TrainConfig(), SAEConfig(d_sae=2**14)) == pytest.approx(5e-4)
    assert resolve_lr(TrainConfig(), SAEConfig(d_sae=2**12)) == pytest.approx(1e-3)
    assert resolve_lr(TrainConfig(lr=3e-4), SAEConfig(d_sae=2**12)) == 3e-4  # explicit wins


def test_wsd_holds_the_lr_then_decays_it_to_zero_over_the_last_fifth():
    from saejax.config import TrainConfig
    from saejax.train.step import make_schedule

    schedule = make_schedule(TrainConfig(lr=1.0, lr_warmup_steps=10), 100)
    assert float(schedule(5)) == pytest.approx(0.5)  # warm-up
    assert float(schedule(10)) == float(schedule(79)) == 1.0  # held
    assert float(schedule(90)) == pytest.approx(0.5)  # half way down the last 20 steps
    assert float(schedule(100)) == 0.0
