"""Seconds per new token: (a) our cached decoding, (b) full recomputation every step (the reference's
way), (c) the large model alone through transformers' cached `generate`, (d) a module with prompt
conditioning (the source reads the prompt once; each new token runs the bridge layers, the trunk and the
head only), (e) the same with the knowledge lookup (also a pointer over the source's top-k predictions at
the prompt positions). Measured side by side in one run, on the same source weights. Seconds per new token
include the prompt's prefill; the last line also gives (c) and (d) with the prefill and first token apart.

    python benchmarks/generate_speed.py [--prompt 256] [--new 128] [--threads 2]
    python benchmarks/generate_speed.py --large-hidden 1024 --large-layers 6 --skip-reference   # paper-like ratio
"""

from __future__ import annotations

import argparse
import time

import torch

from common import VOCAB, mid_module, quiet
from llm_modules.decode import decode
from llm_modules.info import parameter_counts
from llm_modules.knowledge_source import KnowledgeSource


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
    ap.add_argument("--skip-reference", action="store_true", help="leave out (b), the slow full recomputation")
    ap.add_argument("--large-hidden", type=int, default=512, help="source hidden size (mid size: 512)")
    ap.add_argument("--large-layers", type=int, default=8, help="source layers (mid size: 8)")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    module, large = mid_module(large_hidden=args.large_hidden, large_layers=args.large_layers)
    fast, _ = mid_module(large_hidden=args.large_hidden, with_source=False, conditioning="prompt")
    fast.source = module.source  # one source, shared (as the server shares it)
    lookup, _ = mid_module(large_hidden=args.large_hidden, with_source=False, conditioning="prompt",
                           knowledge_path="lookup")
    lookup.source = KnowledgeSource(large, "mid-qwen2", keep_head=True)  # the same model, with its head
    dtype = getattr(torch, args.dtype)
    module.to(dtype), large.to(dtype), fast.to(dtype), lookup.to(dtype)  # the modules share the large model's weights
    ids = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    n_ref = args.reference_new or args.new

    def ours(n, m=module):
        return lambda: [None for _ in decode(m, ids, max_new_tokens=n, eos_token_id=[])]

    def reference(n):
        return lambda: [None for _ in decode(module, ids, max_new_tokens=n, eos_token_id=[], use_cache=False)]

    def large_alone(n=args.new):
        with torch.no_grad():
            large.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)

    ours(4)(), ours(4, fast)(), ours(4, lookup)(), large_alone()  # warm-up
    # Alternate the sides so drift on a shared machine hits them alike; keep each side's best.
    a, c, d, e, c1, d1 = [], [], [], [], [], []
    for _ in range(3):
        a.append(timed(ours(args.new)) / args.new)
        c.append(timed(large_alone) / args.new)
        d.append(timed(ours(args.new, fast)) / args.new)
        e.append(timed(ours(args.new, lookup)) / args.new)
        c1.append(timed(lambda: large_alone(1)))  # the prefill and first token alone
        d1.append(timed(ours(1, fast)))
    a, c, d, e, c1, d1 = min(a), min(c), min(d), min(e), min(c1), min(d1)
    # Prefill excluded: (all tokens - the first) / (new - 1), from the best runs above.
    c_step, d_step = (c * args.new - c1) / (args.new - 1), (d * args.new - d1) / (args.new - 1)
    counts = parameter_counts(fast)
    src = counts["source (frozen)"]
    print(f"source {args.large_hidden}x{args.large_layers} ({src / 1e6:.1f}M), small 256x4, vocab {VOCAB}; "
          f"prompt {args.prompt}, new tokens {args.new}, threads {args.threads}, dtype {args.dtype}")
    print(f"parameters run per new token: source {src / 1e6:.1f}M, token mode {counts['per-token (token)'] / 1e6:.1f}M, "
          f"prompt mode {counts['per-token (prompt)'] / 1e6:.1f}M ({counts['per-token (prompt)'] / src:.2f}x the source)")
    print(f"(a) cached decoding, token    {a:.4f} s/token")
    if not args.skip_reference:
        b = timed(reference(n_ref)) / n_ref
        print(f"(b) full recompute (ref.)     {b:.4f} s/token   ({n_ref} tokens)")
        print(f"    speed-up a vs b: {b / a:.1f}x")
    print(f"(c) large model alone (HF)    {c:.4f} s/token")
    print(f"(d) cached decoding, prompt   {d:.4f} s/token")
    print(f"(e) prompt + knowledge lookup {e:.4f} s/token")
    print(f"a / c: {a / c:.2f}    d / c: {d / c:.2f}    d / a: {d / a:.2f}    e / c: {e / c:.2f}")
    print(f"prefill + first token: (c) {c1:.3f} s, (d) {d1:.3f} s; per later token: (c) {c_step:.4f}, "
          f"(d) {d_step:.4f} s, d / c {d_step / c_step:.2f}")


if __name__ == "__main__":
    main()
