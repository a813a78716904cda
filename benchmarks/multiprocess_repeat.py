"""Repeat the multi-process layout runs of tests/train/test_multiprocess.py by hand: every
layout x architecture, several times, each under a timeout, each compared with the same run
in one process (same data.slices). Prints one line per run and a summary; exit 1 on any hang
or mismatch.

usage: python benchmarks/multiprocess_repeat.py [--repeats 3] [--log-every 100]
(run from the repository root; on a 2-core machine one run takes 15-40 s)
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import superposition_data  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

LAYOUTS = [(2, 4, (4, 2)), (2, 4, (2, 4)), (4, 2, (2, 4))]  # processes, devices each, mesh
ARCHS = ["topk", "relu", "batchtopk"]
TINY = [
    "sae.d_sae=64",
    "sae.k=4",
    "train.tokens=16384",  # 64 steps
    "train.batch_size=256",
    "train.lr=1e-2",
    "train.lr_warmup_steps=0",
    "train.checkpoint_every=100",  # no checkpoint (which waits) within the run
    "data.validation_tokens=1024",
    "data.block_rows=256",
    "data.shuffle_blocks=2",
    "log.progress=false",
    "sae.dead_tokens=2048",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(n, devices, sets, timeout):
    """(seconds, [return codes]) of `saejax train` in n processes; None on a timeout."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=ROOT,
    )
    port, started = free_port(), time.monotonic()
    args = [sys.executable, "-m", "saejax", "train", *[f"--set={s}" for s in sets]]
    procs = [
        subprocess.Popen(
            [*args, f"--coordinator=localhost:{port}", f"--num-processes={n}", f"--process-id={i}"]
            if n > 1
            else args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(n)
    ]
    try:
        codes = [p.wait(timeout=max(1, timeout - (time.monotonic() - started))) for p in procs]
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return time.monotonic() - started, codes


def max_diff(a, b) -> float:
    wa = load_file(os.path.join(a, "sae", "sae_weights.safetensors"))
    wb = load_file(os.path.join(b, "sae", "sae_weights.safetensors"))
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log-every", type=int, default=100, help="100: no sync in 64 steps")
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="mp_repeat_")
    data = os.path.join(tmp, "acts.npy")
    np.save(data, superposition_data(8192 + 1024, d=32, m=128, p=0.03)[0])
    failures, count = 0, 0
    for n, devices, mesh in LAYOUTS:
        for arch in ARCHS:
            base = [f"data.path={data}", *TINY, f"sae.architecture={arch}", f"data.slices={n}"]
            base.append(f"train.log_every={a.log_every}")
            ref = os.path.join(tmp, f"one_{n}_{arch}")
            run(1, 1, [*base, f"run_dir={ref}"], a.timeout)
            for r in range(a.repeats):
                out = os.path.join(tmp, f"mp_{n}x{devices}_{mesh[0]}x{mesh[1]}_{arch}_{r}")
                on_mesh = [f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}", f"run_dir={out}"]
                result = run(n, devices, [*base, *on_mesh], a.timeout)
                count += 1
                what = f"{n} x {devices} devices at {mesh} {arch:9s} #{r}"
                if result is None:
                    failures += 1
                    print(f"{what}: HUNG (killed after {a.timeout:g} s)", flush=True)
                    continue
                seconds, codes = result
                diff = max_diff(ref, out) if codes == [0] * n else float("nan")
                ok = codes == [0] * n and diff < 1e-5
                failures += not ok
                print(f"{what}: {seconds:5.1f} s, exit {codes}, max |diff| {diff:.2g}", flush=True)
    print(f"{count - failures}/{count} runs finished and matched the one-process run")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
