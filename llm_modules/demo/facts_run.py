"""`llm-modules demo --world facts`: the real-facts benchmark (see llm_modules.demo.facts), every system
trained through the project's Trainer, several seeds, report.md + results.json."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import GPTNeoConfig

from ..data import Formatter, parse_row
from ..info import per_token_parameters
from ..io import atomic_write_text
from ..model import LLMModule
from ..knowledge_source import load_causal_lm, load_tokenizer
from ..training.recipe import TrainConfig
from ..training.trainer import Trainer
from ..inference.calibrate import calibrate_entropy, write_counting_reads
from .facts import (LOSS_KINDS, PACKAGED, PACKAGED_KINDS, RELATION_VAL_FRACTION, FactSplit, RealFact, complete,
                    load_fact_files, lost_facts, normalise, probe_source, relation_folds, score, split_by_entity,
                    split_by_relation, states_answer, wilson)
from .long_answers import SENTENCES, answers_part, long_answers, slot_text, write_paragraphs
from .run import fit_causal_lm

Log = Callable[[str], None]
MODULE_PAPER, MODULE_KNOWLEDGE = "LLM Module, paper design", "LLM Module + knowledge path"
SMALL, KD, KD_TRANSFER, SOURCE = "small alone", "distilled from the source", "distilled + test prompts", "source alone"
SOURCE_CUE = "source alone, bare cue (100% by selection)"
# Ablation: which of the two changes moves the knowledge.
PAPER_KD, KNOWLEDGE_NO_KD = "LLM Module, paper design + distillation", "LLM Module + knowledge path, no distillation"
ABLATION = (PAPER_KD, KNOWLEDGE_NO_KD)
# Fast mode (prompt conditioning): the source reads the question only; the small part writes the answer, reading the
# source's predictions over the prompt through the knowledge lookup.
MODULE_FAST = "LLM Module + knowledge lookup, prompt conditioning"
# ... and the source catching up on the answer where the module is unsure (ModuleConfig.source_adaptive): what a
# fact of a kind never trained on needs once its answer runs past the tokens the source has read.
MODULE_FAST_ADAPTIVE = "LLM Module + knowledge lookup, prompt conditioning, adaptive source reads"
# name -> (knowledge path, distillation weight (None: the config's), conditioning)
MODULES = {MODULE_PAPER: ("none", 0.0, "token"), MODULE_KNOWLEDGE: ("logits", None, "token"),
           MODULE_FAST: ("lookup", None, "prompt"), PAPER_KD: ("none", None, "token"),
           KNOWLEDGE_NO_KD: ("logits", 0.0, "token")}


@dataclass
class FactsConfig:
    """The real-facts benchmark; defaults run one seed in about 11 minutes on 2 CPU cores."""

    out: str = "demo_out/facts"
    source: str | None = None
    """Knowledge source (folder, hub id or .gguf); default: SmolLM2-135M-Instruct via `llm-modules fetch-source`."""
    facts: str | None = None
    """JSONL of facts (entity, relation, cue, answer, optional question); default: the packaged 658 facts (entity
    split), those and the 445 of ten more kinds (relation split)."""
    seeds: tuple[int, ...] = (0,)
    split: str = "entity"
    """`entity`: test entities never trained on, the relations all trained. `relation`: test relations never trained
    on (rotated over `relation_folds` folds, so every relation is tested once)."""
    relation_folds: int = 2
    small_hidden: int = 128
    small_layers: int = 2
    epochs: int = 25
    batch_size: int = 16
    lr: float = 1e-3
    distill_weight: float = 1.0
    """Knowledge-path module: weight of KL(source || module) at every position."""
    source_dtype: str = "float32"
    answer_source_tokens: int = 1
    """Prompt-conditioned module: answer tokens the source also reads (see ModuleConfig.answer_source_tokens). One
    lets the source pick the start of a multi-token answer and its continuation (0: 71.5%, with the knowledge path
    instead of the lookup, against 85.6% for token conditioning over 3 seeds; 1: 81.6%, see the README)."""
    source_every: int = 0
    """Prompt-conditioned module: the source catches up on the answer every K tokens (ModuleConfig.source_every)."""
    max_new_tokens: int = 8
    progress: bool = True
    systems: tuple[str, ...] = (MODULE_PAPER, MODULE_KNOWLEDGE, MODULE_FAST, SMALL, KD, KD_TRANSFER, SOURCE)
    long_answers: bool = False
    """Long answers with facts in the middle (llm_modules.demo.long_answers) instead of one fact per answer: the
    systems are LONG_SYSTEMS plus fast mode catching up every K tokens for K in `long_every`."""
    long_every: tuple[int, ...] = (4, 8)
    long_adaptive: tuple[float, ...] = (3.0, 4.0, 5.0)
    """Long answers: fast mode with the adaptive schedule (ModuleConfig.source_adaptive), one module decoded at each
    of these entropy thresholds (nats)..."""
    long_max_gaps: tuple[int, ...] = (0, 8)
    """... and each of these bounds on how far the source may lag (ModuleConfig.source_max_gap; 0: none)."""
    long_budgets: tuple[float, ...] = (0.1, 0.2)
    """Long answers: the same adaptive module with its threshold calibrated on the validation entities' questions
    (`inference.calibrate`) to spend each of these shares of answer tokens on source reads."""
    calibration_prompts: int = 8
    calibration_steps: int = 6
    adaptive_rate: float = 0.25
    """The adaptive module's training catch-up rate (ModuleConfig.source_adaptive)."""
    adaptive_entropy: float = 1.0
    """One fact per answer: the entropy (nats) over which the adaptive module's source catches up."""
    adaptive_knowledge: str = "lookup"
    """The adaptive module's knowledge path: `logits` adds the source's own prediction where it caught up (what token
    conditioning adds everywhere); `lookup` attends over every position read for it."""
    long_epochs: int = 40
    long_max_new_tokens: int = 72


# Long answers: every slot's value must come from the source while the answer is written.
LONG_SYSTEMS = (MODULE_KNOWLEDGE, MODULE_FAST, SMALL, KD, SOURCE)


def every_name(k: int) -> str:
    return f"{MODULE_FAST}, source every {k} answer tokens"


def adaptive_name(nats: float, max_gap: int = 0) -> str:
    gap = f", at most {max_gap} tokens behind" if max_gap else ""
    return f"LLM Module, prompt conditioning, adaptive source reads (entropy over {nats:g} nats{gap})"


def budget_name(budget: float) -> str:
    return f"LLM Module, prompt conditioning, adaptive source reads calibrated to {budget:.0%} of answer tokens"


def adaptive_settings(cfg: "FactsConfig") -> list[tuple[float, int]]:
    """(threshold, max gap) of each adaptive system, in the report's order."""
    return [(t, g) for g in cfg.long_max_gaps for t in cfg.long_adaptive]


ADAPTIVE_RUN = "adaptive"  # the folder of the one adaptive module every threshold decodes


def long_systems(every: Sequence[int], adaptive: Sequence[tuple[float, int]] = (),
                 budgets: Sequence[float] = ()) -> tuple[str, ...]:
    """The long-answer systems: token conditioning, fast mode, fast mode catching up every K and adaptively (at each
    (threshold, max gap), then at each calibrated read budget), the baselines."""
    return (*LONG_SYSTEMS[:2], *(every_name(k) for k in every), *(adaptive_name(t, g) for t, g in adaptive),
            *(budget_name(b) for b in budgets), *LONG_SYSTEMS[2:])


def module_spec(name: str, cfg: "FactsConfig") -> tuple[str, float, str, int, float] | None:
    """(knowledge path, distillation weight, conditioning, source_every, source_adaptive) of a module system, None
    for the others."""
    for k in cfg.long_every:
        if name == every_name(k):
            return "lookup", cfg.distill_weight, "prompt", k, 0.0
    if (any(name == adaptive_name(t, g) for t, g in adaptive_settings(cfg)) or budget_of(name, cfg) is not None
            or name == MODULE_FAST_ADAPTIVE):
        return cfg.adaptive_knowledge, cfg.distill_weight, "prompt", 0, cfg.adaptive_rate
    if name not in MODULES:
        return None
    knowledge, distill, conditioning = MODULES[name]
    return (knowledge, cfg.distill_weight if distill is None else distill, conditioning,
            cfg.source_every if conditioning == "prompt" else 0, 0.0)


def budget_of(name: str, cfg: "FactsConfig") -> float | None:
    """The read budget a calibrated adaptive system spends (None for the others)."""
    return next((b for b in cfg.long_budgets if name == budget_name(b)), None)


def threshold_of(name: str, cfg: "FactsConfig") -> tuple[float | None, int | None]:
    """(entropy threshold, max gap) an adaptive system decodes at ((None, None) for the others)."""
    return next(((t, g) for t, g in adaptive_settings(cfg) if name == adaptive_name(t, g)), (None, None))


def _rows_file(path: Path, facts: Sequence[RealFact]) -> str:
    atomic_write_text(path, "".join(json.dumps(f.row()) + "\n" for f in facts))
    return str(path)


def small_config(cfg: FactsConfig, vocab_size: int, eos: int | None = None) -> GPTNeoConfig:
    """The small model: a GPT-Neo trained from scratch, so it knows no facts of its own."""
    return GPTNeoConfig(vocab_size=vocab_size, hidden_size=cfg.small_hidden, num_layers=cfg.small_layers,
                        num_heads=max(1, cfg.small_hidden // 32), attention_types=[[["global"], cfg.small_layers]],
                        max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos)


def _small_config_dir(cfg: FactsConfig, out: Path) -> str:
    """The trunk's config as a folder (its token embeddings are never used: vocabulary 8)."""
    folder = out / "small_config"
    small_config(cfg, 8).save_pretrained(str(folder))
    return str(folder)


def train_module(cfg: FactsConfig, source: str, small: str, data: Path, run: Path, seed: int, knowledge: str,
                 distill: float, conditioning: str = "token", every: int = 0, adaptive: float = 0.0,
                 epochs: int | None = None) -> LLMModule:
    """One LLM Module on the split's training facts, best checkpoint on the validation entities."""
    recipe = dict(large_model=source, small_model=small, init_small="scratch", source_dtype=cfg.source_dtype,
                  num_heads=4, adapter_dim=64, dropout=0.0, format="plain", data=str(data / "train.jsonl"),
                  val_data=str(data / "val.jsonl"), seed=seed, epochs=epochs or cfg.epochs, batch_size=cfg.batch_size,
                  lr_bridge=cfg.lr, lr_small=cfg.lr, warmup_steps=10, output_dir=str(run), progress=cfg.progress,
                  tensorboard=False, patience=0, max_length=160, feature_cache=True,
                  # A lookup module's cache also holds the source's top-k tables: its own folder, so the systems do
                  # not rebuild one shared cache in turn.
                  cache_dir=str(data.parent.parent / ("features-lookup" if knowledge == "lookup" else "features")))
    recipe.update(knowledge_path=knowledge, distill_weight=distill, conditioning=conditioning,
                  answer_source_tokens=cfg.answer_source_tokens if conditioning == "prompt" else 0,
                  source_every=every, source_adaptive=adaptive, source_entropy=cfg.adaptive_entropy)
    desc = (("paper" if knowledge == "none" else knowledge) + ("+kd" if distill else "") + f" {conditioning}"
            + (f"/{every}" if every else "") + ("/adaptive" if adaptive else "") + f" s{seed}")
    Trainer(TrainConfig.from_dict(recipe), log=lambda s: None, desc=desc).fit()
    return LLMModule.from_pretrained(run / "best", large_model=source).eval()


def train_small(cfg: FactsConfig, tok: Any, rows: Sequence[dict], run: Path, seed: int, desc: str,
                teacher: Any = None, epochs: int | None = None) -> Any:
    """The small model alone (GPT-Neo from scratch over the source's vocabulary), optionally distilled."""
    from transformers import AutoModelForCausalLM

    fmt = Formatter(tok, "plain", "assistant")
    examples = [fmt.encode(parse_row(r, "task")) for r in rows]
    torch.manual_seed(seed)
    small = AutoModelForCausalLM.from_config(small_config(cfg, len(tok), tok.eos_token_id))
    fit_causal_lm(small, tok, examples, run, epochs=epochs or cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                  desc=desc, progress=cfg.progress, teacher=teacher, kd_temperature=2.0, kd_alpha=0.5)
    return small


def run_seed(cfg: FactsConfig, seed: int, split: FactSplit, source_ref: str, source_lm: Any, tok: Any,
             out: Path, log: Log, root: Path | None = None) -> dict[str, Any]:
    """Every system on one split: {system: score dict}; trained in `root` (default out/seed<seed>)."""
    root = root or out / f"seed{seed}"
    data = root / "data"
    _rows_file(data / "train.jsonl", split.train)
    _rows_file(data / "val.jsonl", split.val)
    small_cfg = _small_config_dir(cfg, out)
    prompts = [f.prompt() for f in split.test]
    got: dict[str, Any] = {}

    def record(name: str, completions: list[str], seconds: float) -> None:
        got[name] = score(split.test, completions, split.unseen) | {"seconds": seconds}
        got[name]["answers"] = [{"entity": f.entity, "relation": f.relation, "gold": f.answer, "got": c.split("\n")[0],
                                 "unseen": f in split.unseen} for f, c in zip(split.test, completions)]
        s = got[name]
        log(f"  seed {seed} {name}: test EM {s['all']['em']:.1%}, unseen answers {_pct(s['unseen']['em'])}, "
            f"seen {_pct(s['seen']['em'])} ({seconds:.0f} s)")

    train_rows = [f.row() for f in split.train]
    for name in cfg.systems:
        t, reads = time.perf_counter(), None
        if (spec := module_spec(name, cfg)) is not None:
            model = train_module(cfg, source_ref, small_cfg, data, root / _slug(name), seed, *spec)
        elif name == SMALL:
            model = train_small(cfg, tok, train_rows, root / "small", seed, "small")
        elif name == KD:
            model = train_small(cfg, tok, train_rows, root / "kd", seed, "distil", teacher=source_lm)
        elif name == KD_TRANSFER:
            # What distillation can do with teacher queries: the source answers the test prompts, unlabeled.
            answers = complete(source_lm, tok, prompts, cfg.max_new_tokens)
            extra = [{"conversations": [{"from": "user", "value": p}, {"from": "assistant", "value": a.split("\n")[0]}]}
                     for p, a in zip(prompts, answers) if a.split("\n")[0].strip()]
            model = train_small(cfg, tok, train_rows + extra, root / "kd_transfer", seed, "distil+", teacher=source_lm)
        else:
            model = source_lm
        if spec is not None and spec[4]:  # adaptive: one answer at a time, counting the source's catch-ups
            completions, reads, _ = write_counting_reads(model, prompts, cfg.max_new_tokens)
        else:
            completions = complete(model, tok, prompts, cfg.max_new_tokens)
        record(name, completions, time.perf_counter() - t)
        got[name]["source_reads_per_token"] = reads
        _costs(got[name], model)
    if SOURCE in got:  # what each system loses of what the source states on the same prompts, and how
        targets = {normalise(f.answer) for f in split.train}
        source = [a["got"] for a in got[SOURCE]["answers"]]
        for name in got:
            got[name]["lost"] = lost_facts(split.test, [a["got"] for a in got[name]["answers"]], source, targets)
    if SOURCE in cfg.systems:  # the selection itself: the bare cue, which the source states by construction
        record(SOURCE_CUE, complete(source_lm, tok, [f.cue for f in split.test], cfg.max_new_tokens), 0.0)
        got[SOURCE_CUE]["per_token"] = per_token_parameters(source_lm)
    return got


def run_relation_seed(cfg: FactsConfig, seed: int, facts: Sequence[RealFact], folds: Sequence[Sequence[str]],
                      source_ref: str, source_lm: Any, tok: Any, out: Path, log: Log) -> dict[str, Any]:
    """Every system on each fold of the relation split (its relations held out of training), scored over all folds:
    every relation is tested once, by systems that never trained on it."""
    splits, per_fold = [], []
    for i, held in enumerate(folds):
        split = split_by_relation(facts, held, seed)
        log(f"seed {seed} fold {i}: held out {', '.join(held)}; {len(split.train)} train / {len(split.val)} validation "
            f"facts of the other relations, {len(split.test)} test facts")
        splits.append(split)
        per_fold.append(run_seed(cfg, seed, split, source_ref, source_lm, tok, out, log, out / f"seed{seed}" / f"fold{i}"))
    test = [f for sp in splits for f in sp.test]
    unseen = set().union(*(sp.unseen for sp in splits))
    got: dict[str, Any] = {}
    for name in per_fold[0]:
        answers = [a for r in per_fold for a in r[name]["answers"]]
        got[name] = {**per_fold[0][name], **score(test, [a["got"] for a in answers], unseen), "answers": answers,
                     "seconds": sum(r[name]["seconds"] for r in per_fold)}
        reads = [r[name].get("source_reads_per_token") for r in per_fold]
        got[name]["source_reads_per_token"] = None if None in reads else sum(reads) / len(reads)
        if "lost" in per_fold[0][name]:
            got[name]["lost"] = {k: sum(r[name]["lost"][k] for r in per_fold) for k in per_fold[0][name]["lost"]}
        s = got[name]
        log(f"  seed {seed} {name}, all folds: test EM {s['all']['em']:.1%}, unseen answers {_pct(s['unseen']['em'])}")
    return got


def run_long_seed(cfg: FactsConfig, seed: int, facts: Sequence[RealFact], known: set[RealFact], source_ref: str,
                  source_lm: Any, tok: Any, out: Path, log: Log) -> dict[str, Any]:
    """Every system on one entity split of the long answers: {system: slot scores + whole answers}."""
    paragraphs = {a.entity: a for a in long_answers(facts)}
    split = split_by_entity([f for a in paragraphs.values() for f in a.facts], seed)
    train, val, test = ([paragraphs[e] for e in sorted({f.entity for f in part}, key=list(paragraphs).index)]
                        for part in (split.train, split.val, split.test))
    root = out / f"seed{seed}"
    data = root / "data"
    for name, part in (("train", train), ("val", val)):
        atomic_write_text(data / f"{name}.jsonl", "".join(json.dumps(a.row()) + "\n" for a in part))
    pairs = [(a, f) for a in test for f in a.facts if f in known]  # only what the source states on its bare cue
    slots = [f for _, f in pairs]
    targets = {normalise(f.answer) for a in train for f in a.facts}
    unseen = {f for f in slots if normalise(f.answer) not in targets}
    log(f"seed {seed}: long answers of {len(train)} train / {len(val)} validation / {len(test)} test entities; "
        f"{len(slots)} test slots the source states ({len(unseen)} whose value was never a training target)")
    small_cfg, got, written, modules, thresholds = _small_config_dir(cfg, out), {}, {}, {}, {}
    for name in cfg.systems:
        t, reads = time.perf_counter(), None
        if name == SOURCE:  # what the source knows there: the paragraph given up to each slot
            texts = complete(source_lm, tok, [a.question() + a.prefix(f) for a, f in pairs], cfg.max_new_tokens)
            model, by_slot = source_lm, dict(zip(slots, texts))
        else:
            questions = [a.question() for a in test]
            if (spec := module_spec(name, cfg)) is not None:
                if spec not in modules:  # the adaptive thresholds decode one module
                    run = root / _slug(ADAPTIVE_RUN if spec[4] else name)
                    modules[spec] = train_module(cfg, source_ref, small_cfg, data, run, seed, *spec,
                                                 epochs=cfg.long_epochs)
                model, nats = modules[spec], threshold_of(name, cfg)
                if (budget := budget_of(name, cfg)) is not None:
                    nats = thresholds[name] = calibrated(cfg, model, [a.question() for a in val], budget, log), None
                paragraphs_out, reads, _ = write_paragraphs(model, questions, cfg.long_max_new_tokens, *nats)
            else:
                model = train_small(cfg, tok, [a.row() for a in train], root / _slug(name), seed, name,
                                    teacher=source_lm if name == KD else None, epochs=cfg.long_epochs)
                paragraphs_out = complete(model, tok, questions, cfg.long_max_new_tokens)
            written[name] = dict(zip([a.entity for a in test], paragraphs_out))
            by_slot = {f: slot_text(written[name][a.entity], f) for a, f in pairs}
        got[name] = score(slots, [by_slot[f] for f in slots], unseen) | {
            "seconds": time.perf_counter() - t, "source_reads_per_token": reads,
            **({"source_entropy": thresholds[name][0]} if name in thresholds else {})}
        got[name]["whole answers"] = answers_part(test, {f: states_answer(by_slot[f], f.answer) for f in slots})
        _costs(got[name], model)
        s = got[name]
        log(f"  seed {seed} {name}: slots {s['all']['em']:.1%}, unseen {_pct(s['unseen']['em'])}, whole answers "
            f"{_pct(s['whole answers']['em'])}" + (f", {reads:.3f} source forwards per answer token" if reads is not None
                                                   else "") + f" ({s['seconds']:.0f} s)")
    atomic_write_text(root / "paragraphs.json", json.dumps(written, indent=1))  # what each system wrote
    return got


def calibrated(cfg: FactsConfig, model: LLMModule, questions: Sequence[str], budget: float, log: Log) -> float:
    """The entropy threshold at which `model` spends `budget` of its answer tokens on source reads, measured on the
    first `cfg.calibration_prompts` validation questions."""
    cal = calibrate_entropy(model, questions[:cfg.calibration_prompts], budget, cfg.long_max_new_tokens,
                            cfg.calibration_steps)
    log(f"  calibrated to {budget:.0%} source reads: {cal.threshold:.2f} nats ({cal.reads_per_token:.3f} reads per "
        f"token on {min(len(questions), cfg.calibration_prompts)} validation questions)")
    return cal.threshold


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _costs(row: dict[str, Any], model: Any) -> None:
    """What a system runs per new token, and how often its source reads the answer."""
    row["per_token"] = per_token_parameters(model)
    if isinstance(model, LLMModule) and model.config.conditioning == "prompt":
        row["answer_source_tokens"] = model.config.answer_source_tokens
        row["source_every"] = model.config.source_every
        row["source_adaptive"] = model.config.source_adaptive


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def run_facts(cfg: FactsConfig, log: Log = print) -> dict[str, Any]:
    from ..fetch_source import fetch_source
    from ..knowledge_source import KnowledgeSource

    if cfg.split not in ("entity", "relation"):
        raise ValueError(f"split must be entity or relation, not {cfg.split!r}")
    if cfg.split == "relation" and cfg.long_answers:
        raise ValueError("long answers are split by entity (their paragraphs state every relation)")
    if cfg.split == "relation" and cfg.relation_folds < 2:
        raise ValueError(f"relation split: {cfg.relation_folds} folds; it needs 2 or more")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source_ref = cfg.source or str(fetch_source("smollm2", log=log))
    facts = load_fact_files([cfg.facts] if cfg.facts else [PACKAGED, *([PACKAGED_KINDS] if cfg.split == "relation" else [])])
    tok = load_tokenizer(source_ref)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    source_lm = load_causal_lm(source_ref, cfg.source_dtype).eval()
    fp = KnowledgeSource(source_lm, source_ref).fingerprint()["weights_sha256"]
    known = probe_source(source_lm, tok, facts, out / "probe.json", fp, log)
    kept = [f for f, k in zip(facts, known) if k]
    by_rel = {r: (sum(k for f, k in zip(facts, known) if f.relation == r), sum(f.relation == r for f in facts))
              for r in sorted({f.relation for f in facts})}
    log(f"the source states {len(kept)} of {len(facts)} facts: "
        + ", ".join(f"{r} {k}/{n}" for r, (k, n) in by_rel.items()))
    if len({f.entity for f in kept}) < 4:
        raise ValueError("the source states too few facts to split by entity (need facts about 4+ entities)")
    folds = relation_folds(kept, cfg.relation_folds) if cfg.split == "relation" else []
    runs = {}
    for seed in cfg.seeds:
        if folds:
            runs[seed] = run_relation_seed(cfg, seed, kept, folds, source_ref, source_lm, tok, out, log)
            continue
        if cfg.long_answers:
            runs[seed] = run_long_seed(cfg, seed, facts, set(kept), source_ref, source_lm, tok, out, log)
            continue
        split = split_by_entity(kept, seed)
        log(f"seed {seed}: {len(split.train)} train / {len(split.val)} validation / {len(split.test)} test facts "
            f"({len(split.unseen)} test answers never a training target)")
        runs[seed] = run_seed(cfg, seed, split, source_ref, source_lm, tok, out, log)
    summary = {"config": dataclasses.asdict(cfg), "source": source_ref, "probe": by_rel, "kept": len(kept), "folds": folds,
               "runs": {str(s): r for s, r in runs.items()}, "seconds": time.perf_counter() - t0}
    summary["table"] = aggregate(runs)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "report.md", facts_report(summary))
    plot_facts(summary["table"], out / "accuracy.png", len(cfg.seeds), cfg.long_answers)
    if cfg.long_answers:
        plot_reads(summary["table"], out / "quality_cost.png", len(cfg.seeds))
    log(f"report: {out / 'report.md'}; total {summary['seconds']:.0f} s")
    return summary


def aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system and part (all, unseen, seen, each relation): mean, min and max over seeds, pooled Wilson 95% CI."""
    table: dict[str, dict[str, Any]] = {}
    for name in next(iter(runs.values())):
        parts: dict[str, list[dict[str, Any]]] = {}
        for r in runs.values():
            s = r[name]
            for part, v in [("all", s["all"]), ("unseen", s["unseen"]), ("seen", s["seen"]),
                            *([("whole answers", s["whole answers"])] if "whole answers" in s else []),
                            *[(f"relation: {k}", v) for k, v in s["relations"].items()]]:
                parts.setdefault(part, []).append(v)
        table[name] = {}
        for part, vs in parts.items():
            ems = [v["em"] for v in vs if v["em"] is not None]
            hits, n = sum(v["hits"] for v in vs), sum(v["n"] for v in vs)
            table[name][part] = {"mean": statistics.mean(ems) if ems else None, "min": min(ems, default=None),
                                 "max": max(ems, default=None), "n": n, "ci95": wilson(hits, n)}
        first = next(iter(runs.values()))[name]
        table[name]["per_token"] = first.get("per_token")
        table[name]["answer_source_tokens"] = first.get("answer_source_tokens")
        table[name]["source_every"] = first.get("source_every")
        table[name]["source_adaptive"] = first.get("source_adaptive")
        if all("lost" in r[name] for r in runs.values()):  # counts summed over seeds
            table[name]["lost"] = {k: sum(r[name]["lost"][k] for r in runs.values()) for k in first["lost"]}
        if all("source_entropy" in r[name] for r in runs.values()):  # calibrated per seed
            table[name]["source_entropy"] = [r[name]["source_entropy"] for r in runs.values()]
        reads = [r[name]["source_reads_per_token"] for r in runs.values() if r[name].get("source_reads_per_token") is not None]
        table[name]["source_reads_per_token"] = statistics.mean(reads) if reads else None
        ratios = [r[name]["all"]["em"] / r[SOURCE]["all"]["em"] for r in runs.values()
                  if SOURCE in r and r[SOURCE]["all"]["em"] and r[name]["all"]["em"] is not None]
        if ratios and len(ratios) == len(runs):  # per seed: this system's EM over the source's on the same prompts
            table[name]["vs_source"] = {"mean": statistics.mean(ratios), "min": min(ratios), "max": max(ratios)}
    return table


def plot_facts(table: dict[str, dict[str, Any]], path: Path, n_seeds: int, long: bool = False) -> None:
    """Per system: test EM on all test facts and on unseen answers (long answers: slots right, values never trained
    on, whole answers); mean bars, with min-max whiskers over several seeds."""
    from .plots import Series, plot_bars

    names = list(table)
    parts = ((("all", "slots right"), ("unseen", "values never trained on"), ("whole answers", "whole answers"))
             if long else (("all", "all test facts"), ("unseen", "answers never trained on")))
    spread = n_seeds > 1
    series = [Series(label, [table[n][part]["mean"] for n in names],
                     [table[n][part]["min"] for n in names] if spread else None,
                     [table[n][part]["max"] for n in names] if spread else None) for part, label in parts]
    plot_bars(path, names, series, f"exact match (mean, min-max over {n_seeds} seeds)" if spread else "exact match")


def plot_reads(table: dict[str, dict[str, Any]], path: Path, n_seeds: int) -> None:
    """Long answers: slots right against the source's forwards per answer token, one point per LLM Module."""
    from .plots import Point, plot_tradeoff

    spread = n_seeds > 1
    points = [Point(name, t["source_reads_per_token"], t["all"]["mean"], t["all"]["min"] if spread else None,
                    t["all"]["max"] if spread else None)
              for name, t in table.items() if t.get("source_reads_per_token") is not None]
    plot_tradeoff(path, points, "source forwards per answer token (measured while writing)",
                  f"slots right (mean{', min-max over ' + str(n_seeds) + ' seeds' if spread else ''})")


def _cell(c: dict[str, Any]) -> str:
    if c["mean"] is None:
        return "n/a"
    spread = f" ({c['min']:.0%}-{c['max']:.0%})" if c["max"] != c["min"] else ""
    return f"{c['mean']:.1%}{spread} [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}]"


def _split_text(summary: dict[str, Any]) -> str:
    if not summary.get("folds"):
        return "Split by entity (train / validation / test): test entities never trained on, every relation trained."
    folds = "; ".join(f"fold {i}: " + ", ".join(g) for i, g in enumerate(summary["folds"]))
    return (f"Split by relation: each relation is held out of training in one of {len(summary['folds'])} folds "
            f"({folds}) and tested there; the other relations' facts train the systems (validation: "
            f"{RELATION_VAL_FRACTION:.0%} of their entities). Every system is retrained per fold.")


def _ratio(r: dict[str, float] | None) -> str:
    if r is None:
        return "n/a"
    return f"{r['mean']:.2f}x" + (f" ({r['min']:.2f}-{r['max']:.2f})" if r["max"] != r["min"] else "")


def _lost_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """Where each system loses the facts the source alone states on the same prompts (all seeds together)."""
    rows = [(n, t["lost"]) for n, t in table.items() if t.get("lost") and n != SOURCE]
    if not rows:
        return []
    lines = ["", "## Where systems lose what the source states", "",
             "Test facts the source alone states on the same prompt, and why a system does not (all seeds together): "
             "'stopped early', its answer is a proper start of the right one (\"Reyk\" for Reykjavik); 'a training "
             "answer', it answers with one of its training targets; 'other', anything else.", "",
             "| system | source states | kept | " + " | ".join(LOSS_KINDS) + " |", "|---|---:|---:|" + "---:|" * len(LOSS_KINDS)]
    for name, lost in rows:
        kept = lost["source states"] - sum(lost[k] for k in LOSS_KINDS)
        lines.append(f"| {name} | {lost['source states']} | {kept} | " + " | ".join(str(lost[k]) for k in LOSS_KINDS) + " |")
    return lines


def facts_report(summary: dict[str, Any]) -> str:
    table, seeds = summary["table"], summary["config"]["seeds"]
    long = summary["config"].get("long_answers")
    parts = ["all", "unseen", "seen", *(["whole answers"] if long else [])]
    relations = sorted({p for t in table.values() for p in t if p.startswith("relation: ")})
    lines = ["# Real facts: knowledge transfer from a pretrained source", "",
             f"Source: `{summary['source']}`; it states {summary['kept']} of the facts when given their cue "
             "(probe per relation: " + ", ".join(f"{r} {k}/{n}" for r, (k, n) in summary["probe"].items()) + "). "
             + _split_text(summary) + f" Seeds {', '.join(map(str, seeds))}. Cells: mean over "
             "seeds (min-max) [Wilson 95% interval over all seeds' test facts]. 'unseen': test facts whose answer "
             "is never a training target.", "",
             *([f"Long answers (`--long-answers`): one paragraph per test entity stating {len(SENTENCES)} facts, "
                "scored per slot (the value where the paragraph states it) and per whole answer (every counted slot "
                "right); the source alone is given the paragraph up to each slot.", ""] if long else []),
             "| system | " + ("slots right | unseen values | seen values | whole answers | source forwards per answer "
                                 "token" if long else "test EM | unseen answers | seen answers")
             + " | x the source alone | params run per new token |",
             "|---|---|---|---|" + ("---|---:|" if long else "") + "---:|---:|"]
    for name, t in table.items():
        cost = f"{t['per_token']:,}" if t.get("per_token") else "n/a"
        if t.get("answer_source_tokens"):
            cost += f" (+ the source on the first {t['answer_source_tokens']} answer token(s))"
        if t.get("source_every"):
            cost += f" (+ a source forward over every {t['source_every']} answer tokens)"
        if t.get("source_adaptive"):
            measured = t.get("source_reads_per_token")  # long answers: a column of its own
            cost += " (+ a source forward where the module is unsure" + (
                f": {measured:.2f} per answer token)" if measured is not None and not long else ")")
        if t.get("source_entropy"):
            cost += " (threshold " + " / ".join(f"{x:.2f}" for x in t["source_entropy"]) + " nats)"
        reads = [] if not long else ["n/a" if t.get("source_reads_per_token") is None
                                     else f"{t['source_reads_per_token']:.3f}"]
        lines.append(f"| {name} | " + " | ".join([*(_cell(t[p]) for p in parts), *reads, _ratio(t.get("vs_source"))])
                     + f" | {cost} |")
    lines += ["", f"## Per relation ({'slots right' if long else 'test EM'})", "", "| system | " + " | ".join(r[10:] for r in relations) + " |",
              "|---|" + "---|" * len(relations)]
    for name, t in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(t[r]) if r in t else "n/a" for r in relations) + " |")
    lines += _lost_lines(table)
    lines += ["", "![accuracy](accuracy.png)", *(["", "![quality against cost](quality_cost.png)"] if long else [])]
    return "\n".join(lines) + "\n"
