"""The paper's pair at full size, random init, nothing downloaded: does the code run at the size users run it?

Qwen2-1.5B shapes (the frozen knowledge source, in bf16) + GPT-Neo-125M shapes (trunk) + a new head over
the paper tokenizer's 151,646 entries. Measures, through the project's own Trainer and decoder:
  - K training steps at SEQ tokens (batch 1, chunked loss), without and with gradient checkpointing:
    seconds per step and peak memory;
  - cached generation: prefill of a PROMPT-token prompt, then 32 new tokens: seconds per token, for the paper's
    token conditioning, for prompt conditioning (fast mode; with and without the knowledge lookup) and for fast
    mode whose source catches up on the answer every K tokens (`source_every`, K in --source-every) or adaptively
    (`source_adaptive`: each step without the source first, taken back and redone with it where the module is
    unsure; here the unsure steps are drawn at the rates in --adaptive-rate, since a random-init module's entropy
    says nothing), on the same source, beside the source alone through transformers' `generate`.

    python benchmarks/paper_size.py                 # CPU (2 cores: about 10 minutes)
    python benchmarks/paper_size.py --skip-train --generation-dtype bfloat16   # generation only, all in bf16
    python benchmarks/paper_size.py --device cuda   # one GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from types import SimpleNamespace

import torch
from transformers import AutoModel, AutoModelForCausalLM, GPTNeoConfig, Qwen2Config

sys.path.insert(0, os.path.dirname(__file__))
from common import quiet  # noqa: E402

from llm_modules.cli import PAPER_LARGE, PAPER_SMALL, PAPER_TOKENIZER_LEN  # noqa: E402
from llm_modules.config import ModuleConfig  # noqa: E402
from llm_modules.data import Example  # noqa: E402
from llm_modules.model import LLMModule  # noqa: E402
from llm_modules.knowledge_source import KnowledgeSource  # noqa: E402
from llm_modules.training.pipeline import RunInputs  # noqa: E402
from llm_modules.training.recipe import TrainConfig  # noqa: E402
from llm_modules.training.trainer import Trainer  # noqa: E402


class PeakMemory:
    """Peak resident memory (CPU: VmRSS sampled every 20 ms) or peak CUDA allocation, over a `with` block."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def build(device: str) -> tuple[LLMModule, torch.nn.Module]:
    """(the module, the large causal LM it wraps as its source)."""
    torch.manual_seed(0)
    large = AutoModelForCausalLM.from_config(Qwen2Config(**PAPER_LARGE), dtype=torch.bfloat16)
    return module_on(large, device), large.to(device)


def module_on(large: torch.nn.Module, device: str, **kw: object) -> LLMModule:
    """A random-init bridge, GPT-Neo-125M trunk and head on `large` (shared, not copied)."""
    trunk = AutoModel.from_config(GPTNeoConfig(**PAPER_SMALL))
    cfg = ModuleConfig(large_model="paper-qwen2-1.5b-shapes", vocab_size=PAPER_TOKENIZER_LEN, init_small="scratch",
                       source_dtype="bfloat16", **kw)
    source = KnowledgeSource(large, "paper-qwen2-1.5b-shapes", keep_head=cfg.knowledge_path != "none")
    return LLMModule(cfg, trunk, source).to(device)


@torch.no_grad()
def source_alone(large: torch.nn.Module, device: str, prompt: int, new: int) -> float:
    """Seconds per new token of the large model alone through transformers' cached `generate` (prefill excluded)."""
    ids = torch.randint(10, PAPER_TOKENIZER_LEN, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    large.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    large.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    return (time.perf_counter() - t - prefill) / (new - 1)


def train_steps(module: LLMModule, device: str, seq: int, steps: int, checkpointing: bool) -> tuple[list[float], float]:
    """Seconds of each optimiser step (the Trainer's own `step`), and peak memory over them."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(steps + 1):
        ids = torch.randint(10, PAPER_TOKENIZER_LEN, (seq,), generator=g).tolist()
        examples.append(Example(ids, [-100] * (seq // 2) + ids[seq // 2:]))  # loss on the second half, as answers
    cfg = TrainConfig(batch_size=1, loss_chunk_size=4096, gradient_checkpointing=checkpointing, output_dir="/tmp/paper-size",
                      progress=False, tensorboard=False, device=device, precision="auto", max_length=seq)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    trainer = Trainer(cfg, log=lambda s: None, inputs=RunInputs(module, tok, examples, [], None, seq))
    trainer.setup()
    trainer.model.train()
    trainer.step([([[steps]], 1.0)])  # warm-up step (allocations, autotuning): not timed
    times = []
    with PeakMemory(device) as mem:
        for i in range(steps):
            t = time.perf_counter()
            trainer.step([([[i]], 1.0)])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if checkpointing:
        trunk = module.generation.trunk
        off = getattr(trunk, "activation_checkpointing_disable", None) or trunk.gradient_checkpointing_disable
        off()
    del trainer
    return times, mem.gib


@torch.no_grad()
def generation(module: LLMModule, device: str, prompt: int, new: int) -> tuple[float, float, float]:
    """(prefill seconds, seconds per new token, peak memory) of cached greedy decoding."""
    module.eval()
    ids = torch.randint(10, PAPER_TOKENIZER_LEN, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx, PeakMemory(device) as mem:
        t = time.perf_counter()
        module.step(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = module.generate(ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
        total = time.perf_counter() - t
    assert out.shape[1] == prompt + new
    return prefill, (total - prefill) / new, mem.gib


def adaptive_generation(module: LLMModule, device: str, prompt: int, new: int, rate: float) -> tuple[float, float, float]:
    """`generation` for the adaptive schedule, the source catching up on a seeded random `rate` of the answer tokens
    (the module's `step` loop, greedy, as `decode` runs it): (prefill seconds, seconds per new token, peak memory)."""
    module.eval()
    ids = torch.randint(10, PAPER_TOKENIZER_LEN, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    draws = torch.Generator().manual_seed(0)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx, PeakMemory(device) as mem, torch.no_grad():
        t = time.perf_counter()
        logits, state = module.step(ids)
        prefill = time.perf_counter() - t
        state.wants_source = lambda lg: (torch.rand(lg.shape[0], generator=draws) < rate).to(lg.device)
        t = time.perf_counter()
        for _ in range(new - 1):  # as `decode`: the last new token is not fed
            logits, state = module.step(logits.argmax(-1)[:, None], state)
        total = time.perf_counter() - t
    caught = int(state.catch_ups.sum())
    assert state.length == prompt + new - 1 and 0 <= caught <= new
    return prefill, total / new, mem.gib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per configuration (after one warm-up)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--skip-train", action="store_true", help="generation only")
    ap.add_argument("--generation-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the trained parts while generating (the source is bf16 throughout)")
    ap.add_argument("--source-every", type=int, nargs="*", default=[2, 4, 8, 16],
                    help="catch-up intervals K to time (fast mode with the lookup, source_every K)")
    ap.add_argument("--adaptive-rate", type=float, nargs="*", default=[0.1, 0.2, 0.3],
                    help="adaptive schedule: fractions of answer tokens where the source catches up (fast mode with the "
                         "lookup, source_adaptive)")
    args = ap.parse_args()
    quiet()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    with PeakMemory(args.device) as mem:
        module, large = build(args.device)
    counts = {"source": sum(p.numel() for p in module.source.parameters()),
              "trained": sum(p.numel() for _, p in module.trainable_named_parameters())}
    print(f"built in {time.perf_counter() - t:.0f} s: source {counts['source']:,} (bf16), trained {counts['trained']:,} "
          f"(fp32); peak {mem.gib:.2f} GiB")
    for ckpt in () if args.skip_train else (False, True):
        times, gib = train_steps(module, args.device, args.seq, args.steps, ckpt)
        mean = sum(times) / len(times)
        print(f"train step, {args.seq} tokens, gradient checkpointing {'on ' if ckpt else 'off'}: "
              f"{mean:.2f} s/step (steps: {', '.join(f'{x:.2f}' for x in times)}); peak {gib:.2f} GiB")
    dtype = getattr(torch, args.generation_dtype)
    # The same source under every schedule: token conditioning (the paper's), prompt conditioning (fast mode) with and
    # without the lookup, and fast mode with the lookup whose source catches up on the answer every K tokens.
    modules = {"token conditioning": module,
               "prompt conditioning": module_on(large, args.device, conditioning="prompt"),
               "prompt conditioning + knowledge lookup": module_on(large, args.device, conditioning="prompt",
                                                                   knowledge_path="lookup")}
    for k in args.source_every:
        modules[f"+ lookup, source every {k} answer tokens"] = module_on(
            large, args.device, conditioning="prompt", knowledge_path="lookup", source_every=k)
    adaptive = module_on(large, args.device, conditioning="prompt", knowledge_path="lookup", source_adaptive=0.25)
    for m in (*modules.values(), adaptive):
        m.bridge.to(dtype), m.generation.to(dtype)
        if m.lookup is not None:
            m.lookup.to(dtype)
    # Three rounds, the sides alternating so drift on a shared machine hits them alike; each side's best round.
    def one_round() -> dict[str, tuple[float, float, float]]:
        got = {name: generation(m, args.device, args.prompt, args.new) for name, m in modules.items()}
        for rate in args.adaptive_rate:
            got[f"+ lookup, adaptive, the source catching up on {rate:.0%} of answer tokens"] = adaptive_generation(
                adaptive, args.device, args.prompt, args.new, rate)
        return got

    rounds = [(one_round(), source_alone(large, args.device, args.prompt, args.new)) for _ in range(3)]
    best = {name: min((r[0][name] for r in rounds), key=lambda x: x[1]) for name in rounds[0][0]}
    alone = min(r[1] for r in rounds)
    print(f"trained parts in {args.generation_dtype} while generating; best of 3 rounds; prompt {args.prompt} tokens, "
          f"{args.new} new tokens")
    print(f"the source alone (transformers generate, its 151,936-way head included): {alone:.3f} s per new token")
    for name, (prefill, per_token, gib) in best.items():
        print(f"generation, {name}: prefill {prefill:.2f} s; {per_token:.3f} s per new token, "
              f"{per_token / alone:.2f}x the source alone; peak {gib:.2f} GiB")


if __name__ == "__main__":
    main()
