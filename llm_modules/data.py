"""Conversations -> token ids and labels: loading, prompt formats, length filter, split, collation.

Rows come in either schema:
  {"system": str (optional), "conversations": [{"from": "user"|"assistant", "value": str}, ...]}
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .config import FORMATS, LOSS_ON

# The reasoning system prompt of the paper's data (Bespoke-Stratos); used when a row has none.
DEFAULT_SYSTEM_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking "
    "process before providing the final precise and accurate solutions. Please structure your response into "
    "two main sections: Thought and Solution. In the Thought section, detail your reasoning process using the "
    "specified format: <|begin_of_thought|> {thought with steps separated with '\\n\\n'} <|end_of_thought|> "
    "Now, try to provide the final solution. In the Solution section, present the final solution using the "
    "format: <|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|> Now, "
    "try to solve the following question through the above guidelines:"
)
IGNORE = -100


class DataError(ValueError):
    """A malformed input row or file; the message names the file and row."""


@dataclass
class Conversation:
    system: str | None
    turns: list[tuple[str, str]]  # (role, text), roles alternate user/assistant
    where: str = ""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""
    answer: list[int] | None = None  # 1 for tokens inside an assistant answer (its EOS included), else 0


# -- loading ----------------------------------------------------------------------------------
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet"))
        if not found:
            raise DataError(f"{path}: no .json, .jsonl or .parquet files in this folder")
        return found
    return [path]


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield (where, row): a local file or folder, or a hub dataset name loaded through `datasets`."""
    path = Path(source)
    if not path.exists():
        if path.suffix in (".json", ".jsonl", ".parquet"):
            raise DataError(f"{source}: no such file")
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # noqa: BLE001 - the hub client raises many types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{source}: not a local file or folder, and loading it as a hub dataset failed ({msg})") from None
        for i, row in enumerate(ds):
            yield f"{source}[{split}] row {i}", row
        return
    for f in _files(path):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                raise DataError(f"{f}: not a readable parquet file ({e})") from None
            for i, row in enumerate(table.to_pylist()):
                yield f"{f} row {i}", row
        elif f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for i, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    try:
                        yield f"{f} line {i}", json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        yield f"{f} line {i}", DataError(f"{f} line {i}: undecodable line ({e})")
        else:
            try:
                data = json.loads(f.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{f}: not valid JSON ({e})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{f}: expected a JSON list of rows")
            for i, row in enumerate(data):
                yield f"{f} row {i}", row


_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def parse_row(row: Any, where: str) -> Conversation:
    """Validate one row of either schema; raise DataError naming `where` and the field."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected an object")
    if "conversations" in row and row["conversations"] is not None:
        items, role_key, text_key, field_name = row["conversations"], "from", "value", "conversations"
    elif "messages" in row and row["messages"] is not None:
        items, role_key, text_key, field_name = row["messages"], "role", "content", "messages"
    else:
        raise DataError(f"{where}: missing field 'conversations' (or 'messages')")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string")
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise DataError(f"{where}: {field_name}[{j}] needs '{role_key}' and '{text_key}'")
        role, text = _ROLE.get(str(m[role_key]).lower()), m[text_key]
        if role is None:
            raise DataError(f"{where}: {field_name}[{j}].{role_key} is {m[role_key]!r}, expected user or assistant")
        if not isinstance(text, str):
            raise DataError(f"{where}: {field_name}[{j}].{text_key} must be a string")
        if role == "system":
            system = text if system is None else system
            continue
        if role == "assistant" and not text.strip():
            raise DataError(f"{where}: {field_name}[{j}] is an empty assistant turn")
        if role == "assistant" and (not turns or turns[-1][0] != "user"):
            # An answer must answer something: training and evaluation apply the same rule.
            raise DataError(f"{where}: {field_name}[{j}] is an assistant turn that does not follow a user turn")
        turns.append((role, text))
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(f"{where}: no assistant turn")
    return Conversation(system, turns, where)


# -- formatting -------------------------------------------------------------------------------
def paper_segments(conv: Conversation, default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces in the reference's layout. EOS is appended after each answer by `encode`."""
    system = conv.system if conv.system is not None else default_system
    segs: list[tuple[str, bool]] = []
    if system:
        segs.append((f"System:\n\n{system}\n\n", False))
    for role, text in conv.turns:
        if role == "user":
            segs.append((f"User:\n\n{text}\n\nAssistant:\n\n", False))
        else:
            segs.append((text, True))
            segs.append(("\n\n", False))
    return segs


def paper_prompt(system: str | None, history: Sequence[tuple[str, str]], question: str,
                 default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text a model trained in the paper format continues: history plus a new question."""
    conv = Conversation(system, [*history, ("user", question)])
    return "".join(t for t, _ in paper_segments(conv, default_system))


def chat_segments(conv: Conversation, tokenizer: Any, default_system: str | None = None,
                  generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Pieces of the tokenizer's chat template; each assistant turn including its closing tokens is an answer.

    `generation_prompt` ends the text with the template's opening of a new assistant turn (a prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format 'chat_template' needs a tokenizer with a chat template")
    msgs = []
    system = conv.system if conv.system is not None else default_system
    if system:
        msgs.append({"role": "system", "content": system})
    msgs += [{"role": r, "content": t} for r, t in conv.turns]
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    segs, pos = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False))
        # Keep the template's turn separator (e.g. a newline after <|im_end|>) outside the answer.
        body = full[start:end]
        stripped = body.rstrip("\n")
        segs += [(full[pos:start], False), (stripped, True)]
        pos = start + len(stripped)
    segs.append((full[pos:], False))
    return [(t, a) for t, a in segs if t]


@dataclass
class Formatter:
    """Turns a Conversation into an Example (ids + labels) with the large model's tokenizer."""

    tokenizer: Any
    format: str = "paper"
    loss_on: str = "assistant"  # or "all": every non-padding token, as the paper
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {self.loss_on!r}")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the large tokenizer has no eos token")

    def segments(self, conv: Conversation, generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, is_answer) pieces; `generation_prompt` for a conversation ending in the user turn to answer."""
        if self.format == "paper":
            return paper_segments(conv, self.system_prompt)  # its user turn already ends in "Assistant:"
        if self.format == "plain":
            return [(text, role == "assistant") for role, text in conv.turns]
        return chat_segments(conv, self.tokenizer, self.system_prompt, generation_prompt)

    def encode(self, conv: Conversation, generation_prompt: bool = False) -> Example:
        """Token ids, labels and answer mask, each segment tokenized on its own (as at inference, see
        `encode_prompt`), so a prompt's tokens are exactly those the module was trained on."""
        segs = self.segments(conv, generation_prompt)
        ids: list[int] = []
        labels: list[int] = []
        answer: list[int] = []
        for text, is_answer in segs:
            piece = self.tokenizer(text, add_special_tokens=False).input_ids
            if is_answer and self.format in ("paper", "plain"):
                piece = piece + [self.tokenizer.eos_token_id]  # the model must learn to stop
            ids += piece
            labels += piece if (is_answer or self.loss_on == "all") else [IGNORE] * len(piece)
            answer += [int(is_answer)] * len(piece)
        return Example(ids, labels, conv.where, answer)


# -- dataset assembly -------------------------------------------------------------------------
@dataclass
class DataReport:
    rows: int = 0
    bad_rows: int = 0
    dropped_too_long: int = 0
    kept: int = 0
    train: int = 0
    validation: int = 0
    first_bad: list[str] = field(default_factory=list)
    systems: dict[str, int] = field(default_factory=dict)  # system prompt -> rows (None counted as "")

    def common_system(self) -> str | None:
        """The system prompt most rows use (what inference should default to), or None."""
        return max(self.systems, key=self.systems.get) or None if self.systems else None

    def summary(self) -> str:
        s = (f"{self.rows} rows: {self.kept} kept, {self.dropped_too_long} dropped as too long"
             f", {self.train} train / {self.validation} validation")
        if self.bad_rows:
            s += f"; {self.bad_rows} malformed rows skipped (first: {self.first_bad[0]})"
        return s


def load_examples(
    sources: str | Sequence[str],
    formatter: Formatter,
    *,
    max_length: int = 4096,
    skip_bad_rows: bool = False,
    split: str = "train",
) -> tuple[list[Example], DataReport]:
    """Parse, format and length-filter every row (examples over max_length are dropped, never truncated)."""
    report = DataReport()
    out: list[Example] = []
    for source in [sources] if isinstance(sources, str) else sources:
        for where, row in iter_rows(source, split):
            report.rows += 1
            try:
                conv = parse_row(row, where)
                ex = formatter.encode(conv)
            except DataError as e:
                if not skip_bad_rows:
                    raise
                report.bad_rows += 1
                if len(report.first_bad) < 5:
                    report.first_bad.append(str(e))
                continue
            if len(ex.input_ids) > max_length:
                report.dropped_too_long += 1
                continue
            system = conv.system if conv.system is not None else (formatter.system_prompt or "")
            report.systems[system] = report.systems.get(system, 0) + 1
            out.append(ex)
    report.kept = len(out)
    return out, report


def split_examples(
    examples: list[Example], val_fraction: float = 0.1, seed: int = 0, subset: float = 1.0
) -> tuple[list[Example], list[Example]]:
    """Deterministic subset + train/validation split from `seed`; drawn once, so no example is ever in both."""
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be in (0, 1], got {subset}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order = order[: max(1, round(len(order) * subset))] if examples else []
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) > 1:
        n_val = max(1, n_val)
    val, train = order[:n_val], order[n_val:]
    return [examples[i] for i in train], [examples[i] for i in val]


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (as transformers does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS as pad token (needed for padded batches)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Tensor]:
    """Dynamic padding (right side): pad to the longest row of the batch; labels of padding are -100."""
    T = max(len(e.input_ids) for e in examples)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    answer = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if e.answer:
            answer[i, :n] = torch.tensor(e.answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "answer_mask": answer}


def left_padded(prompts: Sequence[Example], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask and answer_mask [B, T] of prompts (see `encode_prompt`), padded on the left
    so every row's next token comes at the same position."""
    T = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, T - n:] = torch.tensor(p.input_ids)
        mask[i, T - n:] = 1
        if p.answer:
            answer[i, T - n:] = torch.tensor(p.answer)
    return ids, mask, answer


# -- prompts at inference ---------------------------------------------------------------------
def build_prompt(tokenizer: Any, fmt: str, question: str, history: Sequence[tuple[str, str]] = (),
                 system: str | None = None) -> str:
    """The prompt text for `question` after `history`, laid out as the module was trained.

    fmt: `paper`, `chat_template`, `plain` (history and question back to back), or `raw` (the question as is).
    """
    if fmt == "raw":
        return question
    if fmt == "plain":
        return "".join(text for _, text in history) + question
    if fmt == "paper":
        return paper_prompt(system, history, question)
    if fmt == "chat_template":
        msgs = [{"role": "system", "content": system or DEFAULT_SYSTEM_PROMPT}]
        msgs += [{"role": r, "content": t} for r, t in history] + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"prompt format must be raw, paper or chat_template, got {fmt!r}")


def encode_prompt(tokenizer: Any, fmt: str, question: str, history: Sequence[tuple[str, str]] = (),
                  system: str | None = None) -> Example:
    """The prompt for `question` after `history` as token ids with its answer mask (1 on history answers).

    Laid out and tokenized exactly as training encodes a conversation, so earlier answers are marked as
    answers (what prompt conditioning needs to read them as it was trained) and carry their EOS. `system`
    None means the format's default (the paper's system prompt); `raw` is the question as is.
    """
    if fmt == "raw":
        ids = tokenizer(question, add_special_tokens=False).input_ids
        return Example(ids, [IGNORE] * len(ids), "", [0] * len(ids))
    formatter = Formatter(tokenizer, fmt, "assistant", system if system is not None else DEFAULT_SYSTEM_PROMPT)
    ex = formatter.encode(Conversation(system, [*history, ("user", question)]), generation_prompt=True)
    return Example(ex.input_ids, [IGNORE] * len(ex.input_ids), "", ex.answer)


def default_stop_strings(tokenizer: Any, fmt: str) -> list[str]:
    """What ends an answer: the paper's closing marker, or the chat template's end of turn."""
    if fmt == "paper":
        return ["<|end_of_solution|>"]
    if fmt == "chat_template":
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
        tail = tokenizer.apply_chat_template(msgs, tokenize=False).split("ANSWER", 1)[1].strip()
        return [tail] if tail else []
    return []


def pack_indices(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy packing in the given order: consecutive items share a row while their lengths fit max_length."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if rows and used + n <= max_length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, Tensor]:
    """Like `collate`, but each row holds several examples; attention_mask numbers them 1, 2, ...
    (the segment-id convention of `llm_modules.masks`).

    The first token of each example is never a target (it would be predicted from the previous example).
    """
    flat = [Example(sum((e.input_ids for e in r), []), sum(([IGNORE] + e.labels[1:] for e in r), []), "",
                    sum((e.answer or [0] * len(e.input_ids) for e in r), [])) for r in rows]
    batch = collate(flat, pad_id)
    for i, r in enumerate(rows):
        pos = 0
        for j, e in enumerate(r, 1):
            batch["attention_mask"][i, pos : pos + len(e.input_ids)] = j
            pos += len(e.input_ids)
    return batch
