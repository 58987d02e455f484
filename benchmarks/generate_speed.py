"""Seconds per new token: (a) our cached decoding, (b) full recomputation every step (the reference's
way), (c) the large model alone through transformers' cached `generate`. Measured side by side.

    python benchmarks/generate_speed.py [--prompt 256] [--new 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import VOCAB, mid_module, quiet
from llm_modules.decode import decode


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of every model")
    ap.add_argument("--reference-new", type=int, default=None, help="new tokens for (b) (default: --new)")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    module, large = mid_module()
    dtype = getattr(torch, args.dtype)
    module.to(dtype), large.to(dtype)  # the module shares the large model's weights
    ids = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    n_ref = args.reference_new or args.new

    def ours(n):
        return lambda: [None for _ in decode(module, ids, max_new_tokens=n, eos_token_id=[])]

    def reference(n):
        return lambda: [None for _ in decode(module, ids, max_new_tokens=n, eos_token_id=[], use_cache=False)]

    def large_alone():
        with torch.no_grad():
            large.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    ours(4)(), large_alone()  # warm-up
    a = min(timed(ours(args.new)) for _ in range(2)) / args.new
    c = min(timed(large_alone) for _ in range(2)) / args.new
    b = timed(reference(n_ref)) / n_ref
    print(f"prompt {args.prompt}, new tokens {args.new}, threads {args.threads}, dtype {args.dtype}")
    print(f"(a) cached decoding           {a:.4f} s/token")
    print(f"(b) full recompute (ref.)     {b:.4f} s/token   ({n_ref} tokens)")
    print(f"(c) large model alone (HF)    {c:.4f} s/token")
    print(f"speed-up a vs b: {b / a:.1f}x    a / c: {a / c:.2f}")


if __name__ == "__main__":
    main()
