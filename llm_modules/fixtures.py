"""Tiny local models and a locally trained tokenizer, for tests, the demo and `tiny:NAME` recipe
values (nothing is downloaded). Imported by the demo (its tokenizer), and by `train` / `cache` only
to resolve `tiny:NAME` values in a recipe; the model, decoding and serving never import it, and no
default anywhere points at a fixture.

Everything is written with `save_pretrained` and read back with `from_pretrained(local_dir)`, the
same path users take with real hub models.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .io import atomic_dir, default_cache_dir

REASONING_TOKENS = ["<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"]
EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a of to and in is was for on with as by at from that this which it be are were has have "
    "city river colour red blue green yellow violet orange year number sum remainder divide add "
    "question answer think solve step first then therefore so because user assistant system "
    "founded lives works teacher baker pilot painter doctor farmer north south east west"
).split()


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with digits, for training the fixture tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2000)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with pad/eos, reasoning markers and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, PAD, *CHAT_TOKENS, *REASONING_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)
    fast.add_special_tokens({"additional_special_tokens": CHAT_TOKENS + REASONING_TOKENS})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 256):
    """A few-thousand-parameter config of a supported architecture."""
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=1,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
            bos_token_id=None, eos_token_id=0, pad_token_id=1,
        )
    if arch == "gpt_neo":
        types = [[["global", "local"], layers // 2]] if layers % 2 == 0 else [[["global"], layers]]
        return GPTNeoConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
            attention_types=types, max_position_embeddings=positions, window_size=16,
            bos_token_id=0, eos_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
            bos_token_id=0, eos_token_id=0,
        )
    raise ValueError(f"unknown architecture {arch!r} (qwen2, llama, gpt_neo, gpt2)")


def save_tiny_model(path: str | os.PathLike, config, seed: int = 0, tokenizer=None) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return str(path)


def make_fixtures(root: str | os.PathLike, vocab_size: int = 512) -> dict[str, str]:
    """Write a tokenizer and tiny large (qwen2, llama) and small (gpt_neo, gpt2, qwen2) models under `root`.

    Returns {name: path}; existing folders are reused.
    """
    root = Path(root)
    paths = {"tokenizer": str(root / "tokenizer")}
    if not (root / "tokenizer" / "tokenizer.json").exists():
        tok = train_tokenizer(sample_text(), vocab_size)
        with atomic_dir(root / "tokenizer") as tmp:
            tok.save_pretrained(str(tmp))
    tok = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"])
    V = len(tok)
    specs = {
        "large_qwen2": ("qwen2", dict(hidden=48, layers=2, heads=4), 1),
        "large_llama": ("llama", dict(hidden=48, layers=2, heads=4), 2),
        "small_gpt_neo": ("gpt_neo", dict(hidden=32, layers=2, heads=4), 3),
        "small_gpt2": ("gpt2", dict(hidden=32, layers=2, heads=4), 4),
        "small_qwen2": ("qwen2", dict(hidden=32, layers=2, heads=4), 5),
    }
    for name, (arch, kw, seed) in specs.items():
        p = root / name
        if not (p / "config.json").exists():
            # Large models carry the tokenizer, as real hub checkpoints do.
            save_tiny_model(p, tiny_config(arch, V, **kw), seed, tok if name.startswith("large") else None)
        paths[name] = str(p)
    return paths


def arith_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Bespoke-schema rows of small arithmetic questions answered in the paper's reasoning format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(1, 9)
        if rng.random() < 0.5:
            q, thought, ans = f"What is the sum of {a} and {b}?", f"{a} plus {b} is {a + b}.", a + b
        else:
            q, thought, ans = (f"Find the remainder by dividing {a} by {b}.",
                               f"{a} = {b} * {a // b} + {a % b}.", a % b)
        answer = (f"<|begin_of_thought|> {thought} <|end_of_thought|> "
                  f"<|begin_of_solution|> {ans} <|end_of_solution|>")
        rows.append({"system": "Answer briefly.", "conversations": [
            {"from": "user", "value": q}, {"from": "assistant", "value": answer}]})
    return rows


def resolve(value: str, root: str | os.PathLike | None = None) -> str:
    """`tiny:NAME` -> the path of a locally generated fixture (models, tokenizer, or `tiny:arith` data)."""
    if not isinstance(value, str) or not value.startswith("tiny:"):
        return value
    key = value[len("tiny:"):]
    root = Path(root) if root else default_cache_dir() / "fixtures"
    if key == "arith":
        import json

        path = root / "arith.jsonl"
        if not path.exists():
            from .io import atomic_write_text

            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in arith_rows()))
        return str(path)
    paths = make_fixtures(root)
    if key not in paths:
        raise ValueError(f"unknown fixture {value!r}; known: tiny:arith, " + ", ".join(f"tiny:{k}" for k in paths))
    return paths[key]


def resolve_recipe(cfg: Any) -> Any:
    """A TrainConfig whose `tiny:NAME` models and data are replaced by local fixture paths.

    Only the CLI and tests call this: library defaults never name a fixture.
    """
    m = cfg.module
    m.large_model, m.small_model = resolve(m.large_model), resolve(m.small_model) if m.small_model else m.small_model
    cfg.data = [resolve(d) for d in cfg.data] if isinstance(cfg.data, list) else resolve(cfg.data)
    if cfg.val_data:
        cfg.val_data = [resolve(d) for d in cfg.val_data] if isinstance(cfg.val_data, list) else resolve(cfg.val_data)
    return cfg
