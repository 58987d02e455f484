"""The built-in demo: a measurable knowledge-transfer experiment with the paper's baselines.

1. Generate a knowledge world (llm_modules.demo.world) from a seed.
2. Pretrain a small "large" model (Qwen2 architecture) on the source corpus until it knows the
   facts, and a small model (GPT-Neo architecture) on general text without them. Both are cached.
3. Train on task questions about some entities; evaluate on held-out entities the large model
   knows but no trained model saw in task form:
     LLM Module (frozen large + bridge + small, the paper's design) | fast mode (prompt conditioning: the source
     reads the prompt only, with the knowledge lookup) | the large model fine-tuned (the distillation teacher) |
     small fine-tuned | distillation (logit KD from that teacher) | the large model alone (corpus-form prompts);
     with `ablation`, also the lookup under token conditioning, fast mode without the lookup, the small model
     from scratch and distillation with the held-out prompts answered by the teacher.
4. Write report.md, results.json, loss_curves.png and accuracy.png; print the results table.

Every system, pretraining included, trains through the same Trainer as `llm-modules train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig, PreTrainedModel, Qwen2Config

from ..data import Example, Formatter, build_prompt, parse_row
from ..fixtures import train_tokenizer
from ..inference.evaluate import answer_prompts, extract_answer
from ..info import per_token_parameters
from ..io import atomic_write_text, default_cache_dir
from ..loss import evaluate_loss
from ..model import LLMModule
from ..knowledge_source import load_tokenizer
from ..training.causal_lm import CausalLMTrainee
from ..training.pipeline import RunInputs
from ..training.recipe import TrainConfig
from ..training.trainer import Trainer
from .report import display, print_table, row_line, write_report
from .world import SYSTEM, Fact, World, grouped, make_world

FIXED_PROMPTS = [("sum", {"a": 5, "b": 5}), ("remainder", {"a": 7, "b": 4})]
PAPER = "LLM Module (frozen large + bridge + small)"
SMALL, SCRATCH = "small fine-tuned", "small from scratch"
TEACHER = "large fine-tuned (the distillation teacher)"
KD = "distilled (logit KD from the fine-tuned large)"
KD_TRANSFER = "distilled + held-out prompts (teacher-answered)"
LOOKUP = "LLM Module + knowledge lookup"
FAST = "LLM Module, prompt conditioning + knowledge lookup"
FAST_PLAIN = "LLM Module, prompt conditioning without lookup (ablation)"


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo; the defaults run one seed in about 6 minutes on 2 CPU cores (12 with
    `ablation`), pretraining included."""

    seed: int = 0
    out: str = "demo_out"
    cache_dir: str | None = None
    """Where the pretrained large and small models are kept between runs (default ~/.cache/llm-modules/demo)."""
    n_entities: int = 100
    n_background: int = 30
    vocab_size: int = 1000
    large_hidden: int = 128
    large_layers: int = 4
    large_epochs: int = 60
    small_hidden: int = 64
    small_layers: int = 2
    small_epochs: int = 30
    task_epochs: int = 80
    batch_size: int = 32
    lr: float = 3e-3
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    """Weight of the hard-label loss in distillation (1 - alpha on the soft targets)."""
    ablation: bool = False
    """Also the ablations and extra baselines: the knowledge lookup under token conditioning, fast mode without
    the lookup, the small model from scratch, distillation with the held-out prompts answered by the teacher."""
    eval_trained: int = 120
    """Trained-entity questions evaluated (a sample; held-out questions are all evaluated)."""
    threads: int = 0
    progress: bool = True
    """One progress bar per training phase (loss, ETA)."""

    @classmethod
    def quick(cls, **kw: Any) -> "DemoConfig":
        """A seconds-long version for tests."""
        base = dict(n_entities=8, n_background=4, vocab_size=400, large_hidden=32, large_layers=1, large_epochs=2,
                    small_hidden=32, small_layers=1, small_epochs=1, task_epochs=1, eval_trained=8,
                    progress=False)
        base.update(kw)
        return cls(**base)

    def pretrain_key(self) -> str:
        keys = ["seed", "n_entities", "n_background", "vocab_size", "large_hidden", "large_layers", "large_epochs",
                "small_hidden", "small_layers", "small_epochs", "batch_size", "lr"]
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"version": 3}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- training plain causal LMs (pretraining and baselines) through the same Trainer --------------
def lm_examples(tokenizer: Any, texts: Sequence[str]) -> list[Example]:
    eos = tokenizer.eos_token_id
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids + [eos]
        out.append(Example(ids, ids))
    return out


def fit_causal_lm(model: PreTrainedModel, tokenizer: Any, examples: Sequence[Example], out_dir: Path, *, epochs: int,
                  lr: float, batch_size: int, seed: int, desc: str, progress: bool = True,
                  teacher: PreTrainedModel | None = None, kd_temperature: float = 2.0, kd_alpha: float = 0.5) -> list[float]:
    """AdamW + cosine training of a transformers CausalLM with the project's Trainer; with `teacher`,
    logit distillation on labelled positions. Returns the training losses, one per step."""
    trainee = CausalLMTrainee(model, tokenizer, teacher, kd_temperature, kd_alpha)
    longest = max(len(e.input_ids) for e in examples)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr_bridge=lr, lr_small=lr, seed=seed, patience=0,
                      output_dir=str(out_dir), tensorboard=False, log_every=1, progress=progress, max_length=longest)
    inputs = RunInputs(trainee, tokenizer, list(examples), [], None, longest)
    result = Trainer(cfg, log=lambda s: None, inputs=inputs, desc=desc).fit()
    model.eval()
    return [r["loss"] for r in result.records if "loss" in r]


def generate_answers(model: Any, prompts: Sequence[str], max_new_tokens: int, tokenizer: Any = None) -> list[str]:
    """Greedy answers of an LLM Module or a plain causal LM (given its tokenizer), batched."""
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return answer_prompts(model, prompts, max_new_tokens, batch_size=32)


def completion_answer(text: str) -> str:
    """The large model's corpus-form completion up to the end of its sentence."""
    text = text.split("<|endoftext|>")[0]
    return " ".join(text.split(".")[0].split()).strip()


# -- pretraining ----------------------------------------------------------------------------------
def pretrain(cfg: DemoConfig, world: World, log: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    """Tokenizer, large and small models for this world: loaded from the cache or trained now."""
    root = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "demo") / cfg.pretrain_key()
    large_dir, small_dir, info_path = root / "large" / "last", root / "small" / "last", root / "pretrain.json"
    if info_path.exists() and (large_dir / "config.json").exists() and (small_dir / "config.json").exists():
        log(f"pretrained models: reusing {root}")
        return large_dir, small_dir, json.loads(info_path.read_text())
    tok = train_tokenizer(world.source_corpus() + [r for f in world.facts for r in (f.question(), f.answer())],
                          cfg.vocab_size)
    copies = 3  # each epoch of `rows` holds every sentence 3 times, in different company
    fit = dict(lr=cfg.lr, batch_size=cfg.batch_size // 2, seed=cfg.seed, progress=cfg.progress)
    info: dict[str, Any] = {}

    torch.manual_seed(cfg.seed)
    large = AutoModelForCausalLM.from_config(large_config(cfg, len(tok), tok))
    log(f"pretraining the large model ({sum(p.numel() for p in large.parameters()):,} parameters) on "
        f"{len(world.source_corpus())} corpus sentences")
    t = time.perf_counter()
    rows = lm_examples(tok, grouped(world.source_corpus(), 4, copies, cfg.seed))
    info["large_losses"] = fit_causal_lm(large, tok, rows, root / "large", epochs=max(1, cfg.large_epochs // copies),
                                         desc="pretrain large", **fit)
    info["large_seconds"] = time.perf_counter() - t
    info["large_fact_accuracy"] = large_fact_accuracy(large, tok, world.facts)
    log(f"  the large model knows {info['large_fact_accuracy']:.1%} of the facts (corpus-form prompts), "
        f"{info['large_seconds']:.0f} s")

    torch.manual_seed(cfg.seed + 1)
    small = AutoModelForCausalLM.from_config(small_config(cfg, len(tok), tok))
    log(f"pretraining the small model ({sum(p.numel() for p in small.parameters()):,} parameters) on "
        f"{len(world.general_text())} general sentences (no target facts)")
    t = time.perf_counter()
    rows = lm_examples(tok, grouped(world.general_text(), 4, copies, cfg.seed + 1))
    info["small_losses"] = fit_causal_lm(small, tok, rows, root / "small", epochs=max(1, cfg.small_epochs // copies),
                                         desc="pretrain small", **fit)
    info["small_seconds"] = time.perf_counter() - t
    atomic_write_text(info_path, json.dumps(info))
    return large_dir, small_dir, info


def large_config(cfg: DemoConfig, vocab: int, tok: Any) -> Qwen2Config:
    h = cfg.large_hidden
    return Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=cfg.large_layers,
                       num_attention_heads=max(1, h // 32), num_key_value_heads=max(1, h // 64),
                       max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=None)


def small_config(cfg: DemoConfig, vocab: int, tok: Any) -> GPTNeoConfig:
    layers = cfg.small_layers
    return GPTNeoConfig(vocab_size=vocab, hidden_size=cfg.small_hidden, num_layers=layers,
                        num_heads=max(1, cfg.small_hidden // 16), max_position_embeddings=256,
                        attention_types=[[["global"], layers]], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)


def large_fact_accuracy(large: PreTrainedModel, tok: Any, facts: Sequence[Fact]) -> float:
    outs = generate_answers(large, [f.stem() for f in facts], 6, tok)
    return sum(completion_answer(o) == f.value for o, f in zip(outs, facts)) / max(1, len(facts))


# -- the experiment -------------------------------------------------------------------------------
@dataclass
class Task:
    """The task set of one world: examples, the facts evaluated and how answers are scored."""

    world: World
    tokenizer: Any
    train_ex: list[Example]
    held_ex: list[Example]
    trained_sample: list[Fact]
    fixed: list[Fact]
    data_dir: Path

    def prompts(self, facts: Sequence[Fact]) -> list[str]:
        return [build_prompt(self.tokenizer, "paper", f.question(), system=SYSTEM) for f in facts]

    def scores(self, held: Sequence[str], trained: Sequence[str],
               get: Callable[[str], str] = extract_answer) -> dict[str, float]:
        """Exact match on held-out questions (all, entity facts, arithmetic) and on trained ones."""
        w = self.world
        hit = [get(t) == f.value for t, f in zip(held, w.heldout_facts)]
        ent = [h for h, f in zip(hit, w.heldout_facts) if w.is_entity(f)]
        ari = [h for h, f in zip(hit, w.heldout_facts) if not w.is_entity(f)]
        tr = [get(t) == f.value for t, f in zip(trained, self.trained_sample)]
        mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
        return {"heldout": mean(hit), "heldout_entities": mean(ent), "heldout_arithmetic": mean(ari), "trained": mean(tr),
                "n": {"heldout": len(hit), "heldout_entities": len(ent), "heldout_arithmetic": len(ari), "trained": len(tr)}}

    def answers(self, model: Any, max_new: int = 48) -> tuple[list[str], list[str], list[str]]:
        """Greedy answers to the held-out questions, the trained sample and the fixed prompts."""
        return tuple(generate_answers(model, self.prompts(fs), max_new, self.tokenizer)  # type: ignore[return-value]
                     for fs in (self.world.heldout_facts, self.trained_sample, self.fixed))


def make_task(cfg: DemoConfig, world: World, tok: Any, out: Path) -> Task:
    fmt = Formatter(tok, "paper", "assistant")
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    for name, facts in (("train", world.train_facts), ("heldout", world.heldout_facts)):
        atomic_write_text(data_dir / f"{name}.jsonl", "".join(json.dumps(f.row()) + "\n" for f in facts))
    encode = lambda facts: [fmt.encode(parse_row(f.row(), "task")) for f in facts]  # noqa: E731
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(world.train_facts), generator=g)[: cfg.eval_trained].tolist()
    fixed = [next((f for f in world.facts if f.kind == k and f.subject == subj), Fact(k, subj, ""))
             for k, subj in FIXED_PROMPTS]
    fixed += [next(f for f in world.heldout_facts if f.kind == k) for k in ("city", "colour", "profession")]
    return Task(world, tok, encode(world.train_facts), encode(world.heldout_facts),
                [world.train_facts[i] for i in pick], fixed, data_dir)


def run_llm_module(cfg: DemoConfig, task: Task, large_dir: Path, small_dir: Path, out: Path,
                   conditioning: str = "token", knowledge_path: str = "none") -> tuple[dict, list, list]:
    """Train the LLM Module from a recipe, as `llm-modules train` would; (result row, fixed answers, curve)."""
    t = time.perf_counter()
    folder = out / "_".join(["llm_module"] + [conditioning] * (conditioning != "token")
                            + [knowledge_path] * (knowledge_path != "none"))
    tcfg = TrainConfig.from_dict(dict(
        large_model=str(large_dir), small_model=str(small_dir), source_dtype="float32", num_heads=4,
        adapter_dim=64, dropout=0.0, data=str(task.data_dir / "train.jsonl"), val_fraction=0.1, seed=cfg.seed,
        epochs=cfg.task_epochs, batch_size=cfg.batch_size // 2, lr_bridge=cfg.lr, lr_small=cfg.lr / 2, warmup_steps=5,
        output_dir=str(folder), progress=cfg.progress, tensorboard=False, log_every=5, patience=0,
        max_length=256, conditioning=conditioning, knowledge_path=knowledge_path))
    desc = f"LLM Module ({conditioning}{', ' + knowledge_path if knowledge_path != 'none' else ''})"
    r = Trainer(tcfg, log=lambda s: None, desc=desc).fit()
    module = LLMModule.from_pretrained(folder / "best").eval()
    secs = time.perf_counter() - t
    hl = evaluate_loss(module, task.held_ex, 32, task.tokenizer.pad_token_id)
    ho, tr, fx = task.answers(module)
    row = dict(**task.scores(ho, tr), val_loss=hl["loss"], ppl=hl["perplexity"],
               trainable=sum(p.numel() for _, p in module.trainable_named_parameters()), seconds=secs,
               per_token=per_token_parameters(module))
    return row, fx, [x["loss"] for x in r.records if "loss" in x]


def run_baseline(cfg: DemoConfig, task: Task, name: str, small: PreTrainedModel, out: Path,
                 teacher: PreTrainedModel | None = None, extra: Sequence[Example] = ()) -> tuple[dict, list, list]:
    """Fine-tune a plain causal LM on the task (with `teacher`: logit distillation; `extra`: more examples)."""
    t = time.perf_counter()
    slug = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])
    losses = fit_causal_lm(small, task.tokenizer, [*task.train_ex, *extra], out / "baselines" / slug, epochs=cfg.task_epochs,
                           lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, desc=name.split(" (")[0],
                           progress=cfg.progress, teacher=teacher, kd_temperature=cfg.kd_temperature, kd_alpha=cfg.kd_alpha)
    secs = time.perf_counter() - t
    vl = evaluate_loss(CausalLMTrainee(small), task.held_ex, 32, task.tokenizer.pad_token_id)["loss"]
    ho, tr, fx = task.answers(small)
    row = dict(**task.scores(ho, tr), val_loss=vl, ppl=math.exp(min(vl, 50)),
               trainable=sum(p.numel() for p in small.parameters()), seconds=secs, per_token=per_token_parameters(small))
    return row, fx, losses


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(cfg.seed, cfg.n_entities, cfg.n_background)
    log(f"world (seed {cfg.seed}): {len(world.entities)} entities, {len(world.facts)} facts; "
        f"task: {len(world.train_facts)} trained / {len(world.heldout_facts)} held-out questions")
    large_dir, small_dir, pre = pretrain(cfg, world, log)
    tok = load_tokenizer(str(large_dir))
    task = make_task(cfg, world, tok, out)
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    curves: dict[str, list[float]] = {}

    def record(name: str, short: str, got: tuple[dict, list, list]) -> None:
        results[name], answers[name], curves[short] = got
        log(row_line(short, results[name]))

    record(PAPER, "LLM Module", run_llm_module(cfg, task, large_dir, small_dir, out))
    if cfg.ablation:
        record(LOOKUP, "LLM Module + lookup", run_llm_module(cfg, task, large_dir, small_dir, out, "token", "lookup"))
    record(FAST, "LLM Module, fast", run_llm_module(cfg, task, large_dir, small_dir, out, "prompt", "lookup"))
    if cfg.ablation:
        record(FAST_PLAIN, "fast, no lookup", run_llm_module(cfg, task, large_dir, small_dir, out, "prompt"))
    large = AutoModelForCausalLM.from_pretrained(str(large_dir)).eval()
    # A fair teacher for distillation: the large model fine-tuned on the training questions (it knows the format).
    torch.manual_seed(cfg.seed + 5)
    teacher = AutoModelForCausalLM.from_pretrained(str(large_dir))
    record(TEACHER, "large fine-tuned", run_baseline(cfg, task, TEACHER, teacher, out))
    baselines = [(SMALL, "pretrained", None, []), (KD, "pretrained", teacher, [])]
    if cfg.ablation:
        # What distillation can do with teacher queries: the teacher answers the held-out prompts (unlabeled inputs).
        fmt = Formatter(tok, "paper", "assistant")
        queries = [fmt.encode(parse_row({"system": SYSTEM, "conversations": [
            {"from": "user", "value": f.question()}, {"from": "assistant", "value": a.strip() or "?"}]}, "transfer"))
            for f, a in zip(world.heldout_facts, generate_answers(teacher, task.prompts(world.heldout_facts), 48, tok))]
        baselines[1:1] = [(SCRATCH, "scratch", None, [])]
        baselines.append((KD_TRANSFER, "pretrained", teacher, queries))
    for name, init, kd, extra in baselines:
        torch.manual_seed(cfg.seed + 7)
        small = (AutoModelForCausalLM.from_pretrained(str(small_dir)) if init == "pretrained"
                 else AutoModelForCausalLM.from_config(small_config(cfg, len(tok), tok)))
        record(name, name.split(" (")[0], run_baseline(cfg, task, name, small, out, kd, extra))

    # The large model alone, prompted in its corpus form.
    ho, tr, fx = (generate_answers(large, [f.stem() for f in fs], 6, tok)
                  for fs in (world.heldout_facts, task.trained_sample, task.fixed))
    key = "large model alone (corpus-form prompts)"
    results[key] = dict(**task.scores(ho, tr, completion_answer), val_loss=None, ppl=None, trainable=0,
                        seconds=pre.get("large_seconds", 0.0), per_token=per_token_parameters(large))
    answers[key] = [completion_answer(o) for o in fx]
    log(row_line("large alone", results[key]))

    summary = {"config": dataclasses.asdict(cfg), "large_fact_accuracy": pre["large_fact_accuracy"],
               "results": results, "fixed_prompts": [f.question() for f in task.fixed],
               "fixed_answers": {k: [display(extract_answer(a) if "alone" not in k else a) for a in v]
                                 for k, v in answers.items()},
               "gold": [f.value for f in task.fixed], "seconds": time.perf_counter() - t_start}
    write_report(out, summary, curves, pre)
    print_table(summary, log)
    log(f"report: {out / 'report.md'} (plots: loss_curves.png, accuracy.png); total {summary['seconds']:.0f} s")
    return summary


def run_demo_seeds(cfg: DemoConfig, seeds: Sequence[int], log: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo over several seeds (each its own world, pretraining and training) in OUT/seedN, and a combined
    report (mean, min-max and pooled Wilson 95% intervals) in OUT."""
    from .report import aggregate_seeds, write_seeds_report

    runs = {}
    for seed in seeds:
        log(f"== seed {seed}")
        runs[seed] = run_demo(dataclasses.replace(cfg, seed=seed, out=str(Path(cfg.out) / f"seed{seed}")), log)
    summary = {"config": dataclasses.asdict(cfg), "seeds": list(seeds), "table": aggregate_seeds(runs),
               "large_fact_accuracy": {s: r["large_fact_accuracy"] for s, r in runs.items()},
               "seconds": sum(r["seconds"] for r in runs.values())}
    write_seeds_report(Path(cfg.out), summary)
    log(f"report over seeds {', '.join(map(str, seeds))}: {Path(cfg.out) / 'report.md'}")
    return summary
