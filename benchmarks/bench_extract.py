"""Extraction throughput as a ratio to the bare truncated forward pass.

Both sides run the same model on the same packed batches; the bare side only runs
the truncated forward (hooks capture, nothing is converted or written), the other
side is `run_extract` writing a real store. Rounds are interleaved so machine noise
hits both alike. Goal: ratio >= 0.9 (the writes hide behind compute).

    python benchmarks/bench_extract.py [--model builtin] [--tokens 20000] [--rounds 3]
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from extract.corpus import open_corpus
from extract.extractor import ExtractConfig, run_extract
from extract.hooks import Capture, parse_hooks
from extract.models import load_model
from extract.packing import pack_contexts, token_stream


def bare_forward(loaded, hooks, n_rows, context, batch_size):
    tok = loaded.tokenizer
    contexts = pack_contexts(
        token_stream(open_corpus("builtin").documents(), tok),
        context,
        True,
        tok.bos_token_id,
        tok.pad_token_id or 0,
    )
    rows_per_ctx = context - 1
    n_ctx = -(-n_rows // rows_per_ctx)
    batches, batch = [], []
    for ctx in contexts:
        batch.append(ctx.ids)
        if len(batch) == batch_size:
            batches.append(torch.as_tensor(np.stack(batch)))
            batch = []
        if len(batches) * batch_size >= n_ctx:
            break
    with Capture(loaded.model, parse_hooks(hooks)) as cap, torch.inference_mode():
        start = time.perf_counter()
        for ids in batches:
            cap.run(ids)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--hooks", default="blocks.15.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model)
    bare_s, extract_s = [], []
    for _ in range(args.rounds):
        bare_s.append(bare_forward(loaded, args.hooks, args.tokens, args.context, args.batch_size))
        out = tempfile.mkdtemp()
        cfg = ExtractConfig(
            out=out + "/s",
            model=args.model,
            hooks=args.hooks.split(","),
            tokens=args.tokens,
            context=args.context,
            batch_size=args.batch_size,
        )
        start = time.perf_counter()
        run_extract(cfg, progress=False, loaded=loaded)
        extract_s.append(time.perf_counter() - start)
        shutil.rmtree(out)
    ratio = statistics.median(b / e for b, e in zip(bare_s, extract_s))
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                "bare_forward_tok_s": args.tokens / min(bare_s),
                "extract_tok_s": args.tokens / min(extract_s),
                "ratio_extract_to_bare": round(ratio, 3),
                "rounds": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
