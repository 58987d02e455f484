"""The real-facts benchmark: data, probing, entity split, scoring, and the whole pipeline on a tiny local source."""

import json

import pytest
import torch

from llm_modules.data import DataError
from llm_modules.demo.facts import (PACKAGED, PACKAGED_KINDS, RealFact, load_fact_files, load_facts, lost_facts,
                                    relation_folds, score, split_by_entity, split_by_relation, states_answer, wilson)

CITIES = ["Tarnak", "Velmor", "Quist", "Dravo", "Ombra", "Selk", "Ritha", "Munzo", "Pelgar", "Hask", "Vorn", "Zelda"]
NAMES = ["Zorvia", "Quelmar", "Astor", "Bexland", "Corrin", "Dalvia", "Ebron", "Fenwick", "Galdor", "Hollin",
         "Istra", "Jorvik"]
COLOURS = ["red", "blue", "green"]


def _facts_file(path):
    rows = []
    for i, (n, c) in enumerate(zip(NAMES, CITIES)):
        rows.append({"entity": n, "relation": "capital", "question": f"What is the capital of {n}?",
                     "cue": f"The capital of {n} is", "answer": c})
        rows.append({"entity": n, "relation": "colour", "cue": f"The flag of {n} is", "answer": COLOURS[i % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_packaged_facts_are_many_relations_and_well_formed():
    facts = load_facts()
    rel = {f.relation for f in facts}
    assert len(facts) >= 500 and len(rel) >= 5
    assert {("France", "capital", "Paris"), ("Gold", "element symbol", "Au"), ("Iron", "atomic number", "26")} <= {
        (f.entity, f.relation, f.answer) for f in facts}


def test_packaged_facts_of_more_kinds_for_the_relation_split():
    facts = load_fact_files([PACKAGED, PACKAGED_KINDS])
    rel = {f.relation for f in facts}
    assert len(rel) >= 12 and len(facts) == len(load_facts()) + len(load_facts(PACKAGED_KINDS))
    assert {("Osaka", "city country", "Japan"), ("hot", "opposite", "cold"), ("water", "chemical formula", "H2O"),
            ("Hamlet", "book author", "William Shakespeare")} <= {(f.entity, f.relation, f.answer) for f in facts}
    assert all(f.question and f.cue for f in facts)


def test_relation_folds_hold_out_each_relation_once_and_balance_sizes():
    facts = [RealFact(f"e{i}", r, f"cue {r} {i}", f"a{i}") for r, n in (("a", 9), ("b", 7), ("c", 5), ("d", 3), ("e", 2))
             for i in range(n)]
    folds = relation_folds(facts, 2)
    assert sorted(r for g in folds for r in g) == ["a", "b", "c", "d", "e"]
    sizes = [sum(f.relation in g for f in facts) for g in folds]
    assert sorted(sizes) == [12, 14]  # greedy: a=9 | b=7, c to b's side (12), d to a's (12), e to either
    with pytest.raises(ValueError, match="6 folds need between 2 and 5"):
        relation_folds(facts, 6)
    s = split_by_relation(facts, ["b", "d"], seed=0)
    assert {f.relation for f in s.test} == {"b", "d"} and len(s.test) == 10
    assert {f.relation for f in s.train + s.val} == {"a", "c", "e"}
    assert not {f.entity for f in s.train} & {f.entity for f in s.val} and s.val
    targets = {f.answer for f in s.train}
    assert s.unseen == {f for f in s.test if f.answer not in targets}


def test_bad_fact_files_name_the_line(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text('{"entity": "A", "relation": "r", "cue": "c", "answer": "x"}\n{"entity": "B", "cue": "c"}\n')
    with pytest.raises(DataError, match="f.jsonl line 2: needs non-empty string field\\(s\\) relation, answer"):
        load_facts(p)
    p.write_text('{"entity": "A", "relation": "r", "cue": "c", "answer": "x"}\n{"entity": "A", "relation": "r", "cue": "d", "answer": "y"}\n')
    with pytest.raises(DataError, match="line 2: a second 'r' fact for 'A'"):
        load_facts(p)
    q = tmp_path / "g.jsonl"
    q.write_text('{"entity": "A", "relation": "r", "cue": "e", "answer": "z"}\n')
    p.write_text('{"entity": "A", "relation": "r", "cue": "c", "answer": "x"}\n')
    with pytest.raises(DataError, match="g.jsonl: the 'r' fact for 'A' is also in .*f.jsonl"):
        load_fact_files([p, q])


def test_split_is_by_entity_and_unseen_answers_are_never_targets():
    facts = [RealFact(n, "capital", f"cue {n}", c) for n, c in zip(NAMES, CITIES)]
    facts += [RealFact(n, "colour", f"flag {n}", COLOURS[i % 3]) for i, n in enumerate(NAMES)]
    s = split_by_entity(facts, seed=1)
    ents = [{f.entity for f in part} for part in (s.train, s.val, s.test)]
    assert all(ents) and not (ents[0] & ents[1] or ents[0] & ents[2] or ents[1] & ents[2])
    targets = {f.answer.lower() for f in s.train}
    assert s.unseen == {f for f in s.test if f.answer.lower() not in targets}
    assert any(f.relation == "capital" for f in s.unseen) and not any(f.relation == "colour" for f in s.unseen)


def test_lost_facts_say_how_a_system_misses_what_the_source_states():
    facts = [RealFact("Iceland", "capital", "c", "Reykjavik"), RealFact("Spain", "capital", "c", "Madrid"),
             RealFact("Ca", "atomic number", "c", "20"), RealFact("Peru", "capital", "c", "Lima"),
             RealFact("Chad", "capital", "c", "N'Djamena")]
    got = [" Reyk\n", " Spain.", " 2", " Lima", " Paris"]
    source = [" Reykjavik.", " Madrid", " 20.", " Lima.", " Abuja"]  # the source misses Chad: not counted
    lost = lost_facts(facts, got, source, targets={"spain", "france"})
    assert lost == {"source states": 4, "stopped early": 2, "a training answer": 1, "other": 0}
    assert lost_facts(facts, got, source, targets=set())["other"] == 1


def test_scoring_and_intervals():
    assert states_answer(" Paris. It is", "Paris") and states_answer(" New Delhi\nx", "New Delhi")
    assert not states_answer(" Parisian", "Paris") and not states_answer(" Lyon", "Paris")
    facts = [RealFact("A", "r", "c", "x"), RealFact("B", "s", "c", "y")]
    sc = score(facts, [" x", " z"], unseen={facts[1]})
    assert sc["all"]["em"] == 0.5 and sc["unseen"]["em"] == 0.0 and sc["relations"]["r"]["em"] == 1.0
    lo, hi = wilson(45, 50)
    assert 0.78 < lo < 0.80 and 0.95 < hi < 0.97 and wilson(0, 0) == (0.0, 0.0)


def test_whole_facts_benchmark_on_a_tiny_local_source(fx, tmp_path):
    """A tiny model taught the facts is the source; every system runs; the report has every table."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from llm_modules.demo.facts_run import ABLATION, FactsConfig, run_facts
    from llm_modules.demo.run import fit_causal_lm, lm_examples
    from llm_modules.fixtures import tiny_config

    rows = _facts_file(tmp_path / "facts.jsonl")
    tok = PreTrainedTokenizerFast.from_pretrained(fx["tokenizer"])
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(tiny_config("qwen2", len(tok), hidden=64, layers=2, heads=4))
    # The source states each fact after its cue, also behind the question (as a real model reads the task prompt).
    texts = [f"{r['cue']} {r['answer']}." for r in rows] * 4
    texts += [f"{r['question']} Recall: {r['cue']} {r['answer']}." for r in rows if "question" in r] * 2
    fit_causal_lm(src, tok, lm_examples(tok, texts), tmp_path / "src_run", epochs=60, lr=5e-3, batch_size=16, seed=0,
                  desc="src", progress=False)
    src_dir = tmp_path / "src_run" / "last"
    cfg = FactsConfig(out=str(tmp_path / "out"), source=str(src_dir), facts=str(tmp_path / "facts.jsonl"),
                      seeds=(0, 1), epochs=2, small_hidden=32, batch_size=8, progress=False, source_every=2)
    cfg.systems = (*cfg.systems, *ABLATION)
    logs = []
    summary = run_facts(cfg, log=logs.append)
    assert summary["kept"] >= 8  # the tiny source learned most facts; the probe keeps what it states
    table = summary["table"]
    assert set(table) == set(cfg.systems) | {"source alone, bare cue (100% by selection)"}
    assert table["source alone, bare cue (100% by selection)"]["all"]["mean"] >= 0.9  # the probe kept what it states
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| LLM Module + knowledge path |" in report and "unseen answers" in report and "capital" in report
    fast, token = table["LLM Module + knowledge lookup, prompt conditioning"], table["LLM Module + knowledge path"]
    assert 0 < fast["per_token"] < token["per_token"] and fast["answer_source_tokens"] == 1
    assert fast["source_every"] == 2 and f"| {fast['per_token']:,} (+ the source on the first 1 answer token(s)) " \
        "(+ a source forward over every 2 answer tokens) |" in report
    # The point of the pipeline: answers never trained on come out through the knowledge path, never through the
    # paper's design (its new head has never been trained to name them).
    from llm_modules.demo.facts_run import MODULE_KNOWLEDGE, MODULE_PAPER

    unseen = {n: table[n]["unseen"] for n in (MODULE_PAPER, MODULE_KNOWLEDGE)}
    assert unseen[MODULE_PAPER]["n"] >= 4 and unseen[MODULE_PAPER]["mean"] == 0.0
    assert unseen[MODULE_KNOWLEDGE]["mean"] >= 0.75, unseen  # 1.0 measured (2 seeds x 8 facts)
    runs0 = summary["runs"]["0"]
    for name in ("small alone", MODULE_KNOWLEDGE):  # what the source states on the same prompts, kept or lost
        lost = runs0[name]["lost"]
        assert lost["source states"] == runs0["source alone"]["all"]["hits"]
        kept = lost["source states"] - lost["stopped early"] - lost["a training answer"] - lost["other"]
        assert 0 <= kept <= runs0[name]["all"]["hits"]
    assert table["source alone"]["vs_source"]["mean"] == 1.0 and "## Where systems lose what the source states" in report
    src_em = table["source alone"]["all"]["mean"]
    assert src_em is not None and 0.0 <= src_em <= 1.0
    assert summary["runs"]["0"]["small alone"]["all"]["n"] == summary["runs"]["0"]["source alone"]["all"]["n"]
    assert (tmp_path / "out" / "probe.json").exists() and (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    import dataclasses

    again = run_facts(dataclasses.replace(cfg, systems=(), seeds=(0,)), log=logs.append)  # the probe is cached
    assert sum("probing the source" in s for s in logs) == 1 and again["kept"] == summary["kept"]

    # The relation split: each relation held out in one fold, every kept fact tested once over the folds.
    from llm_modules.demo.facts_run import MODULE_FAST, MODULE_FAST_ADAPTIVE, SMALL, SOURCE

    rel = run_facts(dataclasses.replace(cfg, split="relation", seeds=(0,), out=str(tmp_path / "rel"),
                                        systems=(MODULE_KNOWLEDGE, MODULE_FAST, MODULE_FAST_ADAPTIVE, SMALL, SOURCE),
                                        adaptive_entropy=0.0), log=logs.append)
    assert sorted(map(sorted, rel["folds"])) == [["capital"], ["colour"]]
    run = rel["runs"]["0"]
    assert run[SMALL]["all"]["n"] == run[SOURCE]["all"]["n"] == rel["kept"]
    assert run[SMALL]["lost"]["source states"] == run[SOURCE]["all"]["hits"]  # summed over the folds
    assert {a["relation"] for a in run[SMALL]["answers"]} == {"capital", "colour"}
    # Held out, the capitals are all answers never trained on; the colours too (no colour is a capital).
    assert run[SMALL]["unseen"]["n"] == rel["kept"]
    assert (tmp_path / "rel" / "seed0" / "fold1" / "small").is_dir()
    rel_report = (tmp_path / "rel" / "report.md").read_text()
    assert "Split by relation" in rel_report
    # At 0 nats the adaptive module's source catches up at every answer token it writes after the first.
    reads = rel["table"][MODULE_FAST_ADAPTIVE]["source_reads_per_token"]
    assert 0.3 < reads < 1 and rel["table"][MODULE_FAST]["source_reads_per_token"] is None
    assert f"(+ a source forward where the module is unsure: {reads:.2f} per answer token)" in rel_report
    with pytest.raises(ValueError, match="long answers are split by entity"):
        run_facts(dataclasses.replace(cfg, split="relation", long_answers=True), log=logs.append)


def test_demo_split_flags_fail_in_one_line_before_loading_anything(capsys, tmp_path):
    from llm_modules.cli import main

    out = str(tmp_path / "o")
    assert main(["demo", "--world", "facts", "--split", "relation", "--long-answers", "--out", out]) == 2
    assert "demo: error: long answers are split by entity" in capsys.readouterr().err
    assert main(["demo", "--world", "facts", "--split", "relation", "--relation-folds", "1", "--out", out]) == 2
    assert "relation split: 1 folds; it needs 2 or more" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
