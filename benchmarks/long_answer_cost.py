"""Seconds per answer token at SmolLM2's size: the long-answer demo's trained modules writing their paragraphs.

Loads the modules one seed of `llm-modules demo --world facts --long-answers` trained (token conditioning with the
knowledge path, fast mode, fast mode catching up every 4 tokens, the adaptive module at each threshold) and times
each writing the test entities' paragraphs one at a time (greedy, cached, as the demo scores them), beside the source
alone (SmolLM2-135M-Instruct through transformers' `generate`) writing the same number of tokens after the same
questions. Rounds alternate the systems so drift on a shared machine hits them alike; each system's best round.

    python benchmarks/long_answer_cost.py demo_out/facts/seed0 --entities 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import quiet  # noqa: E402

from llm_modules.data import encode_prompt  # noqa: E402
from llm_modules.demo.facts_run import (MODULE_FAST, MODULE_KNOWLEDGE, FactsConfig,  # noqa: E402
                                        adaptive_name, adaptive_settings, every_name, _slug)
from llm_modules.demo.long_answers import write_paragraphs  # noqa: E402
from llm_modules.knowledge_source import load_causal_lm  # noqa: E402
from llm_modules.model import LLMModule  # noqa: E402


def systems(seed_dir: Path, cfg: FactsConfig) -> dict[str, tuple[Path, tuple[float, int] | None]]:
    """{system: (module folder, (entropy threshold, max gap) or None)} for the modules this seed's folder holds."""
    out = {name: (seed_dir / _slug(name) / "best", None) for name in (MODULE_KNOWLEDGE, MODULE_FAST)}
    out |= {every_name(k): (seed_dir / _slug(every_name(k)) / "best", None) for k in cfg.long_every}
    out |= {adaptive_name(t, g): (seed_dir / "adaptive" / "best", (t, g)) for t, g in adaptive_settings(cfg)}
    return {name: v for name, v in out.items() if v[0].is_dir()}


@torch.no_grad()
def source_alone(lm, tok, questions: list[str], tokens: int) -> float:
    """Seconds per new token of the source writing `tokens` tokens after each question (its prompt read included,
    as the modules' times include theirs)."""
    t, made = time.perf_counter(), 0
    for q in questions:
        ids = torch.tensor([encode_prompt(tok, "raw", q).input_ids])
        lm.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                    pad_token_id=tok.eos_token_id)
        made += tokens
    return (time.perf_counter() - t) / made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("seed_dir", help="a long-answer demo's seedN folder (its modules and data)")
    ap.add_argument("--entities", type=int, default=12, help="test paragraphs written per system and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    quiet()
    seed_dir, cfg = Path(args.seed_dir), FactsConfig()
    found = systems(seed_dir, cfg)
    modules = {str(p): LLMModule.from_pretrained(p).eval() for p, _ in found.values()}
    first = next(iter(modules.values()))
    # The source as a causal LM of its own (the modules hold its trunk and head apart), in the demo's dtype.
    tok, lm = first.tokenizer, load_causal_lm(first.config.large_model, first.config.source_dtype).eval()
    rows = [json.loads(ln) for ln in (seed_dir / "data" / "val.jsonl").read_text().splitlines()]
    questions = [r["conversations"][0]["value"] for r in rows][: args.entities]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(questions)} validation paragraphs per "
          f"system and round, best of {args.rounds} rounds; modules of {seed_dir}")
    best: dict[str, tuple[float, float]] = {}
    alone = float("inf")
    for _ in range(args.rounds):
        for name, (path, nats) in found.items():
            m = modules[str(path)]
            t = time.perf_counter()
            _, reads, written = write_paragraphs(m, questions, 72, *(nats or (None, None)))
            per = (time.perf_counter() - t) / max(written, 1)
            if name not in best or per < best[name][0]:
                best[name] = (per, reads)
        alone = min(alone, source_alone(lm, tok, questions, 48))
    print(f"the source alone (SmolLM2-135M-Instruct, transformers generate): {alone * 1000:.2f} ms per new token")
    for name, (per, reads) in best.items():
        print(f"{name}: {per * 1000:.2f} ms per answer token, {per / alone:.2f}x the source alone; "
              f"{reads:.3f} source forwards per answer token")


if __name__ == "__main__":
    main()
