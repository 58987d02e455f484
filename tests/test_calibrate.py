"""Calibrating the adaptive schedule to a budget of source reads: counting reads, bisection, CLI, errors."""

import json

import pytest

from llm_modules.inference.calibrate import calibrate_entropy, write_counting_reads

PROMPTS = ["What is the sum of 2 and 3?", "What is 7 times 4?", "Find the remainder of 9 by 4."]


def _adaptive(build, **kw):
    return build(conditioning="prompt", knowledge_path="lookup", source_adaptive=0.25, **kw).eval()


def test_reads_are_counted_per_answer_token(build):
    m = _adaptive(build)
    texts, always, written = write_counting_reads(m, PROMPTS, 12, source_entropy=0.0, stop_strings=())
    assert len(texts) == 3 and written > 0
    # Every token after the first is a catch-up (the last one written is never fed back): (n - 1) / n per prompt.
    assert always == pytest.approx((written - 3) / written)
    assert write_counting_reads(m, PROMPTS, 12, source_entropy=1e6, stop_strings=())[1] == 0.0
    assert write_counting_reads(m, PROMPTS, 12, source_entropy=1e6, source_max_gap=3, stop_strings=())[1] > 0.2


def test_calibration_finds_the_lowest_threshold_within_the_budget(build):
    m = _adaptive(build, seed=3)
    logs = []
    cal = calibrate_entropy(m, PROMPTS, 0.4, max_new_tokens=12, steps=7, stop_strings=(), log=logs.append)
    assert cal.reads_per_token <= 0.4 and len(cal.tried) == 8 and len(logs) == 8
    # Bisection: every threshold tried below the answer read more than the budget, every one at or above it not.
    assert all(r > 0.4 for t, r in cal.tried if t < cal.threshold)
    assert all(r <= 0.4 for t, r in cal.tried if t >= cal.threshold)
    over = max((t for t, r in cal.tried if r > 0.4), default=0.0)
    assert 0 < cal.threshold - over <= cal.tried[0][0] / 2 ** 7 + 1e-9  # as close as 7 halvings get
    again = write_counting_reads(m, PROMPTS, 12, source_entropy=cal.threshold, stop_strings=())
    assert again[1] == cal.reads_per_token and again[2] == cal.tokens  # greedy: measured again, the same


def test_calibration_errors_are_one_line(build):
    with pytest.raises(ValueError, match="has none \\(trained with source_adaptive 0\\)"):
        calibrate_entropy(build(conditioning="prompt").eval(), PROMPTS, 0.2)
    m = _adaptive(build)
    with pytest.raises(ValueError, match="a share of answer tokens in \\(0, 1\\), got 1.5"):
        calibrate_entropy(m, PROMPTS, 1.5)
    m.config.source_max_gap = 2
    with pytest.raises(ValueError, match="even with no entropy read the source reads 0.*source_max_gap 2"):
        calibrate_entropy(m, PROMPTS, 0.1, max_new_tokens=12, stop_strings=())


def test_calibrate_command_writes_the_threshold(build, tmp_path, capsys):
    from llm_modules import LLMModule
    from llm_modules.cli import main
    from llm_modules.fixtures import arith_rows

    folder = tmp_path / "m"
    _adaptive(build, seed=1).save_pretrained(folder)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(6, seed=2)))
    weights = (folder / "model.safetensors").read_bytes()
    assert main(["calibrate", "--model", str(folder), "--data", str(data), "--read-budget", "0.3", "--limit", "3",
                 "--max-new-tokens", "10", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "calibrating on 3 prompts" in out and "source reads per answer token" in out
    m = LLMModule.from_pretrained(folder)
    assert m.config.source_entropy != 1.0 and f"source_entropy {m.config.source_entropy:.4f} nats" in out
    assert (folder / "model.safetensors").read_bytes() == weights  # only the config changed
    copy = tmp_path / "copy"
    assert main(["calibrate", "--model", str(folder), "--data", str(data), "--read-budget", "0.9", "--limit", "3",
                 "--max-new-tokens", "10", "--steps", "5", "--output", str(copy)]) == 0
    assert LLMModule.from_pretrained(copy).config.source_entropy <= m.config.source_entropy
    assert main(["calibrate", "--model", str(folder), "--data", str(data), "--read-budget", "0"]) == 2
    assert "calibrate: error: the read budget is a share of answer tokens in (0, 1), got 0.0" in capsys.readouterr().err
