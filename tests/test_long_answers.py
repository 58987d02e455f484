"""Long answers with facts in the middle: paragraphs, where each slot is read, whole-answer scores, and the
`--long-answers` pipeline on a tiny local source."""

import json

import torch

from llm_modules.demo.facts import RealFact, states_answer
from llm_modules.demo.long_answers import SENTENCES, answers_part, long_answers, slot_text

CITIES = ["Tarnak", "Velmor", "Quist", "Dravo", "Ombra", "Selk", "Ritha", "Munzo", "Pelgar", "Hask", "Vorn", "Zelda"]
NAMES = ["Zorvia", "Quelmar", "Astor", "Bexland", "Corrin", "Dalvia", "Ebron", "Fenwick", "Galdor", "Hollin",
         "Istra", "Jorvik"]
VALUES = {"continent": ["Europe", "Asia", "Africa"], "currency": ["euro", "dollar", "franc", "yen"],
          "language": ["Norse", "Latin", "Greek", "Welsh", "Basque"]}
CUES = {"capital": "The capital of {} is", "continent": "{} is a country in", "currency": "The currency of {} is the",
        "language": "The official language of {} is"}


def _facts():
    out = []
    for i, (n, c) in enumerate(zip(NAMES, CITIES)):
        for rel, cue in CUES.items():
            value = c if rel == "capital" else VALUES[rel][i % len(VALUES[rel])]
            out.append(RealFact(n, rel, cue.format(n), value, f"Question about {n}?"))
    return out


def test_paragraphs_state_each_fact_in_the_middle_in_a_fixed_order():
    facts = _facts() + [RealFact("Lonely", "capital", "The capital of Lonely is", "Solo")]  # too few facts: no paragraph
    answers = long_answers(facts)
    assert [a.entity for a in answers] == NAMES
    cyprus = answers[0]
    assert cyprus.question() == "Tell me about Zorvia."
    assert cyprus.answer() == (" Here is what I know about Zorvia. It is a country in Europe. Its capital city is "
                               "Tarnak. The currency used there is the euro. The main language spoken is Norse.")
    assert [f.relation for f in cyprus.facts] == list(SENTENCES)
    capital = cyprus.facts[1]
    assert cyprus.prefix(capital) == " Here is what I know about Zorvia. It is a country in Europe. Its capital city is"
    assert (cyprus.answer()).startswith(cyprus.prefix(capital) + " Tarnak.")
    assert cyprus.row()["conversations"][1]["value"] == cyprus.answer()


def test_a_slot_is_read_where_its_sentence_states_it():
    a = long_answers(_facts())[0]
    continent, capital, currency, language = a.facts
    written = " Here is what I know about Zorvia. It is a country in Asia. Its capital city is Tarnak. The main language"
    assert slot_text(written, capital) == " Tarnak" and states_answer(slot_text(written, capital), "Tarnak")
    assert not states_answer(slot_text(written, continent), "Europe")  # stated, wrongly
    assert slot_text(written, currency) == ""  # its sentence is missing: a miss
    assert slot_text(written, language) == ""  # cut before the value
    hits = {continent: False, capital: True}  # the other two not counted (the source does not state them)
    b = long_answers(_facts())[1]
    assert answers_part([a, b], hits) == {"hits": 0, "n": 1, "em": 0.0}  # b has no counted slot
    assert answers_part([a], {capital: True})["em"] == 1.0


def test_long_answer_pipeline_on_a_tiny_local_source(fx, tmp_path):
    """The tiny source learns the paragraphs; every long-answer system runs on an entity split; the source alone,
    given each paragraph up to a slot, states the slot's value; the report has slot and whole-answer columns."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from llm_modules.demo.facts_run import (MODULE_FAST, MODULE_KNOWLEDGE, FactsConfig, adaptive_name,
                                            adaptive_settings, budget_name, every_name, long_systems, run_facts)
    from llm_modules.demo.run import fit_causal_lm, lm_examples
    from llm_modules.fixtures import tiny_config

    facts = _facts()
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(
        {"entity": f.entity, "relation": f.relation, "cue": f.cue, "answer": f.answer, "question": f.question}) + "\n"
        for f in facts))
    tok = PreTrainedTokenizerFast.from_pretrained(fx["tokenizer"])
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(tiny_config("qwen2", len(tok), hidden=64, layers=2, heads=4))
    texts = [f"{f.cue} {f.answer}." for f in facts] * 4 + [a.question() + a.answer() for a in long_answers(facts)] * 4
    fit_causal_lm(src, tok, lm_examples(tok, texts), tmp_path / "src_run", epochs=40, lr=5e-3, batch_size=16, seed=0,
                  desc="src", progress=False)
    cfg = FactsConfig(out=str(tmp_path / "out"), source=str(tmp_path / "src_run" / "last"),
                      facts=str(tmp_path / "facts.jsonl"), seeds=(0,), small_hidden=32, batch_size=8, progress=False,
                      long_answers=True, long_every=(3,), long_adaptive=(0.0, 1e6), long_max_gaps=(0, 4), long_epochs=2,
                      long_max_new_tokens=48, long_budgets=(0.3,), calibration_prompts=2, calibration_steps=4)
    cfg.systems = long_systems(cfg.long_every, adaptive_settings(cfg), cfg.long_budgets)
    summary = run_facts(cfg, log=lambda s: None)
    table = summary["table"]
    assert set(table) == set(cfg.systems) and every_name(3) in table
    source = table["source alone"]
    assert source["all"]["n"] >= 8 and source["all"]["mean"] >= 0.75  # it states what the probe kept, mid-paragraph
    assert table[every_name(3)]["source_every"] == 3
    # Source forwards per answer token, as measured while writing: token conditioning all but the last token, the
    # adaptive module at 0 nats the same, every 3 about a third, at a threshold never reached the first token only.
    reads = {n: table[n]["source_reads_per_token"] for n in cfg.systems}
    assert reads[MODULE_KNOWLEDGE] > 0.9 and reads[adaptive_name(0.0)] > 0.9
    assert 0.2 < reads[every_name(3)] < 0.45 and max(reads[adaptive_name(1e6)], reads[MODULE_FAST]) < 0.2
    assert reads["source alone"] is None and table[adaptive_name(0.0)]["source_adaptive"] == 0.25
    assert reads[adaptive_name(1e6)] < 0.2 < reads[adaptive_name(1e6, 4)] < 0.4  # the bound alone: every 4 tokens
    # Calibrated on 2 validation questions to read at 30% of tokens: a threshold between never and always reading.
    (nats,) = table[budget_name(0.3)]["source_entropy"]
    assert 0 < nats < 1e6 and reads[adaptive_name(1e6)] <= reads[budget_name(0.3)] <= reads[adaptive_name(0.0)]
    assert sorted(p.name for p in (tmp_path / "out" / "seed0").iterdir() if "adaptive" in p.name) == ["adaptive"]
    counted = source["whole answers"]["n"]
    assert 1 <= counted <= 4 and all(table[n]["whole answers"]["n"] == counted for n in cfg.systems)  # 4 test entities
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| system | slots right | unseen values | seen values | whole answers | source forwards per answer token |" \
        in report
    assert "(+ a source forward over every 3 answer tokens)" in report and f"(threshold {nats:.2f} nats)" in report
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "out" / "quality_cost.png").stat().st_size > 1000 and "quality_cost.png" in report
    written = json.loads((tmp_path / "out" / "seed0" / "paragraphs.json").read_text())
    assert set(written) == set(cfg.systems) - {"source alone"} and all(len(v) == 4 for v in written.values())
