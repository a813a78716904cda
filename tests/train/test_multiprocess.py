"""Two local processes with jax.distributed train the run one process trains."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from helpers import superposition_data
from safetensors.numpy import load_file

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(data, run_dir, logs, n):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(SCRIPTS, "multiprocess_run.py"),
                data,
                run_dir,
                logs[i],
                str(i),
                str(n),
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def test_two_processes_train_what_one_trains(tmp_path):
    rows, _ = superposition_data(8192 + 1024, d=32, m=128, p=0.03)
    data = str(tmp_path / "acts.npy")
    np.save(data, rows)
    launch(data, str(tmp_path / "one"), [str(tmp_path / "one.json")], 1)
    logs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    launch(data, str(tmp_path / "two"), logs, 2)

    one = load_file(str(tmp_path / "one" / "sae" / "sae_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(two[name], one[name], rtol=2e-3, atol=2e-5, err_msg=name)

    # the training reads (whole blocks) of each process stay inside its own half of the rows
    train_rows = len(rows) - 1024
    half = train_rows // 2
    for i, log in enumerate(logs):
        blocks = [(a, b) for a, b in json.load(open(log)) if b - a == 256]
        assert blocks, "no training reads recorded"
        assert all(i * half <= a and b <= (i + 1) * half for a, b in blocks), (i, blocks[:5])
    assert os.path.exists(tmp_path / "two" / "eval.json")
