"""saejax against SAELens and EleutherAI's sparsify, on the same shapes, in one run.

    python benchmarks/compare_peers/run.py                      # d_in 576, batch 4096, fp32
    python benchmarks/compare_peers/run.py --d-sae 4608 --rounds 2 --steps 2
    python benchmarks/compare_peers/run.py --dtype bfloat16     # peers under torch.autocast

The peers live in a virtual environment of their own (default ~/.cache/saejax-peers,
created on first use: the CPU torch 2.13.0, then `sae-lens` and `eai-sparsify` from PyPI).
Each implementation runs in a persistent worker process (worker.py); the timed rounds
rotate through the workers, so machine noise hits all of them alike. Each figure is the
median over rounds of seconds per step (forward, loss, backward, Adam); ratios are
saejax's tokens/s over the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER_PACKAGES = ["sae-lens", "eai-sparsify"]


def ensure_peer_venv(path: str) -> str:
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".saejax-peers-installed")
    if os.path.exists(marker):
        return python
    print(f"installing the peers into {path} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU build, before anything pulls CUDA
    subprocess.run(pip + PEER_PACKAGES, check=True)
    open(marker, "w").close()
    return python


def peer_versions(python: str) -> dict:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "['torch', 'sae-lens', 'eai-sparsify']}))"
    )
    return json.loads(
        subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    )


class Worker:
    def __init__(self, impl: str, python: str):
        env = dict(
            os.environ, PYTHONPATH=ROOT if impl == "saejax" else "", TF_CPP_MIN_LOG_LEVEL="2"
        )
        self.impl = impl
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker died (see its output above)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(case: dict, impls: list[str], pythons: dict, rounds: int, steps: int) -> dict:
    workers = [Worker(impl, pythons[impl]) for impl in impls]
    try:
        for w in workers:
            w.ask(cmd="setup", impl=w.impl, **case)
        per_step = {w.impl: [] for w in workers}
        for r in range(rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for w in order:
                per_step[w.impl].append(w.ask(cmd="time", steps=steps)["seconds"] / steps)
    finally:
        for w in workers:
            w.close()
    seconds = {impl: statistics.median(v) for impl, v in per_step.items()}
    tokens = {impl: case["batch"] / s for impl, s in seconds.items()}
    ratios = {impl: tokens["saejax"] / tokens[impl] for impl in tokens if impl != "saejax"}
    return {
        **case,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens,
        "saejax_speedup": ratios,
        "rounds": per_step,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", default="4608,18432")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: saejax's bf16 compute; the peers under torch.autocast(cpu, bfloat16)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--venv", default=os.path.expanduser("~/.cache/saejax-peers"))
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    pythons = {"saejax": sys.executable, "saelens": ensure_peer_venv(args.venv)}
    pythons["sparsify"] = pythons["saelens"]
    versions = peer_versions(pythons["saelens"])
    print(
        f"peers: {versions}; d_in {args.d_in}, batch {args.batch}, {args.dtype}, CPU threads "
        f"{os.cpu_count()}",
        flush=True,
    )
    results = []
    for d_sae in [int(v) for v in args.d_sae.split(",")]:
        for arch, impls in (
            ("relu", ["saejax", "saelens"]),
            ("topk", ["saejax", "sparsify", "saelens"]),
        ):
            case = {
                "arch": arch,
                "d_in": args.d_in,
                "d_sae": d_sae,
                "batch": args.batch,
                "k": args.k,
                "dtype": args.dtype,
            }
            r = compare(case, impls, pythons, args.rounds, args.steps)
            results.append(r)
            shown = "  ".join(
                f"{impl} {1000 * s:7.0f} ms" for impl, s in r["seconds_per_step"].items()
            )
            ratios = "  ".join(f"×{v:.2f} vs {impl}" for impl, v in r["saejax_speedup"].items())
            print(f"{arch:<5} d_sae {d_sae:>6}: {shown}   saejax {ratios}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "dtype": args.dtype, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
