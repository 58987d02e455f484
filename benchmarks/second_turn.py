"""A fact asked in a conversation's second turn, against the same question asked alone.

Pairs of training facts of a module trained by the real-facts demo (single-turn data): the second question is
asked after the first question and its right answer, in the module's format, and alone. Prints how often each is
answered right and how often the second turn repeats the first turn's answer.

    llm-modules demo --world facts --out demo_out/facts          # trains the modules (seed 0)
    python benchmarks/second_turn.py --run demo_out/facts/seed0 [--pairs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from common import quiet
from llm_modules.data import encode_prompt
from llm_modules.decode import decode
from llm_modules.model import LLMModule


def answer(module: LLMModule, prompt) -> str:
    tok = module.tokenizer
    ids, mask = torch.tensor([prompt.input_ids]), torch.tensor([prompt.answer])
    out = [int(t[0]) for t, _, _ in decode(module, ids, answer_mask=mask, max_new_tokens=8)]
    return tok.decode([t for t in out if t != tok.eos_token_id]).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a seed folder of the facts demo (holds data/ and the modules)")
    ap.add_argument("--module", default="LLM_Module___knowledge_lookup__prompt_conditioning",
                    help="the module's folder in --run (default: the fast-mode system)")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quiet()
    run = Path(args.run)
    module = LLMModule.from_pretrained(run / args.module / "best").eval()
    fmt = module.config.prompt.format
    rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines() if line.strip()]
    facts = [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in rows]
    rng = random.Random(args.seed)
    n = alone = after = repeated = 0
    for _ in range(args.pairs):
        (q1, a1), (q2, a2) = rng.sample(facts, 2)
        if a1.strip() == a2.strip():
            continue
        n += 1
        single = answer(module, encode_prompt(module.tokenizer, fmt, q2, [], None))
        second = answer(module, encode_prompt(module.tokenizer, fmt, q2, [("user", q1), ("assistant", a1)], None))
        alone += single == a2.strip()
        after += second == a2.strip()
        repeated += second == a1.strip()
    print(f"{n} pairs of training facts ({args.module}): asked alone {alone}/{n} right; asked second {after}/{n} "
          f"right, {repeated}/{n} with the first turn's answer")


if __name__ == "__main__":
    main()
