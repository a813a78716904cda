"""A disk that fills up during `saejax train` (orbax saves checkpoints in the background):
one line, exit 2, the last complete checkpoint kept (the unfinished one is never taken for a
checkpoint, and the next run removes it), and the same resume once space is freed ends where an
uninterrupted run does.

The disk is filled for real, without root: the training process runs under RLIMIT_FSIZE, so
the kernel fails every write past a file size (EFBIG, as ENOSPC fails a write on a full disk)
inside TensorStore's C++ writer, and the error travels through orbax's background threads as
it would for a full disk. What this does not show is a filesystem running out of blocks; the
errnos are handled alike (saejax.errors.DISK_FULL)."""

import os
import subprocess
import sys

import numpy as np
from helpers import small_config, superposition_data

from saejax.errors import disk_full
from saejax.train.checkpoint import Checkpointer
from saejax.train.run import load_run_config, train

# writes past `limit` bytes fail; SIGXFSZ would otherwise kill the process
UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from saejax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run(  # stderr goes to a pipe: a file would be capped too
        [sys.executable, "-c", UNDER_A_FILE_SIZE_LIMIT, str(limit), *args],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
    )


def test_tensorstores_error_for_a_full_disk_is_recognised():
    error = ValueError(
        'OUT_OF_RANGE: Error writing local file "x/_sharding": Failed to write 3848 bytes '
        "to file 19: No space left on device [os_error_code='28']"
    )
    assert disk_full(error).strerror == "No space left on device"
    assert disk_full(ValueError("NOT_FOUND: [os_error_code='2']")) is None  # not a full disk


def test_a_checkpoint_save_that_runs_out_of_space_then_resumes(tmp_path):
    rows, _ = superposition_data(6000, d=16, m=32, p=0.1, seed=2)
    np.save(tmp_path / "rows.npy", rows)
    full = train(small_config(str(tmp_path / "rows.npy"), str(tmp_path / "full")))
    run = tmp_path / "run"
    train(small_config(str(tmp_path / "rows.npy"), str(run)), max_steps=16)

    # a checkpoint's files are 4-12 kB each, metrics.jsonl stays under 4 kB until step 48
    failed = run_with_file_size_limit(4096, "train", "--resume", str(run))
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if not line.startswith("WARNING:absl")]
    assert len(lines) == 1, failed.stderr  # no traceback from orbax's threads either
    assert lines[0].startswith("saejax: error: cannot write a checkpoint in")
    assert "(File too large); the checkpoint at step 16 is kept" in lines[0]
    assert Checkpointer(str(run / "checkpoints")).saved_steps() == [16]

    resumed = train(load_run_config(str(run)), resume=True)  # space freed
    assert sorted(os.listdir(run / "checkpoints")) == ["48", "64"]  # the unfinished save gone
    for key, value in full.state.params.items():
        np.testing.assert_allclose(
            np.asarray(resumed.state.params[key]), np.asarray(value), rtol=1e-6, atol=1e-7
        )
