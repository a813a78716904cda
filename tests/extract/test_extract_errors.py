"""Every bad extraction input: one clear line, exit status 2, nothing half-written."""

import os

import pytest

pytest.importorskip("torch")

from saejax.cli import main  # noqa: E402


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def base(tiny_llama, corpus_file):
    return [
        "extract",
        "--model",
        tiny_llama,
        "--corpus",
        corpus_file,
        "--tokens",
        "300",
        "--hooks",
        "blocks.1.hook_resid_post",
        "--context",
        "32",
        "--dtype",
        "float32",
        "--quiet",
    ]


def assert_one_line_error(code, err, *phrases):
    assert code == 2
    assert err.startswith("saejax: error:") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.parametrize(
    "args, phrases",
    [
        (
            ["--model", "no-such-org/no-such-model"],
            ["cannot load model", "no-such-org/no-such-model"],
        ),
        (["--hooks", "blocks.9.hook_resid_post"], ["layer 9 is out of range", "0..3"]),
        (["--hooks", "blocks.1.hook_resid_middle"], ["unknown hook name"]),
        (["--corpus", "missing/corpus.txt"], ["corpus file not found"]),
        (["--context", "4096"], ["longer than the model allows", "128"]),
        (["--dtype", "float8"], ["unknown dtype 'float8'"]),
        (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, base, tmp_path, args, phrases):
    out = tmp_path / "store"
    code, err = run_cli(capsys, *base, *args, "--out", str(out))
    assert_one_line_error(code, err, *phrases)
    assert not out.exists()


def test_empty_corpus(capsys, base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "store"
    code, err = run_cli(capsys, *base, "--corpus", str(empty), "--out", str(out))
    assert_one_line_error(code, err, "contains no text")
    assert not out.exists()


def test_existing_store_with_another_configuration(capsys, base, tmp_path):
    out = str(tmp_path / "store")
    assert run_cli(capsys, *base, "--out", out)[0] == 0
    before = open(os.path.join(out, "meta.json")).read()
    for change in (
        ["--hooks", "blocks.2.hook_resid_post"],
        ["--context", "64"],
        ["--dtype", "bfloat16"],
        ["--model", os.path.dirname(out)],
    ):
        code, err = run_cli(capsys, *base, *change, "--out", out)
        if "--model" in change:
            assert_one_line_error(code, err, "cannot load model")
        else:
            assert_one_line_error(code, err, "another configuration")
    assert open(os.path.join(out, "meta.json")).read() == before


def test_other_model_refused(capsys, base, tiny_gpt2, tmp_path):
    out = str(tmp_path / "store")
    assert run_cli(capsys, *base, "--out", out)[0] == 0
    args = list(base)
    args[args.index("--model") + 1] = tiny_gpt2
    code, err = run_cli(capsys, *args, "--out", out)
    assert_one_line_error(code, err, "another configuration", "model")


def test_unwritable_output(capsys, base, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/saejax-store"  # even root cannot create directories in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "store")
    code, err = run_cli(capsys, *base, "--out", target)
    assert_one_line_error(code, err, "cannot be")


def test_output_is_a_foreign_directory(capsys, base, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    code, err = run_cli(capsys, *base, "--out", str(tmp_path))
    assert_one_line_error(code, err, "not a saejax store")
    assert (tmp_path / "mine.txt").read_text() == "precious"
