"""A multi-turn conversation with and without the session (the caches of earlier turns kept).

Mid size (source 512 x 8, small 256 x 4, vocab 32k, random weights), fast mode (prompt conditioning) and the
paper's token conditioning. Each turn: a question of `--question` tokens, a greedy answer of `--answer` tokens;
the next turn's prompt is the whole conversation so far. Without the session every turn reads the whole
conversation again; with it, only what is new. Prints seconds per turn for both, side by side in one run, and
checks that both give the same answers.

    python benchmarks/chat_turns.py [--turns 6] [--question 128] [--answer 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import VOCAB, mid_module, quiet
from llm_modules.decode import Session, decode


def converse(module, questions: list[torch.Tensor], n: int, session: Session | None) -> tuple[list[float], list]:
    """Seconds per turn and the answers."""
    ids = torch.zeros(1, 0, dtype=torch.long)
    answer = torch.zeros(1, 0, dtype=torch.long)
    seconds, answers = [], []
    for q in questions:
        ids = torch.cat([ids, q], 1)
        answer = torch.cat([answer, torch.zeros_like(q)], 1)
        t = time.perf_counter()
        got = torch.stack([tok for tok, _, _ in decode(module, ids, answer_mask=answer, max_new_tokens=n,
                                                       eos_token_id=[], session=session)], 1)
        seconds.append(time.perf_counter() - t)
        answers.append(got)
        ids = torch.cat([ids, got], 1)
        answer = torch.cat([answer, torch.ones_like(got)], 1)
    return seconds, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--question", type=int, default=128)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    token, _ = mid_module()
    fast, _ = mid_module(with_source=False, conditioning="prompt", answer_source_tokens=1)
    fast.source = token.source
    g = torch.Generator().manual_seed(0)
    questions = [torch.randint(0, VOCAB, (1, args.question), generator=g) for _ in range(args.turns)]
    print(f"{args.turns} turns, questions of {args.question} tokens, answers of {args.answer}, threads {args.threads}; "
          f"seconds per turn (the last turn reads {args.turns * args.question + (args.turns - 1) * args.answer} tokens)")
    for name, module in (("token conditioning", token), ("fast mode, prompt conditioning", fast)):
        converse(module, questions[:1], 2, None)  # warm-up
        fresh, a = converse(module, questions, args.answer, None)
        kept, b = converse(module, questions, args.answer, Session())
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        print(f"{name}: same answers {same}")
        print("  turn           " + "".join(f"{i + 1:>8d}" for i in range(args.turns)) + "     total")
        print("  read afresh    " + "".join(f"{s:8.2f}" for s in fresh) + f"  {sum(fresh):8.2f}")
        print("  session        " + "".join(f"{s:8.2f}" for s in kept) + f"  {sum(kept):8.2f}")
        print(f"  last turn {kept[-1] / fresh[-1]:.2f}x, whole conversation {sum(kept) / sum(fresh):.2f}x")


if __name__ == "__main__":
    main()
