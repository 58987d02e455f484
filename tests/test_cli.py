"""The command line: each verb end to end on tiny local models, and one-line errors."""

import io
import json

import pytest

from llm_modules.inference.chat import chat_loop
from llm_modules.cli import main

from conftest import write_tiny_recipe


@pytest.fixture(scope="module")
def trained(fx, tmp_path_factory):
    """A tiny module trained for a few steps through `llm-modules train`, plus its data."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe, data = write_tiny_recipe(fx, tmp)
    assert main(["train", "--config", str(recipe), "--lr_bridge", "0.003"]) == 0
    return tmp / "run" / "best", data, recipe


def test_info_preset_paper(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "bridge                    16,446,848" in out and "head                     116,464,128" in out


def test_generate_streams_and_eval_compare(trained, tmp_path, capsys):
    model, data, _ = trained
    # The module remembers the format and system prompt it was trained with.
    cfg = json.loads((model / "llm_module.json").read_text())
    assert cfg["prompt"]["format"] == "paper" and cfg["prompt"]["system_prompt"] == "Answer briefly."
    assert main(["generate", "--model", str(model), "What is the sum of 2 and 3?", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "--model", str(model), "--data", str(data), "--limit", "6", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "6 rows" in out and "perplexity" in out and "exact match" in out
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is the sum of 5 and 5?\nFind the remainder by dividing 7 by 4.\n")
    assert main(["compare", "--models", str(model), str(model), "--prompts", str(prompts), "--max-new-tokens", "16",
                 "--system", "Answer briefly."]) == 0
    out = capsys.readouterr().out
    assert out.count("## ") == 2 and out.count(str(model)) == 4


def test_errors_are_one_line(trained, tmp_path, capsys):
    model, _, recipe = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "user", "value": "q"}]}\n')
    assert main(["train", "--config", str(recipe), "--data", str(bad), "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llm-modules train: error: {bad} line 1: no assistant turn"
    assert main(["train", "--config", str(recipe), "--epochz", "3"]) == 2
    assert "unknown key(s): epochz" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "x"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    long = "sum " * 400
    assert main(["generate", "--model", str(model), long]) == 2
    assert "exceeds the context limit" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "x", "--source-entropy", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("llm-modules generate: error: --source-entropy: this module has no "
                                               "adaptive schedule (trained with source_adaptive 0)")


def test_damaged_or_misplaced_modules_are_one_line(trained, tmp_path, capsys):
    import shutil

    model = trained[0]
    run = model.parent
    assert main(["generate", "--model", str(run), "x"]) == 2
    err = capsys.readouterr().err
    assert "a training run folder, not a module; pass" in err and str(run / "best") in err and str(run / "last") in err
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    assert main(["generate", "--model", str(bad), "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad / 'model.safetensors'}: not a readable safetensors file" in err
    (bad / "llm_module.json").write_text('{"large_model": ')
    assert main(["info", "--model", str(bad)]) == 2
    assert f"{bad / 'llm_module.json'}: not valid JSON" in capsys.readouterr().err


def test_chat_reset_exit_and_interrupt(trained):
    from llm_modules.model import LLMModule

    module = LLMModule.from_pretrained(trained[0])
    lines = iter(["What is the sum of 1 and 1?", "/reset", "What is 2?", "/exit", "never read"])
    seen = []

    def inp(prompt):
        seen.append(prompt)
        return next(lines)

    out = io.StringIO()
    chat_loop(module, "paper", {"max_new_tokens": 8}, system="Answer briefly.", inp=inp, out=out)
    text = out.getvalue()
    assert text.count("module> ") == 2 and "(history cleared)" in text and len(seen) == 4
    assert "error" not in text

    calls = iter(["q1", "/exit"])

    def interrupting(tok_id):
        raise KeyboardInterrupt  # Ctrl-C during an answer stops the answer, not the chat

    import llm_modules.inference.chat as chat_mod

    real = chat_mod.TextStreamer.put
    chat_mod.TextStreamer.put = lambda self, t: interrupting(t)
    try:
        out = io.StringIO()
        chat_loop(module, "paper", {"max_new_tokens": 8}, system="Answer briefly.", inp=lambda p: next(calls), out=out)
    finally:
        chat_mod.TextStreamer.put = real
    assert "[stopped]" in out.getvalue()


def test_info_from_local_configs_and_saved_module(fx, trained, capsys):
    from llm_modules.info import parameter_counts
    from llm_modules.model import LLMModule

    assert main(["info", "--large", fx["large_qwen2"], "--small", fx["small_gpt_neo"], "--num-heads", "4",
                 "--adapter-dim", "16"]) == 0
    from_configs = capsys.readouterr().out
    assert main(["info", "--model", str(trained[0])]) == 0
    from_module = capsys.readouterr().out
    counts = parameter_counts(LLMModule.from_pretrained(trained[0]))
    line = f"{counts['trained']:,}"
    assert line in from_configs and line in from_module
    assert "source reads: every answer token, one forward each (token conditioning)" in from_module


def test_serve_refuses_bad_models_before_opening_a_port(trained, tmp_path, capsys):
    model = trained[0]
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == "llm-modules serve: error: serve needs at least one --model"
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert main(["serve", "--model", f"a={model}", "--model", f"a={model}"]) == 2
    assert "the name 'a' is given twice" in capsys.readouterr().err
    assert main(["serve", "--model", str(model.parent)]) == 2  # a run folder, not a module
    assert "a training run folder, not a module" in capsys.readouterr().err
