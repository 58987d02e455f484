"""Multi-epoch training with the live knowledge-source forward vs from the frozen-feature cache.

Each side runs in its own process (so peak memory is its own): (1) live: the source runs every
epoch; (2) build the cache once; (3) train from the cache, with no source loaded. Same data, same
order, same seed; prints wall time, the ratio (build + cached training) / live, peak RSS and the
final losses of both sides.

    python benchmarks/train_speed.py [--epochs 15] [--examples 24] [--length 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from common import VOCAB, mid_module, quiet
from llm_modules.data import Example, collate
from llm_modules.features import FeatureCache, cache_key


def examples(n: int, length: int) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    return [Example(t, t, f"ex {i}") for i, t in enumerate(torch.randint(0, VOCAB, (n, length), generator=g).tolist())]


def run(side: str, args: argparse.Namespace) -> dict:
    quiet()
    torch.set_num_threads(args.threads)
    exs = examples(args.examples, args.length)
    key = {"bench": "mid", "n": args.examples, "length": args.length}
    t0 = time.perf_counter()
    if side == "build":
        module, _ = mid_module(with_source=True, large_hidden=args.large_hidden, large_layers=args.large_layers)
        FeatureCache.build(args.cache, exs, cache_key({"config_sha256": "mid", "weights_sha256": "seed1"}, exs, -1, "float16", key),
                           module.source, dtype="float16", log=lambda s: None)
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak()}
    module, _ = mid_module(with_source=(side == "live"), large_hidden=args.large_hidden, large_layers=args.large_layers)
    module.train()
    opt = torch.optim.AdamW([p for _, p in module.trainable_named_parameters()], lr=1e-4)
    cache = None
    if side == "cached":
        cache = FeatureCache.open(args.cache, cache_key({"config_sha256": "mid", "weights_sha256": "seed1"}, exs, -1, "float16", key))
        assert cache is not None, "build the cache first"
    torch.manual_seed(0)
    losses = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(epoch)).tolist()
        for i in range(0, len(order), args.batch_size):
            batch = [exs[j] for j in order[i : i + args.batch_size]]
            c = collate(batch, 0)
            src = cache.batch(batch) if cache is not None else None
            out = module(c["input_ids"], c["attention_mask"], labels=c["labels"], source_states=src, return_logits=False,
                         loss_chunk_size=args.loss_chunk or None)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in module.trainable_named_parameters()], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak(), "last_loss": losses[-1]}


def peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=0, help="chunked loss (tokens per chunk; 0 = full logits)")
    ap.add_argument("--large-hidden", type=int, default=512, help="source width (512: the issue's mid size)")
    ap.add_argument("--large-layers", type=int, default=8, help="source depth")
    ap.add_argument("--side", choices=["live", "build", "cached"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run(args.side, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for side in ("live", "build", "cached"):
            cmd = [sys.executable, __file__, "--side", side, "--cache", tmp] + sys.argv[1:]
            res[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    cached_total = res["build"]["seconds"] + res["cached"]["seconds"]
    print(f"source {args.large_hidden}x{args.large_layers}, vocab {VOCAB}; small 256x4; {args.examples} examples x {args.length} tokens, "
          f"{args.epochs} epochs, batch {args.batch_size}, threads {args.threads}")
    print(f"live source every epoch : {res['live']['seconds']:8.1f} s   peak RSS {res['live']['peak_rss_mib']:7.0f} MiB   last loss {res['live']['last_loss']:.4f}")
    print(f"cache build (once)      : {res['build']['seconds']:8.1f} s   peak RSS {res['build']['peak_rss_mib']:7.0f} MiB")
    print(f"train from cache        : {res['cached']['seconds']:8.1f} s   peak RSS {res['cached']['peak_rss_mib']:7.0f} MiB   last loss {res['cached']['last_loss']:.4f}")
    print(f"ratio (build + cached) / live: {cached_total / res['live']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
