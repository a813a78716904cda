"""One implementation's training step, timed on request (run by compare_peers/run.py).

Protocol: one JSON object per line on stdin, one per line on stdout.
    {"cmd": "setup", "impl": ..., "arch": "relu"|"topk"|"batchtopk"|"jumprelu", "d_in",
     "d_sae", "batch", "k", optional "device": "cpu"|"cuda", "dtype": "float32"|"bfloat16",
     "topk_kernel" (saejax only)}
    {"cmd": "time", "steps": n}      -> {"seconds": s}
Every implementation runs forward, loss, backward and an Adam update per step on the same
random activations (numpy seed 0), on the CPU unless told otherwise. In bfloat16 the
PyTorch peers keep float32 weights and run forward and loss under
torch.autocast(device, bfloat16), their usual mixed precision; saejax runs its bf16 compute
(bf16 matmuls with float32 accumulation, float32 master weights).
(sparsify trains TopK only; the worker asks SAELens for relu, topk, batchtopk, jumprelu.)
"""

import json
import os
import sys
import time

import numpy as np


def batch_rows(batch, d_in):
    return np.random.default_rng(0).normal(size=(batch, d_in)).astype(np.float32)


class SaejaxStep:
    def __init__(self, arch, d_in, d_sae, batch, k, device, dtype, topk_kernel="sparse"):
        from saejax.train.bench import StepShape, StepTimer

        self.timer = StepTimer(StepShape(arch, d_in, d_sae, batch, k, dtype, topk_kernel))
        import jax.numpy as jnp

        self.timer.batch = jnp.asarray(batch_rows(batch, d_in))

    def run(self, steps):
        return self.timer.run(steps)


class TorchStep:
    """Shared loop for the PyTorch peers: loss(x) (under autocast in bfloat16) -> backward ->
    Adam step."""

    device = "cpu"
    dtype = "float32"

    def sync(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(self, steps):
        import torch

        bf16 = self.dtype == "bfloat16"
        self.sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                loss = self.loss()
            loss.backward()
            self.opt.step()
        self.sync()
        return time.perf_counter() - t


class SAELensStep(TorchStep):
    def __init__(self, arch, d_in, d_sae, batch, k, device, dtype):
        import torch
        from sae_lens.saes.sae import TrainStepInput

        self.device, self.dtype = device, dtype
        if arch == "relu":
            from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

            self.sae = StandardTrainingSAE(
                StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0)
            )
            coefficients = {"l1": 5.0}
        elif arch == "jumprelu":
            from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

            self.sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae))
            coefficients = {"l0": 1e-3}
        elif arch == "batchtopk":
            from sae_lens.saes.batchtopk_sae import (
                BatchTopKTrainingSAE,
                BatchTopKTrainingSAEConfig,
            )

            self.sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
            coefficients = {}
        else:
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

            self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
            coefficients = {}
        self.sae.to(device)
        x = torch.from_numpy(batch_rows(batch, d_in)).to(device)
        dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4)
        self.step_input = TrainStepInput(
            sae_in=x,
            coefficients=coefficients,
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )

    def loss(self):
        return self.sae.training_forward_pass(self.step_input).loss


class SparsifyStep(TorchStep):
    def __init__(self, arch, d_in, d_sae, batch, k, device, dtype):
        import torch
        from sparsify import SparseCoder, SparseCoderConfig

        assert arch == "topk", "sparsify trains TopK SAEs only"
        self.device, self.dtype = device, dtype
        self.sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
        self.x = torch.from_numpy(batch_rows(batch, d_in)).to(device)
        self.dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4)

    def loss(self):
        out = self.sae(self.x, dead_mask=self.dead)
        return out.fvu + out.auxk_loss / 32


IMPLS = {"saejax": SaejaxStep, "saelens": SAELensStep, "sparsify": SparsifyStep}


def main():
    # replies go to the original stdout; anything the libraries print goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    impl = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            extra = {"topk_kernel": msg["topk_kernel"]} if "topk_kernel" in msg else {}
            impl = IMPLS[msg["impl"]](
                msg["arch"],
                msg["d_in"],
                msg["d_sae"],
                msg["batch"],
                msg["k"],
                msg.get("device", "cpu"),
                msg.get("dtype", "float32"),
                **extra,
            )
            impl.run(2)  # warm-up (and compilation for saejax)
            reply = {"ok": True}
        elif msg["cmd"] == "time":
            reply = {"seconds": impl.run(msg["steps"])}
        else:
            reply = {"error": f"unknown command {msg['cmd']}"}
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    main()
