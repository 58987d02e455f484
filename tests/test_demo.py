import json

from llm_modules.demo import DemoConfig, completion_answer, run_demo
from llm_modules.inference.evaluate import exact_match, extract_answer
from llm_modules.demo.world import ATTRIBUTES, make_world


def test_world_is_deterministic_and_split_by_entity():
    a, b, c = make_world(3), make_world(3), make_world(4)
    assert [f.statement() for f in a.facts] == [f.statement() for f in b.facts]
    assert [f.statement() for f in a.facts] != [f.statement() for f in c.facts]
    held = {f.subject["e"] for f in a.heldout_facts if a.is_entity(f)}
    trained = {f.subject["e"] for f in a.train_facts if a.is_entity(f)}
    assert held and trained and not held & trained
    assert len(held) == len(a.entities) // 2
    # every entity has one value per attribute, from the attribute's set
    for f in a.facts:
        if a.is_entity(f):
            assert f.value in ATTRIBUTES[f.kind]
    # the paper's two prompts are held out, with the right answers
    got = {f.question().split(" Recall")[0]: f.value for f in a.heldout_facts}
    assert got["What is the sum of 5 and 5?"] == "10"
    assert got["Find the remainder by dividing 7 by 4."] == "3"


def test_corpus_states_every_fact_and_general_text_none_of_the_targets():
    w = make_world(0, n_entities=10, n_background=5)
    corpus = " ".join(w.source_corpus())
    for f in w.facts:
        assert f.statement() in corpus
    general = " ".join(w.general_text())
    assert not any(e in general for e in w.entities)


def test_task_rows_use_the_paper_markers():
    f = make_world(0).facts[0]
    ans = f.row()["conversations"][1]["value"]
    assert ans.startswith("<|begin_of_thought|>") and ans.endswith(f"<|begin_of_solution|> {f.value} <|end_of_solution|>")
    assert f.question().endswith(f"Recall: {f.stem()} ...")


def test_answer_extraction_and_exact_match():
    assert extract_answer("<|begin_of_thought|> x <|end_of_thought|> <|begin_of_solution|>  Quenby <|end_of_solution|>") == "Quenby"
    assert extract_answer("<|begin_of_solution|> 10.") == "10"  # unterminated, trailing period
    assert extract_answer("no markers here") == "no markers here"
    assert exact_match(["<|begin_of_solution|> Blue <|end_of_solution|>", "<|begin_of_solution|> 3"],
                       ["<|begin_of_solution|> blue <|end_of_solution|>", "<|begin_of_solution|> 4 <|end_of_solution|>"]) == 0.5
    assert completion_answer(" Brindle. Corvath lives in") == "Brindle"


HEADLINE = ["LLM Module (frozen large + bridge + small)", "LLM Module, prompt conditioning + knowledge lookup",
            "large fine-tuned (the distillation teacher)", "small fine-tuned",
            "distilled (logit KD from the fine-tuned large)", "large model alone (corpus-form prompts)"]
ABLATION = ["LLM Module + knowledge lookup", "LLM Module, prompt conditioning without lookup (ablation)",
            "small from scratch", "distilled + held-out prompts (teacher-answered)"]


def test_quick_demo_writes_report(tmp_path):
    """The first command's systems by default, the ablations behind a flag; both from one cache, same numbers."""
    summary = run_demo(DemoConfig.quick(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")), log=lambda s: None)
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "| LLM Module (frozen large + bridge + small) |" in report and "What is the sum of 5 and 5?" in report
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())["results"]
    assert list(res) == HEADLINE and all(0.0 <= r["heldout"] <= 1.0 for r in res.values())
    # fast mode beside the paper's, each with what it runs per new token
    fast, token = res["LLM Module, prompt conditioning + knowledge lookup"], res[HEADLINE[0]]
    assert 0 < fast["per_token"] < token["per_token"] and f"| {fast['per_token']:,} |" in report
    assert (tmp_path / "out" / "llm_module_prompt_lookup" / "best" / "llm_module.json").exists()
    assert summary["results"]["small fine-tuned"]["trainable"] < summary["results"][HEADLINE[0]]["trainable"]
    # --ablation: the other four systems too; a second run reuses the cached pretrained models
    logs = []
    again = run_demo(DemoConfig.quick(out=str(tmp_path / "out2"), cache_dir=str(tmp_path / "cache"), ablation=True),
                     log=logs.append)
    assert any("pretrained models: reusing" in s for s in logs)
    assert set(again["results"]) == set(HEADLINE) | set(ABLATION)
    plain = again["results"]["LLM Module, prompt conditioning without lookup (ablation)"]
    assert 0 < plain["per_token"] < again["results"]["LLM Module, prompt conditioning + knowledge lookup"]["per_token"]
    # a line per result, no per-validation chatter (training reports through its progress bar)
    assert not any("validation loss" in s or s.startswith("data:") for s in logs)
    assert sum(s.lstrip().startswith(("LLM Module:", "LLM Module + lookup:", "LLM Module, fast:", "fast, no lookup:",
                                      "small", "distilled", "large alone", "large fine-tuned")) for s in logs) == 10
    # deterministic from the seed, and the ablations change nothing in the headline systems
    for name, r in summary["results"].items():
        r2 = again["results"][name]
        assert (r["heldout"], r["trained"], r["val_loss"]) == (r2["heldout"], r2["trained"], r2["val_loss"]), name


def test_cli_demo_runs_the_ablations_only_when_asked(monkeypatch):
    from llm_modules.cli import main

    seen = []
    monkeypatch.setattr("llm_modules.demo.run_demo", lambda cfg: seen.append(cfg.ablation))
    assert main(["demo", "--quick", "--out", "x"]) == 0 and main(["demo", "--quick", "--out", "x", "--ablation"]) == 0
    assert seen == [False, True]


def test_several_seeds_give_one_report_with_spread_and_intervals(tmp_path):
    from llm_modules.demo.run import run_demo_seeds

    cfg = DemoConfig.quick(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    summary = run_demo_seeds(cfg, [0, 1], log=lambda s: None)
    assert (tmp_path / "out" / "seed0" / "report.md").exists() and (tmp_path / "out" / "seed1" / "report.md").exists()
    cell = summary["table"]["LLM Module (frozen large + bridge + small)"]["heldout_entities"]
    assert cell["min"] <= cell["mean"] <= cell["max"] and 0.0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1.0
    assert cell["n"] == 2 * 12  # quick world: 4 held-out entities x 3 attributes, twice
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Seeds 0, 1" in report and "| large model alone (corpus-form prompts) |" in report
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
