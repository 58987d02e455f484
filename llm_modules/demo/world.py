"""A synthetic knowledge world generated from a seed, for the built-in demo.

Fictional entities with attributes (home city, favourite colour, profession) and small arithmetic
facts. The *source corpus* states every fact in varied sentences (what the large model learns);
the *general text* states facts of other, background entities only (what the small model learns:
the language, not the facts); the *task set* asks questions in the paper's reasoning format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CITIES = ["Quenby", "Marrowick", "Tolvane", "Ashgrove", "Brindle", "Corvath", "Dunmere", "Elsworth",
          "Fennick", "Galloway", "Harrowgate", "Istrel"]
COLOURS = ["red", "blue", "green", "yellow", "violet", "orange", "silver", "black"]
PROFESSIONS = ["baker", "pilot", "painter", "doctor", "farmer", "teacher", "sailor", "weaver"]
ATTRIBUTES = {"city": CITIES, "colour": COLOURS, "profession": PROFESSIONS}

# Statement templates per attribute; the first one is the stem the reasoning step quotes.
STATEMENTS = {
    "city": ["The home city of {e} is {v}.", "{e} lives in {v}.", "Ask anyone in {v}: {e} lives there."],
    "colour": ["The favourite colour of {e} is {v}.", "{e} likes the colour {v} most.", "Everything {e} owns is {v}."],
    "profession": ["The profession of {e} is {v}.", "{e} works as a {v}.", "By trade, {e} is a {v}."],
    "sum": ["The sum of {a} and {b} is {v}.", "{a} plus {b} equals {v}."],
    "remainder": ["The remainder of {a} divided by {b} is {v}.", "Dividing {a} by {b} leaves {v}."],
}
QUESTIONS = {
    "city": "What is the home city of {e}?",
    "colour": "What is the favourite colour of {e}?",
    "profession": "What is the profession of {e}?",
    "sum": "What is the sum of {a} and {b}?",
    "remainder": "Find the remainder by dividing {a} by {b}.",
}
SYSTEM = "Answer the question."
_SYLLABLES = ["ka", "zor", "vel", "mi", "tra", "quo", "ren", "sil", "dah", "bex", "lun", "far", "gis", "nor",
              "pel", "ruk", "tam", "vos", "yel", "wen"]


@dataclass
class Fact:
    kind: str  # city | colour | profession | sum | remainder
    subject: dict  # {"e": name} or {"a": 5, "b": 3}
    value: str

    def statement(self, i: int = 0) -> str:
        return STATEMENTS[self.kind][i].format(**self.subject, v=self.value)

    def stem(self) -> str:
        """The first statement up to the value: what the large model completes."""
        return STATEMENTS[self.kind][0].split("{v}")[0].format(**self.subject).rstrip()

    def question(self) -> str:
        """The question, then a recall cue in corpus form (what the knowledge source can complete)."""
        return f"{QUESTIONS[self.kind].format(**self.subject)} Recall: {self.stem()} ..."

    def answer(self) -> str:
        return (f"<|begin_of_thought|> I recall the fact. <|end_of_thought|> "
                f"<|begin_of_solution|> {self.value} <|end_of_solution|>")

    def row(self) -> dict:
        return {"system": SYSTEM, "conversations": [{"from": "user", "value": self.question()},
                                                    {"from": "assistant", "value": self.answer()}]}


@dataclass
class World:
    seed: int
    entities: list[str]
    background: list[str]
    facts: list[Fact]  # about `entities` and arithmetic: what the large model knows
    background_facts: list[Fact]
    train_facts: list[Fact] = field(default_factory=list)
    heldout_facts: list[Fact] = field(default_factory=list)

    def source_corpus(self) -> list[str]:
        """Every fact in every phrasing (plus background facts: the large model knows those too)."""
        return [f.statement(i) for f in self.facts + self.background_facts for i in range(len(STATEMENTS[f.kind]))]

    def is_entity(self, f: Fact) -> bool:
        return "e" in f.subject

    def general_text(self) -> list[str]:
        """Background entities only, in every phrasing: the world's language without the target facts."""
        return [f.statement(i) for f in self.background_facts for i in range(len(STATEMENTS[f.kind]))]


def _names(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize())
    return sorted(seen)


def make_world(seed: int = 0, n_entities: int = 60, n_background: int = 30, max_operand: int = 9,
               heldout_fraction: float = 0.5) -> World:
    """Entities, facts and a train / held-out split of the task set (by entity, and by arithmetic pair)."""
    rng = random.Random(seed)
    names = _names(rng, n_entities + n_background)
    rng.shuffle(names)
    entities, background = sorted(names[:n_entities]), sorted(names[n_entities:])

    def entity_facts(es: list[str]) -> list[Fact]:
        return [Fact(k, {"e": e}, rng.choice(vals)) for e in es for k, vals in ATTRIBUTES.items()]

    facts = entity_facts(entities)
    background_facts = entity_facts(background)
    arith = [Fact("sum", {"a": a, "b": b}, str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    arith += [Fact("remainder", {"a": a, "b": b}, str(a % b)) for a in range(max_operand + 1) for b in range(1, max_operand + 1)]
    world = World(seed, entities, background, facts + arith, background_facts)
    held_entities = set(rng.sample(entities, round(len(entities) * heldout_fraction)))
    held_arith = set(rng.sample(range(len(arith)), round(len(arith) * heldout_fraction)))
    # The paper's two test prompts are always held out.
    fixed = {("sum", 5, 5), ("remainder", 7, 4)}
    for i, f in enumerate(arith):
        if (f.kind, f.subject["a"], f.subject["b"]) in fixed:
            held_arith.add(i)
    for f in facts:
        (world.heldout_facts if f.subject["e"] in held_entities else world.train_facts).append(f)
    for i, f in enumerate(arith):
        (world.heldout_facts if i in held_arith else world.train_facts).append(f)
    return world


def grouped(sentences: list[str], per_row: int = 4, copies: int = 3, seed: int = 0) -> list[str]:
    """Rows of `per_row` sentences in random order, `copies` shuffles: each fact is seen in several
    contexts, so the model recalls it after any preceding text, not only at the start of a row."""
    rng = random.Random(seed)
    rows = []
    for _ in range(copies):
        order = sentences[:]
        rng.shuffle(order)
        rows += [" ".join(order[i : i + per_row]) for i in range(0, len(order), per_row)]
    return rows
