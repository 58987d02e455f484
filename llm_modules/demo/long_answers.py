"""Long answers with facts in the middle: the real-facts benchmark's `--long-answers` mode.

The question names an entity ("Tell me about Cyprus."); the answer is a paragraph in a fixed template stating four
of its facts, each in its own sentence, the first one 8+ tokens into the answer:

    " Here is what I know about Cyprus. It is a country in Europe. Its capital city is Nicosia. The currency used
    there is the euro. The main language spoken is Greek."

A module learns the template from the training entities; on test entities every slot's value must come from the
source, read while the answer is being written. A slot is scored where the answer states it: the text after its
sentence's opening (e.g. "Its capital city is") must start with the value, as a whole word (`states_answer`).
Only slots whose fact the source states on its bare cue count (as in the one-fact benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .facts import RealFact

# relation -> the opening of the sentence that states it; the value follows, then a full stop.
SENTENCES = {"continent": "It is a country in", "capital": "Its capital city is",
             "currency": "The currency used there is the", "language": "The main language spoken is"}
OPENING = "Here is what I know about {}."


@dataclass(frozen=True)
class LongAnswer:
    """One entity's paragraph: its facts in the template's order."""

    entity: str
    facts: tuple[RealFact, ...]

    def question(self) -> str:
        return f"Tell me about {self.entity}."

    def sentences(self) -> list[str]:
        return [OPENING.format(self.entity)] + [f"{SENTENCES[f.relation]} {f.answer}." for f in self.facts]

    def answer(self) -> str:
        return " " + " ".join(self.sentences())

    def prefix(self, fact: RealFact) -> str:
        """The answer up to the value of `fact` (what the source is given to show what it knows there)."""
        i = self.facts.index(fact)
        return " " + " ".join([*self.sentences()[:i + 1], SENTENCES[fact.relation]])

    def row(self) -> dict[str, Any]:
        return {"conversations": [{"from": "user", "value": self.question()},
                                  {"from": "assistant", "value": self.answer()}]}


def long_answers(facts: Sequence[RealFact]) -> list[LongAnswer]:
    """A paragraph for each entity that has a fact of every relation in SENTENCES, in entity order."""
    by_entity: dict[str, dict[str, RealFact]] = {}
    for f in facts:
        if f.relation in SENTENCES:
            by_entity.setdefault(f.entity, {})[f.relation] = f
    return [LongAnswer(e, tuple(rels[r] for r in SENTENCES)) for e, rels in by_entity.items() if len(rels) == len(SENTENCES)]


def slot_text(completion: str, fact: RealFact) -> str:
    """What a generated paragraph says where `fact`'s value belongs: the text after its sentence's opening, up to
    the next full stop ("" when the sentence is missing)."""
    opening = SENTENCES[fact.relation]
    at = completion.find(opening)
    if at < 0:
        return ""
    return completion[at + len(opening):].split(".")[0]


def answers_part(answers: Sequence[LongAnswer], hits: dict[RealFact, bool]) -> dict[str, Any]:
    """Per answer: every counted slot of the paragraph right (paragraphs with at least one counted slot)."""
    whole = [all(hits[f] for f in a.facts if f in hits) for a in answers if any(f in hits for f in a.facts)]
    return {"hits": sum(whole), "n": len(whole), "em": sum(whole) / len(whole) if whole else None}


def write_paragraphs(module: Any, prompts: Sequence[str], max_new_tokens: int, source_entropy: float | None = None,
                     source_max_gap: int | None = None) -> tuple[list[str], float, int]:
    """An LLM Module's greedy paragraphs, one prompt at a time, and the source's forwards per answer token written
    (`inference.calibrate.write_counting_reads`)."""
    from ..inference.calibrate import write_counting_reads

    return write_counting_reads(module, prompts, max_new_tokens, source_entropy, source_max_gap)
