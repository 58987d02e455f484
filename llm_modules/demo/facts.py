"""Real facts: does the module answer held-out facts the source knows, whose answers it never saw?

1. Facts (entity, relation, question, cue, answer): the ones this project ships (`data/facts.jsonl`:
   countries' capitals, continents, currencies and languages; elements' symbols and atomic numbers)
   or a user's JSONL file.
2. Probe the source: greedy completion of each cue; keep the facts it states (report how many).
3. Split by entity into train / validation / test entities (checkpoints are chosen on validation
   entities, never on test ones). A test fact whose answer is no training target is "unseen".
4. Train and compare, each on the same split: the LLM Module in the paper's design, the LLM Module
   with the knowledge path (+ distillation at every position), fast mode (prompt conditioning with the
   knowledge lookup), the small model alone, the small model
   distilled from the source (on the training prompts, and with the test entities' prompts as
   unlabeled transfer queries), and the source alone.
Task rows are plain text: "{question} Recall: {cue}" then " {answer}" and EOS.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data import DataError
from ..io import atomic_write_text, read_json

PACKAGED = Path(__file__).parent / "data" / "facts.jsonl"
# Ten more kinds of fact (cities, capitals read backwards, landmarks, books, paintings, inventions, companies,
# opposites, young animals, chemical formulas), written for the relation split: relations held out of training.
PACKAGED_KINDS = Path(__file__).parent / "data" / "facts_kinds.jsonl"
FIELDS = ("entity", "relation", "cue", "answer")


@dataclass(frozen=True)
class RealFact:
    entity: str
    relation: str
    cue: str
    answer: str
    question: str = ""

    def prompt(self) -> str:
        """What the module reads: the question, then the cue the source completes."""
        return f"{self.question} Recall: {self.cue}" if self.question else self.cue

    def row(self) -> dict[str, Any]:
        return {"conversations": [{"from": "user", "value": self.prompt()},
                                  {"from": "assistant", "value": f" {self.answer}"}]}


def load_facts(path: str | Path | None = None) -> list[RealFact]:
    """Facts from a JSONL file (entity, relation, cue, answer; optional question); errors name the line."""
    path = Path(path) if path else PACKAGED
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such facts file")
    facts, seen = [], set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i}: not valid JSON ({e.msg})") from None
        missing = [k for k in FIELDS if not isinstance(row.get(k) if isinstance(row, dict) else None, str) or not row[k].strip()]
        if missing:
            raise DataError(f"{path} line {i}: needs non-empty string field(s) {', '.join(missing)}")
        fact = RealFact(row["entity"], row["relation"], row["cue"].rstrip(), row["answer"].strip(), row.get("question") or "")
        if (fact.entity, fact.relation) in seen:
            raise DataError(f"{path} line {i}: a second {fact.relation!r} fact for {fact.entity!r}")
        seen.add((fact.entity, fact.relation))
        facts.append(fact)
    if not facts:
        raise DataError(f"{path}: no facts")
    return facts


def load_fact_files(paths: Sequence[str | Path]) -> list[RealFact]:
    """Facts from several JSONL files, in order; a fact given twice (same entity and relation) is an error."""
    facts: list[RealFact] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in paths:
        for f in load_facts(path):
            if (f.entity, f.relation) in seen:
                raise DataError(f"{path}: the {f.relation!r} fact for {f.entity!r} is also in {seen[f.entity, f.relation]}")
            seen[f.entity, f.relation] = Path(path)
            facts.append(f)
    return facts


def normalise(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").split()).strip().rstrip(".").lower()


def answer_of(completion: str) -> str:
    """The answer in a greedy completion: up to the end of the line or sentence."""
    first = completion.split("\n")[0]
    for stop in (". ", ", ", ";", " (", " and "):
        first = first.split(stop)[0]
    return normalise(first)


def states_answer(completion: str, answer: str) -> bool:
    """A completion states the answer: it starts with it, as a whole word."""
    got, want = normalise(completion.split("\n")[0]), normalise(answer)
    return got.startswith(want) and (len(got) == len(want) or not got[len(want)].isalnum())


# -- splitting --------------------------------------------------------------------------------------
@dataclass
class FactSplit:
    train: list[RealFact]
    val: list[RealFact]
    test: list[RealFact]
    unseen: set[RealFact] = field(default_factory=set)  # test facts whose answer is no training target


def split_by_entity(facts: Sequence[RealFact], seed: int, fractions: tuple[float, float] = (0.5, 0.15)) -> FactSplit:
    """Entities (not rows) go to train / validation / test, so no test entity is ever trained on."""
    entities = sorted({f.entity for f in facts})
    random.Random(seed).shuffle(entities)
    n_train, n_val = round(len(entities) * fractions[0]), round(len(entities) * fractions[1])
    part = {e: 0 if i < n_train else 1 if i < n_train + n_val else 2 for i, e in enumerate(entities)}
    groups: list[list[RealFact]] = [[], [], []]
    for f in facts:
        groups[part[f.entity]].append(f)
    targets = {normalise(f.answer) for f in groups[0]}
    return FactSplit(*groups, unseen={f for f in groups[2] if normalise(f.answer) not in targets})


def relation_folds(facts: Sequence[RealFact], folds: int) -> list[list[str]]:
    """Relations dealt into `folds` groups of about equal test size (largest relation first, each to the group with
    the fewest facts so far), so that every relation is held out exactly once."""
    sizes: dict[str, int] = {}
    for f in facts:
        sizes[f.relation] = sizes.get(f.relation, 0) + 1
    if folds < 2 or folds > len(sizes):
        raise ValueError(f"relation split: {folds} folds need between 2 and {len(sizes)} (the relations with facts the "
                         "source states)")
    groups: list[list[str]] = [[] for _ in range(folds)]
    totals = [0] * folds
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        i = totals.index(min(totals))
        groups[i].append(rel)
        totals[i] += sizes[rel]
    return [sorted(g) for g in groups]


RELATION_VAL_FRACTION = 0.2  # relation split: the share of the trained relations' entities kept for validation


def split_by_relation(facts: Sequence[RealFact], held_out: Sequence[str], seed: int,
                      val_fraction: float = RELATION_VAL_FRACTION) -> FactSplit:
    """Test: every fact of the held-out relations. Train / validation: the other relations' facts, split by entity
    (checkpoints are chosen on validation entities of trained relations: all a user training on their own task has)."""
    held = set(held_out)
    trained = [f for f in facts if f.relation not in held]
    test = [f for f in facts if f.relation in held]
    entities = sorted({f.entity for f in trained})
    random.Random(seed).shuffle(entities)
    val_entities = set(entities[:max(1, round(len(entities) * val_fraction))])
    train = [f for f in trained if f.entity not in val_entities]
    val = [f for f in trained if f.entity in val_entities]
    targets = {normalise(f.answer) for f in train}
    return FactSplit(train, val, test, unseen={f for f in test if normalise(f.answer) not in targets})


# -- scoring ----------------------------------------------------------------------------------------
def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(facts: Sequence[RealFact], completions: Sequence[str], unseen: set[RealFact]) -> dict[str, Any]:
    """Exact match of the stated answer: overall, on unseen answers, on seen ones, and per relation."""
    hits = [states_answer(c, f.answer) for f, c in zip(facts, completions)]

    def part(keep: Callable[[RealFact], bool]) -> dict[str, Any]:
        xs = [h for h, f in zip(hits, facts) if keep(f)]
        return {"hits": sum(xs), "n": len(xs), "em": sum(xs) / len(xs) if xs else None}

    return {"all": part(lambda f: True), "unseen": part(lambda f: f in unseen), "seen": part(lambda f: f not in unseen),
            "relations": {r: part(lambda f, r=r: f.relation == r) for r in sorted({f.relation for f in facts})}}


LOSS_KINDS = ("stopped early", "a training answer", "other")


def lost_facts(facts: Sequence[RealFact], completions: Sequence[str], source: Sequence[str],
               targets: set[str]) -> dict[str, int]:
    """Where a system loses what the source alone states on the same prompt, by kind: `stopped early` (its answer is
    a proper start of the right one: "Reyk" for Reykjavik, "2" for 20), `a training answer` (it answered with one of
    its training targets: "Spain" for the capital of Spain), `other`. `targets`: normalised training answers."""
    counts = dict.fromkeys(("source states", *LOSS_KINDS), 0)
    for f, got, src in zip(facts, completions, source):
        if not states_answer(src, f.answer):
            continue
        counts["source states"] += 1
        if states_answer(got, f.answer):
            continue
        mine, want = answer_of(got), normalise(f.answer)
        kind = ("stopped early" if mine and want.startswith(mine) and mine != want
                else "a training answer" if mine in targets else "other")
        counts[kind] += 1
    return counts


@torch.no_grad()
def complete(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 8,
             batch_size: int = 32) -> list[str]:
    """Greedy completions (text after the prompt, special tokens dropped) of an LLM Module or a causal LM."""
    from ..inference.evaluate import answer_prompts

    model.tokenizer = getattr(model, "tokenizer", None) or tokenizer
    outs = answer_prompts(model, list(prompts), max_new_tokens, batch_size=batch_size, stop_strings=("\n",))
    return [o.replace(tokenizer.eos_token or "\0", "") for o in outs]


# -- probing the source ----------------------------------------------------------------------------
def probe_source(source: Any, tokenizer: Any, facts: Sequence[RealFact], cache: Path, fingerprint: str,
                 log: Callable[[str], None] = print) -> list[bool]:
    """Which facts the source states when given the bare cue; cached per (source, facts)."""
    key = hashlib.sha256(json.dumps([fingerprint, [f.cue for f in facts], [f.answer for f in facts]]).encode()).hexdigest()
    if cache.is_file():
        got = read_json(cache)
        if isinstance(got, dict) and got.get("key") == key:
            return got["known"]
    log(f"probing the source on {len(facts)} facts (greedy completion of each cue)")
    outs = complete(source, tokenizer, [f.cue for f in facts])
    known = [states_answer(o, f.answer) for o, f in zip(outs, facts)]
    atomic_write_text(cache, json.dumps({"key": key, "known": known, "completions": outs}))
    return known
