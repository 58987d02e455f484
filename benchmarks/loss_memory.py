"""Peak memory of the LM-head loss at the paper's vocabulary: full logits vs chunked cross-entropy.

Each side runs in its own process: forward + backward of the loss over T tokens with a [V, S]
head (V = 151,646, the paper's tokenizer). Prints the loss, the extra peak RSS over the inputs
and weights, and the ratio.

    python benchmarks/loss_memory.py [--tokens 4096] [--hidden 768] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import rss_mib
from llm_modules.loss import chunked_cross_entropy


def run(side: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    base = rss_mib()
    if side == "naive":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / args.tokens
    else:
        loss = chunked_cross_entropy(hidden, weight, labels, args.chunk) / args.tokens
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": float(loss), "extra_peak_mib": peak - base, "grad_sum": float(weight.grad.double().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=151646)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run(args.side, args)))
        return
    res = {s: json.loads(subprocess.run([sys.executable, __file__, "--side", s] + sys.argv[1:], check=True,
                                        capture_output=True, text=True).stdout.strip().splitlines()[-1])
           for s in ("naive", "chunked")}
    n, c = res["naive"], res["chunked"]
    print(f"vocab {args.vocab}, tokens {args.tokens}, hidden {args.hidden}, chunk {args.chunk}")
    print(f"naive full logits : loss {n['loss']:.6f}   extra peak {n['extra_peak_mib']:8.0f} MiB")
    print(f"chunked           : loss {c['loss']:.6f}   extra peak {c['extra_peak_mib']:8.0f} MiB")
    print(f"peak ratio chunked / naive: {c['extra_peak_mib'] / n['extra_peak_mib']:.3f}   |loss diff| {abs(n['loss'] - c['loss']):.2e}"
          f"   grad |sum| rel diff {abs(n['grad_sum'] - c['grad_sum']) / n['grad_sum']:.2e}")


if __name__ == "__main__":
    main()
