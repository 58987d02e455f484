import json

import pytest
from transformers import AutoTokenizer

from llm_modules.data import (
    DEFAULT_SYSTEM_PROMPT, IGNORE, Conversation, DataError, Formatter, collate, encode_prompt, iter_rows, load_examples,
    parse_row, split_examples,
)

ROW = {"system": "Be brief.", "conversations": [
    {"from": "user", "value": "sum of 5 and 5"},
    {"from": "assistant", "value": "<|begin_of_solution|> 10 <|end_of_solution|>"}]}
MSG_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sum of 5 and 5"},
                        {"role": "assistant", "content": "<|begin_of_solution|> 10 <|end_of_solution|>"}]}


@pytest.fixture(scope="module")
def tok(fx):
    return AutoTokenizer.from_pretrained(fx["tokenizer"])


def _answer_text(tok, ex):
    return tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


@pytest.mark.parametrize("row", [ROW, MSG_ROW])
def test_paper_format_golden_layout(tok, row):
    ex = Formatter(tok, "paper").encode(parse_row(row, "r"))
    assert tok.decode(ex.input_ids) == (
        "System:\n\nBe brief.\n\nUser:\n\nsum of 5 and 5\n\nAssistant:\n\n"
        "<|begin_of_solution|> 10 <|end_of_solution|><|endoftext|>\n\n")
    assert _answer_text(tok, ex) == "<|begin_of_solution|> 10 <|end_of_solution|><|endoftext|>"
    first = ex.labels.index(next(l for l in ex.labels if l != IGNORE))
    assert all(l != IGNORE for l in ex.labels[first:-2]) and ex.labels[-2:] == [IGNORE, IGNORE]
    assert ex.labels[-3] == tok.eos_token_id  # the EOS that ends the answer is a label


def test_chat_template_format_golden_layout(tok):
    ex = Formatter(tok, "chat_template").encode(parse_row(MSG_ROW, "r"))
    assert tok.decode(ex.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsum of 5 and 5<|im_end|>\n"
        "<|im_start|>assistant\n<|begin_of_solution|> 10 <|end_of_solution|><|im_end|>\n")
    assert _answer_text(tok, ex) == "<|begin_of_solution|> 10 <|end_of_solution|><|im_end|>"


def test_loss_on_all_labels_every_token_and_default_system(tok):
    row = {"conversations": ROW["conversations"]}
    ex = Formatter(tok, "paper", loss_on="all").encode(parse_row(row, "r"))
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids).startswith(f"System:\n\n{DEFAULT_SYSTEM_PROMPT}\n\nUser:")


def test_length_filter_drops_and_counts(tok, tmp_path):
    rows = [ROW, {**ROW, "conversations": [ROW["conversations"][0], {"from": "assistant", "value": "x " * 300}]}] * 3
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs, rep = load_examples(str(p), Formatter(tok), max_length=100)
    assert (rep.rows, rep.kept, rep.dropped_too_long) == (6, 3, 3)
    assert all(len(e.input_ids) <= 100 for e in exs)


def test_split_is_disjoint_deterministic_and_subset():
    from llm_modules.data import Example

    exs = [Example([i], [i], f"row {i}") for i in range(100)]
    tr, va = split_examples(exs, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90
    assert not {e.where for e in tr} & {e.where for e in va}
    tr2, va2 = split_examples(exs, 0.1, seed=3)
    assert [e.where for e in va] == [e.where for e in va2]
    tr3, va3 = split_examples(exs, 0.1, seed=3, subset=0.3)
    assert len(tr3) + len(va3) == 30 and len(va3) == 3


@pytest.mark.parametrize("row,msg", [
    ({"system": "s"}, "missing field 'conversations'"),
    ({"conversations": "hi"}, "field 'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "  "}]}, "empty assistant turn"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "robot", "value": "a"}]}, "expected user or assistant"),
    ({"conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "a"}]}, "value must be a string"),
    ({"system": 1, "conversations": ROW["conversations"]}, "field 'system' must be a string"),
    ({"conversations": [{"from": "assistant", "value": "a"}]}, r"conversations\[0\] is an assistant turn that does not follow a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, r"messages\[2\] is an assistant turn that does not follow"),
])
def test_bad_rows_name_file_and_row(tok, tmp_path, row, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl line 2: .*{msg}"):
        load_examples(str(p), Formatter(tok))
    exs, rep = load_examples(str(p), Formatter(tok), skip_bad_rows=True)
    assert len(exs) == 1 and rep.bad_rows == 1


def test_undecodable_line_and_formats_json_parquet(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(ROW).encode() + b"\n{not json\n")
    with pytest.raises(DataError, match="d.jsonl line 2: undecodable line"):
        load_examples(str(p), Formatter(tok))
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "folder"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([ROW, MSG_ROW]))
    pq.write_table(pa.Table.from_pylist([ROW]), d / "b.parquet")
    rows = list(iter_rows(str(d)))
    assert len(rows) == 3 and rows[2][0].endswith("b.parquet row 0")
    exs, _ = load_examples(str(d), Formatter(tok))
    assert exs[0].input_ids == exs[1].input_ids == exs[2].input_ids


def test_missing_local_file_is_clear(tok):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_examples("nope.jsonl", Formatter(tok))


def test_collate_pads_right_with_ignored_labels():
    from llm_modules.data import Example

    b = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("fmt", ["paper", "chat_template", "plain"])
def test_prompt_after_history_is_the_training_prefix(tok, fmt):
    """A chat prompt is tokenized and marked exactly as training saw that conversation up to the new answer."""
    turns = [("user", "sum of 5 and 5"), ("assistant", "10"), ("user", "sum of 2 and 3"), ("assistant", "5")]
    full = Formatter(tok, fmt, system_prompt="Be brief.").encode(Conversation("Be brief.", turns))
    p = encode_prompt(tok, fmt, "sum of 2 and 3", turns[:2], "Be brief.")
    n = len(p.input_ids)
    assert full.input_ids[:n] == p.input_ids and full.answer[:n] == p.answer
    assert sum(p.answer) > 0 and p.answer[-1] == 0  # the earlier answer is marked, the prompt ends outside it
    assert full.answer[n] == 1  # the next token starts the new answer
    assert encode_prompt(tok, "raw", "sum of 2").answer == [0] * len(tok("sum of 2").input_ids)
