"""Cost of the knowledge lookup in training, at long rows and the paper's vocabulary.

One training step (forward + backward of the target-only loss, from precomputed source states as the
feature cache gives them) of a prompt-conditioned module with and without `knowledge_path: lookup`,
each side in its own process: seconds and extra peak RSS over the models and inputs (sampled every
5 ms). The row is one prompt of a quarter of the tokens, then one answer; the loss runs in chunks of
`--chunk` targets. Source: a 512 x 2 Qwen2 with the vocabulary below (its head builds the lookup's
top-k tables); generation module: GPT-Neo 256 x 4.

    python benchmarks/lookup_cost.py [--tokens 4096] [--vocab 151646] [--chunk 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, GPTNeoConfig, Qwen2Config

from common import quiet, rss_mib
from llm_modules.config import ModuleConfig
from llm_modules.model import LLMModule
from llm_modules.knowledge_source import KnowledgeSource


def build(path: str, args: argparse.Namespace) -> LLMModule:
    torch.manual_seed(0)
    large = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=args.vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=args.tokens, tie_word_embeddings=True)).eval()
    trunk = AutoModel.from_config(GPTNeoConfig(vocab_size=args.vocab, hidden_size=256, num_layers=4, num_heads=8,
                                               attention_types=[[["global", "local"], 2]],
                                               max_position_embeddings=args.tokens))
    cfg = ModuleConfig(large_model="bench", vocab_size=args.vocab, init_small="scratch", source_dtype="float32",
                       conditioning="prompt", knowledge_path=path)
    return LLMModule(cfg, trunk, KnowledgeSource(large, "bench", keep_head=True), source_hidden_size=512)


def run(path: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    module = build(path, args)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    answer = torch.zeros_like(ids)
    answer[:, args.tokens // 4:] = 1
    labels = torch.where(answer > 0, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        states = module.source(ids, torch.ones_like(ids))[0]
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    base = rss_mib()
    watcher = threading.Thread(target=sample)
    watcher.start()
    t = time.perf_counter()
    out = module(ids, labels=labels, source_states=states, return_logits=False, loss_chunk_size=args.chunk,
                 answer_mask=answer)
    out.loss.backward()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return {"loss": float(out.loss), "targets": out.num_tokens, "seconds": seconds, "extra_peak_mib": peak[0] - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151646)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["none", "lookup"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        quiet()
        print(json.dumps(run(args.side, args)))
        return
    res = {s: json.loads(subprocess.run([sys.executable, __file__, "--side", s] + sys.argv[1:], check=True,
                                        capture_output=True, text=True).stdout.strip().splitlines()[-1])
           for s in ("none", "lookup")}
    print(f"one training step: {args.tokens} tokens ({res['none']['targets']} targets), vocab {args.vocab}, "
          f"loss chunks {args.chunk}, threads {args.threads}")
    for side, r in res.items():
        print(f"{'without lookup' if side == 'none' else 'with lookup':15s}: {r['seconds']:6.1f} s   extra peak "
              f"{r['extra_peak_mib']:7.0f} MiB   loss {r['loss']:.4f}")
    n, k = res["none"], res["lookup"]
    print(f"lookup / without: time {k['seconds'] / n['seconds']:.2f}x, extra peak {k['extra_peak_mib'] / n['extra_peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
