"""`llm-modules` command line: one verb per job, each mapped to a function."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

PAPER_LARGE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)
PAPER_SMALL = dict(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048, vocab_size=50257,
                   attention_types=[[["global", "local"], 6]])
PAPER_TOKENIZER_LEN = 151646


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# -- info -----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer, GPTNeoConfig, Qwen2Config

    from .info import format_counts, module_from_configs, parameter_counts
    from .model import CONFIG_NAME
    from .config import ModuleConfig
    from .model import trunk_from_config_dict

    if args.model:
        cfg = ModuleConfig.load(os.path.join(args.model, CONFIG_NAME))
        large = AutoConfig.from_pretrained(args.large or cfg.large_model)
        small = trunk_from_config_dict(cfg.small_config).config
        vocab = cfg.vocab_size
        kw = dict(num_layers=cfg.num_layers, num_heads=cfg.num_heads, adapter_dim=cfg.adapter_dim,
                  intermediate_dim=cfg.intermediate_dim)
        title = f"{args.model} (source: {args.large or cfg.large_model})"
    elif args.preset == "paper":
        large, small, vocab, kw = Qwen2Config(**PAPER_LARGE), GPTNeoConfig(**PAPER_SMALL), PAPER_TOKENIZER_LEN, {}
        title = "paper pair: Qwen2-1.5B + GPT-Neo-125M (built-in configs)"
    elif args.large and args.small:
        large, small = AutoConfig.from_pretrained(args.large), AutoConfig.from_pretrained(args.small)
        vocab = args.vocab_size or len(AutoTokenizer.from_pretrained(args.large))
        kw = dict(num_layers=args.num_layers, num_heads=args.num_heads, adapter_dim=args.adapter_dim)
        title = f"{args.large} + {args.small}"
    else:
        raise ValueError("give --model DIR, --preset paper, or both --large and --small")
    counts = parameter_counts(module_from_configs(large, small, vocab, **kw))
    print(title)
    print(format_counts(counts))


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts per part (from configs alone: nothing is loaded)",
                       description="Print parameter counts per part: frozen source, bridge (and its parts), small "
                                   "trunk, head, trained and run at inference. Built on the meta device: no weights are read.")
    p.add_argument("--model", help="a saved llm-modules folder")
    p.add_argument("--preset", choices=["paper"], help="the paper's pair (Qwen2-1.5B + GPT-Neo-125M), offline")
    p.add_argument("--large", help="knowledge source id or path (config and tokenizer are read)")
    p.add_argument("--small", help="small model id or path (config is read)")
    p.add_argument("--vocab-size", type=int, help="head size (default: len of the large tokenizer)")
    p.add_argument("--num-layers", type=int, default=2, help="enhanced cross-attention layers (default 2)")
    p.add_argument("--num-heads", type=int, default=8, help="bridge heads (default 8)")
    p.add_argument("--adapter-dim", type=int, default=256, help="adapter width (default 256)")
    p.set_defaults(func=cmd_info)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-modules",
        description="LLM Modules: a frozen large LM as knowledge source, a small LM as generation module, "
                    "joined by Enhanced Cross-Attention (arXiv 2502.08213).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        if os.environ.get("LLM_MODULES_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llm-modules {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
