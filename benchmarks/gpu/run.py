"""saejax on a GPU, in one command: a markdown table of the training step, the peers, the
whole loop and extraction, all measured in the same run.

    python benchmarks/gpu/run.py --out table.md              # the full grid (a GPU machine)
    python benchmarks/gpu/run.py --smoke                     # tiny shapes, CPU, seconds

What it measures (bfloat16 compute throughout):
- the compiled training step's tokens/s for relu, topk, batchtopk and jumprelu at d_in 2048
  and 4096, d_sae 16,384 / 65,536 / 262,144, batch 4096 and 8192; TopK once per kernel path
  (dense, sparse = XLA's primitives on a GPU, pallas), each with the fraction of the bf16
  matmul peak measured on the same shape in the same run (the faster of bf16 → bf16 and
  bf16 → float32; `saejax.train.bench.matmul_peak`);
- sparsify (its Triton kernels) and SAELens on the same shapes, same device, through
  benchmarks/compare_peers/worker.py (float32 weights under torch.autocast bfloat16);
- the whole `train()` loop from a synthetic store on local disk, as a fraction of the step
  (`saejax.train.bench.run_bench` with the loop on);
- extraction tokens/s against the bare truncated forward, for a Llama-architecture model of
  d_model 2048 built from a config with random weights (no download).

Every measurement runs in a subprocess of its own (`--job`), so that each starts with the
whole GPU memory and an out-of-memory shape becomes one row saying so. No network needed;
see README.md for the wheels to bring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_KERNELS = ("dense", "sparse", "pallas")
PEERS = {"sparsify": ("topk",), "saelens": ("relu", "topk", "batchtopk", "jumprelu")}

FULL = {
    "d_in": [2048, 4096],
    "d_sae": [16384, 65536, 262144],
    "batch": [4096, 8192],
    "k": 32,
    "steps": 10,
    "loop": {"arch": "topk", "d_in": 2048, "d_sae": 65536, "batch": 4096},
    "extract": {"d_model": 2048, "layers": 16, "tokens": 200_000, "batch_size": 32},
}
SMOKE = {
    "d_in": [16],
    "d_sae": [64, 128],
    "batch": [32],
    "k": 4,
    "steps": 2,
    "loop": {"arch": "topk", "d_in": 16, "d_sae": 64, "batch": 32},
    "extract": {"d_model": 64, "layers": 2, "tokens": 1000, "batch_size": 4},
}


# ---- jobs (each in its own process) ------------------------------------------------------
def job_steps(d_in: int, d_sae: int, batch: int, k: int, steps: int, variants: list) -> dict:
    """The bf16 matmul peak on this shape, then the step of each (arch, topk_kernel)."""
    import gc

    import jax

    from saejax.train.bench import StepShape, bench_step, matmul_peak

    peak = matmul_peak(batch, d_in, d_sae, "bfloat16")
    rows = []
    for arch, kernel in variants:
        shape = StepShape(arch, d_in, d_sae, batch, k, "bfloat16", kernel)
        try:
            rows.append(bench_step(shape, steps, peak))
        except Exception as err:  # an out-of-memory shape or a kernel that fails to lower
            rows.append({"arch": arch, "topk_kernel": kernel, "error": _short(err)})
        gc.collect()
        jax.clear_caches()
    return {"peak_flops": peak, "device": str(jax.devices()[0]), "rows": rows}


def job_peer(impl: str, arch: str, d_in: int, d_sae: int, batch: int, k: int, steps: int):
    """seconds per step of a PyTorch peer (median of 3 rounds after a warm-up)."""
    import statistics

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "compare_peers"))
    from worker import IMPLS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = IMPLS[impl](arch, d_in, d_sae, batch, k, device, "bfloat16")
    step.run(2)
    per_step = [step.run(steps) / steps for _ in range(3)]
    return {"seconds_per_step": statistics.median(per_step), "device": device}


def job_loop(arch: str, d_in: int, d_sae: int, batch: int, k: int, steps: int, tmp: str):
    """The whole train() loop from a synthetic store on local disk against the step."""
    tempfile.tempdir = tmp or None
    from saejax.train.bench import StepShape, run_bench

    shape = StepShape(arch, d_in, d_sae, batch, k, "bfloat16")
    out = run_bench([shape], steps, None, True, say=lambda line: print(line, file=sys.stderr))
    return {
        "loop": out["loop"],
        "loader_tokens_per_s": out["loader_tokens_per_s"],
        "step": out["results"][0],
    }


def job_extract(d_model: int, layers: int, tokens: int, batch_size: int, tmp: str):
    """Extraction tokens/s against the bare truncated forward, a random Llama on the GPU."""
    import statistics

    import torch

    from extract import hooks
    from extract.extractor import ExtractConfig, run_extract
    from extract.models import load_model

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_extract import bare_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = tempfile.mkdtemp(prefix="saejax-gpu-extract-", dir=tmp or None)
    model_dir = os.path.join(work, "model")
    build_llama(model_dir, d_model, layers)
    loaded = load_model(model_dir, dtype="bfloat16")
    loaded.model.to(device)
    hook = f"blocks.{layers // 2}.hook_resid_post"
    # extract/ runs the model where it lies and reads captures with .numpy(): on a GPU the
    # batch goes to the device and the captures come back to the host (as an extraction on a
    # GPU must do); the bare forward only synchronises.
    run_on_host = hooks.Capture.run

    def run_on_device(self, input_ids, to_host=True):
        captured = run_on_host(self, input_ids.to(device))
        if to_host:
            return {name: t.cpu() for name, t in captured.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        return captured

    bare_s, extract_s = [], []
    try:
        for r in range(3):
            hooks.Capture.run = lambda self, ids: run_on_device(self, ids, to_host=False)
            bare_s.append(bare_forward(loaded, hook, tokens, 128, batch_size))
            hooks.Capture.run = run_on_device
            cfg = ExtractConfig(
                out=os.path.join(work, f"store{r}"),
                model=model_dir,
                hooks=[hook],
                tokens=tokens,
                context=128,
                batch_size=batch_size,
            )
            start = time.perf_counter()
            run_extract(cfg, progress=False, loaded=loaded)
            extract_s.append(time.perf_counter() - start)
    finally:
        hooks.Capture.run = run_on_host
    return {
        "device": device,
        "d_model": d_model,
        "layers": layers,
        "hook": hook,
        "tokens": tokens,
        "bare_tokens_per_s": tokens / min(bare_s),
        "extract_tokens_per_s": tokens / min(extract_s),
        "ratio": statistics.median(b / e for b, e in zip(bare_s, extract_s)),
    }


def build_llama(directory: str, d_model: int, layers: int) -> None:
    """A Llama-architecture model with random weights and a small byte-level BPE tokenizer
    trained on the built-in corpus, saved to `directory` (no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from extract.corpus import open_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<bos>", "<eos>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = open_corpus("builtin").documents()
    tok.train_from_iterator((d for _, d in zip(range(2000), docs)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=max(1, d_model // 64),
        num_key_value_heads=max(1, d_model // 256),
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)


JOBS = {"steps": job_steps, "peer": job_peer, "loop": job_loop, "extract": job_extract}


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160]


def run_job(name: str, args: dict, timeout: float, python: str = sys.executable) -> dict:
    """One job in a fresh process: its result, or {"error": ...} if it failed or timed out."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"),
    )
    command = [python, os.path.abspath(__file__), "--job", json.dumps({"job": name, **args})]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


# ---- the table ------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "torch", "triton", "sae-lens", "eai-sparsify", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _tok(value) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else "—"


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [
        f"# saejax on {results['device']} ({'smoke' if results['smoke'] else 'full grid'})",
        "",
        f"{results['date']}; " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"Command: `{results['command']}`",
        "",
        "## Training step, bfloat16 (tokens/s; % of the bf16 matmul peak on the same shape)",
        "",
        "| d_in | d_sae | batch | implementation | arch | TopK kernel | tokens/s | ms/step "
        "| % of peak | peak GFLOP/s |",
        "|---:|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for group in results["steps"]:
        peak = group.get("peak_flops")
        peak_s = f"{peak / 1e9:,.0f}" if peak else "—"
        if "error" in group:
            lines.append(
                f"| {group['d_in']} | {group['d_sae']:,} | {group['batch']} | saejax | all | | "
                f"{group['error']} | | | |"
            )
            continue
        for r in group["rows"]:
            kernel = r.get("topk_kernel") or ""
            if "error" in r:
                cells = f"{r['error']} | | |"
            else:
                cells = (
                    f"{_tok(r['tokens_per_s'])} | {r['step_ms']:.1f} | "
                    f"{100 * r['fraction_of_peak']:.1f} |"
                )
            lines.append(
                f"| {group['d_in']} | {group['d_sae']:,} | {group['batch']} | saejax | "
                f"{r['arch']} | {kernel} | {cells} {peak_s} |"
            )
        for p in group.get("peers", []):
            if "error" in p:
                cells = f"{p['error']} | |"
            else:
                s = p["seconds_per_step"]
                cells = f"{_tok(group['batch'] / s)} | {1000 * s:.1f} |"
            lines.append(
                f"| {group['d_in']} | {group['d_sae']:,} | {group['batch']} | {p['impl']} | "
                f"{p['arch']} | | {cells} | |"
            )
    lines += ["", "## saejax ÷ peer (tokens/s, saejax's fastest TopK path)", ""]
    lines += [
        "| d_in | d_sae | batch | arch | peer | saejax ÷ peer |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for group in results["steps"]:
        best = {}
        for r in group.get("rows", []):
            if "tokens_per_s" in r:
                best[r["arch"]] = max(best.get(r["arch"], 0.0), r["tokens_per_s"])
        for p in group.get("peers", []):
            if "seconds_per_step" in p and best.get(p["arch"]):
                ratio = best[p["arch"]] * p["seconds_per_step"] / group["batch"]
                lines.append(
                    f"| {group['d_in']} | {group['d_sae']:,} | {group['batch']} | {p['arch']} | "
                    f"{p['impl']} | {ratio:.2f} |"
                )
    loop = results.get("loop")
    if loop is not None:
        lines += ["", "## The whole train() loop from a synthetic store on local disk", ""]
        if "error" in loop:
            lines.append(f"failed: {loop['error']}")
        else:
            lp = loop["loop"]
            lines.append(
                f"{lp['arch']} d_sae {lp['d_sae']:,}: loop {_tok(lp['tokens_per_s'])} tok/s, "
                f"step {_tok(lp['step_tokens_per_s'])} tok/s: **{lp['fraction_of_step']:.3f}** "
                f"of the step (median of {len(lp['rounds'])} rounds); loader alone "
                f"{_tok(loop['loader_tokens_per_s'])} tok/s."
            )
    ex = results.get("extract")
    if ex is not None:
        lines += ["", "## Extraction against the bare truncated forward", ""]
        if "error" in ex:
            lines.append(f"failed: {ex['error']}")
        else:
            lines.append(
                f"Llama architecture, d_model {ex['d_model']}, {ex['layers']} layers, random "
                f"weights, bfloat16, hook {ex['hook']}, {ex['tokens']:,} tokens on "
                f"{ex['device']}: bare forward {_tok(ex['bare_tokens_per_s'])} tok/s, "
                f"extraction {_tok(ex['extract_tokens_per_s'])} tok/s: ratio "
                f"**{ex['ratio']:.3f}** (median of 3 rounds)."
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the markdown table here (else stdout)")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, seconds")
    p.add_argument("--d-in", default=None, help="comma-separated subset (default: the grid)")
    p.add_argument("--d-sae", default=None)
    p.add_argument("--batch", default=None)
    p.add_argument("--arch", default=",".join(ARCHS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--skip", default="", help="sections to leave out: peers,loop,extract")
    p.add_argument("--peer-python", default=sys.executable, help="python with torch + peers")
    p.add_argument("--tmp", default="", help="local-disk folder for the store and the model")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        spec = json.loads(args.job)
        print(json.dumps(JOBS[spec.pop("job")](**spec)))
        return 0

    grid = dict(SMOKE if args.smoke else FULL)
    for key in ("d_in", "d_sae", "batch"):
        value = getattr(args, key)
        if value:
            grid[key] = [int(v) for v in value.split(",")]
    steps = args.steps or grid["steps"]
    archs = [a for a in args.arch.split(",") if a]
    skip = set(filter(None, args.skip.split(",")))
    variants = [
        (a, kernel) for a in archs for kernel in (TOPK_KERNELS if a == "topk" else ("sparse",))
    ]
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = {
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/gpu/run.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(),
        "device": "?",
        "steps": [],
    }
    for d_in in grid["d_in"]:
        for d_sae in grid["d_sae"]:
            for batch in grid["batch"]:
                shape = {"d_in": d_in, "d_sae": d_sae, "batch": batch, "k": grid["k"]}
                say(f"step   d_in {d_in} d_sae {d_sae} batch {batch} ...")
                group = {
                    **shape,
                    **run_job(
                        "steps", {**shape, "steps": steps, "variants": variants}, args.timeout
                    ),
                }
                results["device"] = group.get("device", results["device"])
                group["peers"] = []
                if "peers" not in skip:
                    for impl, peer_archs in PEERS.items():
                        for arch in peer_archs:
                            if arch not in archs:
                                continue
                            say(f"peer   {impl} {arch} ...")
                            out = run_job(
                                "peer",
                                {"impl": impl, "arch": arch, **shape, "steps": steps},
                                args.timeout,
                                args.peer_python,
                            )
                            group["peers"].append({"impl": impl, "arch": arch, **out})
                results["steps"].append(group)
    if "loop" not in skip:
        say("loop   train() from a synthetic store ...")
        results["loop"] = run_job(
            "loop", {**grid["loop"], "k": grid["k"], "steps": steps, "tmp": args.tmp}, args.timeout
        )
    if "extract" not in skip:
        say("extract  a random Llama ...")
        results["extract"] = run_job("extract", {**grid["extract"], "tmp": args.tmp}, args.timeout)
    sys.path.insert(0, ROOT)
    from saejax.io import write_json, write_text

    table = markdown(results)
    if args.out:
        write_text(args.out, table)
        say(f"wrote {args.out}")
    else:
        print(table)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
