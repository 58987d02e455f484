"""The built-in demo: a measurable knowledge-transfer experiment with the paper's baselines.

1. Generate a knowledge world (llm_modules.world) from a seed.
2. Pretrain a small "large" model (Qwen2 architecture) on the source corpus until it knows the
   facts, and a small model (GPT-Neo architecture) on general text without them. Both are cached.
3. Train on task questions about some entities; evaluate on held-out entities the large model
   knows but no trained model saw in task form:
     LLM Module (frozen large + bridge + small) | small fine-tuned | small from scratch |
     distillation (logit KD from the large model) | the large model alone (corpus-form prompts).
4. Write report.md, results.json, loss_curves.png and accuracy.png; print the results table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPTNeoConfig, PreTrainedModel, Qwen2Config

from .data import Example, Formatter, build_prompt, collate, parse_row
from .evaluate import answer_prompts, extract_answer
from .fixtures import default_cache_dir, train_tokenizer
from .io import atomic_dir, atomic_write, atomic_write_text
from .source import load_tokenizer
from .world import SYSTEM, Fact, World, grouped, make_world

FIXED_PROMPTS = [("sum", {"a": 5, "b": 5}), ("remainder", {"a": 7, "b": 4})]


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo; the defaults run in well under 15 minutes on 2 CPU cores."""

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
    eval_trained: int = 120
    """Trained-entity questions evaluated (a sample; held-out questions are all evaluated)."""
    threads: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> "DemoConfig":
        """A seconds-long version for tests."""
        base = dict(n_entities=8, n_background=4, vocab_size=400, large_hidden=32, large_layers=1, large_epochs=2,
                    small_hidden=32, small_layers=1, small_epochs=1, task_epochs=1, eval_trained=8)
        base.update(kw)
        return cls(**base)

    def pretrain_key(self) -> str:
        keys = ["seed", "n_entities", "n_background", "vocab_size", "large_hidden", "large_layers", "large_epochs",
                "small_hidden", "small_layers", "small_epochs", "batch_size", "lr"]
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"version": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- small training loops for plain causal LMs (pretraining and baselines) ----------------------
def lm_examples(tokenizer: Any, texts: Sequence[str]) -> list[Example]:
    eos = tokenizer.eos_token_id
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids + [eos]
        out.append(Example(ids, ids))
    return out


def fit_causal_lm(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    teacher: PreTrainedModel | None = None,
    kd_temperature: float = 2.0,
    kd_alpha: float = 0.5,
) -> list[float]:
    """AdamW + cosine training of a transformers CausalLM; with `teacher`, logit distillation on labelled positions."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            b = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                keep = labels != -100
                T = kd_temperature
                kl = F.kl_div(F.log_softmax(logits[keep] / T, -1), F.log_softmax(t_logits[keep] / T, -1),
                              log_target=True, reduction="batchmean") * T * T
                loss = kd_alpha * loss + (1 - kd_alpha) * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def lm_task_loss(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i : i + batch_size], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


def generate_answers(model: Any, prompts: Sequence[str], max_new_tokens: int, tokenizer: Any = None) -> list[str]:
    """Greedy answers of an LLM Module or a plain causal LM (given its tokenizer), batched."""
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return answer_prompts(model, prompts, max_new_tokens, batch_size=32)


def completion_answer(text: str) -> str:
    """The large model's corpus-form completion up to the end of its sentence."""
    text = text.split("<|endoftext|>")[0]
    return " ".join(text.split(".")[0].split()).strip()


# -- the experiment -----------------------------------------------------------------------------
def _save_model(model: PreTrainedModel, tokenizer: Any, path: Path) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def pretrain(cfg: DemoConfig, world: World, log: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    """Tokenizer, large and small models for this world: loaded from the cache or trained now."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "demo"
    root = root / cfg.pretrain_key()
    large_dir, small_dir, info_path = root / "large", root / "small", root / "pretrain.json"
    if info_path.exists() and (large_dir / "config.json").exists() and (small_dir / "config.json").exists():
        log(f"pretrained models: reusing {root}")
        return large_dir, small_dir, json.loads(info_path.read_text())
    texts = world.source_corpus() + [r for f in world.facts for r in (f.question(), f.answer())]
    tok = train_tokenizer(texts, cfg.vocab_size)
    pad = tok.pad_token_id
    info: dict[str, Any] = {}

    torch.manual_seed(cfg.seed)
    large = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.large_hidden, intermediate_size=4 * cfg.large_hidden,
        num_hidden_layers=cfg.large_layers, num_attention_heads=max(1, cfg.large_hidden // 32), num_key_value_heads=max(1, cfg.large_hidden // 64),
        max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=pad, bos_token_id=None))
    t = time.perf_counter()
    log(f"pretraining the large model ({sum(p.numel() for p in large.parameters()):,} parameters) on "
        f"{len(world.source_corpus())} corpus sentences, {cfg.large_epochs} epochs")
    copies = 3  # each epoch of `rows` holds every sentence 3 times, in different company
    rows = grouped(world.source_corpus(), 4, copies, cfg.seed)
    info["large_losses"] = fit_causal_lm(large, lm_examples(tok, rows), epochs=max(1, cfg.large_epochs // copies),
                                         lr=cfg.lr, batch_size=cfg.batch_size // 2, seed=cfg.seed, pad_id=pad)
    info["large_seconds"] = time.perf_counter() - t
    info["large_fact_accuracy"] = large_fact_accuracy(large, tok, world.facts)
    log(f"  large model knows {info['large_fact_accuracy']:.1%} of the facts (corpus-form prompts), "
        f"{info['large_seconds']:.0f} s")

    torch.manual_seed(cfg.seed + 1)
    small = AutoModelForCausalLM.from_config(small_config(cfg, len(tok), tok))
    t = time.perf_counter()
    log(f"pretraining the small model ({sum(p.numel() for p in small.parameters()):,} parameters) on "
        f"{len(world.general_text())} general sentences (no target facts), {cfg.small_epochs} epochs")
    rows = grouped(world.general_text(), 4, copies, cfg.seed + 1)
    info["small_losses"] = fit_causal_lm(small, lm_examples(tok, rows), epochs=max(1, cfg.small_epochs // copies),
                                         lr=cfg.lr, batch_size=cfg.batch_size // 2, seed=cfg.seed, pad_id=pad)
    info["small_seconds"] = time.perf_counter() - t
    _save_model(large, tok, large_dir)
    _save_model(small, tok, small_dir)
    atomic_write_text(info_path, json.dumps(info))
    return large_dir, small_dir, info


def small_config(cfg: DemoConfig, vocab: int, tok: Any) -> GPTNeoConfig:
    layers = cfg.small_layers
    return GPTNeoConfig(vocab_size=vocab, hidden_size=cfg.small_hidden, num_layers=layers,
                        num_heads=max(1, cfg.small_hidden // 16), max_position_embeddings=256,
                        attention_types=[[["global"], layers]], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)


def large_fact_accuracy(large: PreTrainedModel, tok: Any, facts: Sequence[Fact]) -> float:
    outs = generate_answers(large, [f.stem() for f in facts], 6, tok)
    return sum(completion_answer(o) == f.value for o, f in zip(outs, facts)) / max(1, len(facts))


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .evaluate import evaluate_loss
    from .model import LLMModule
    from .train import TrainConfig, train

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
    pad = tok.pad_token_id
    fmt = Formatter(tok, "paper", "assistant")
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    for name, facts in (("train", world.train_facts), ("heldout", world.heldout_facts)):
        atomic_write_text(data_dir / f"{name}.jsonl", "".join(json.dumps(f.row()) + "\n" for f in facts))
    train_ex = [fmt.encode(parse_row(f.row(), "task")) for f in world.train_facts]
    held_ex = [fmt.encode(parse_row(f.row(), "task")) for f in world.heldout_facts]
    g = torch.Generator().manual_seed(cfg.seed)
    trained_sample = [world.train_facts[i] for i in torch.randperm(len(world.train_facts), generator=g)[: cfg.eval_trained].tolist()]
    fixed = [Fact(kind, subj, "") for kind, subj in FIXED_PROMPTS]
    fixed = [next((f for f in world.facts if f.kind == x.kind and f.subject == x.subject), x) for x in fixed]
    fixed += [next(f for f in world.heldout_facts if f.kind == k) for k in ("city", "colour", "profession")]
    def prompts(facts: Sequence[Fact]) -> list[str]:
        return [build_prompt(tok, "paper", f.question(), system=SYSTEM) for f in facts]

    def scores(held: Sequence[str], trained: Sequence[str], get: Callable[[str], str] = extract_answer) -> dict[str, float]:
        """Exact match on held-out questions (all, entity facts, arithmetic) and on trained ones."""
        hit = [get(t) == f.value for t, f in zip(held, world.heldout_facts)]
        ent = [h for h, f in zip(hit, world.heldout_facts) if world.is_entity(f)]
        ari = [h for h, f in zip(hit, world.heldout_facts) if not world.is_entity(f)]
        tr = [get(t) == f.value for t, f in zip(trained, trained_sample)]
        mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
        return {"heldout": mean(hit), "heldout_entities": mean(ent), "heldout_arithmetic": mean(ari), "trained": mean(tr)}

    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    curves: dict[str, list[float]] = {}
    max_new = 48

    # 1. LLM Module
    t = time.perf_counter()
    tcfg = TrainConfig.from_dict(dict(
        large_model=str(large_dir), small_model=str(small_dir), source_dtype="float32", num_heads=4,
        adapter_dim=64, dropout=0.0, data=str(data_dir / "train.jsonl"), val_fraction=0.1, seed=cfg.seed,
        epochs=cfg.task_epochs, batch_size=cfg.batch_size // 2, lr_bridge=cfg.lr, lr_small=cfg.lr / 2, warmup_steps=5,
        output_dir=str(out / "llm_module"), progress=False, tensorboard=False, log_every=5, patience=0,
        max_length=256))
    r = train(tcfg, log=lambda s: log("  " + s))
    module = LLMModule.from_pretrained(out / "llm_module" / "best").eval()
    secs = time.perf_counter() - t
    hl = evaluate_loss(module, held_ex, 32, pad)
    n_train = sum(p.numel() for _, p in module.trainable_named_parameters())
    ho, tr, fx = (generate_answers(module, prompts(fs), max_new) for fs in (world.heldout_facts, trained_sample, fixed))
    results["LLM Module (frozen large + bridge + small)"] = dict(
        **scores(ho, tr), val_loss=hl["loss"], ppl=hl["perplexity"], trainable=n_train, seconds=secs)
    answers["LLM Module (frozen large + bridge + small)"] = fx
    curves["LLM Module"] = [x["loss"] for x in r.records if "loss" in x]
    log(_row_line("LLM Module", results["LLM Module (frozen large + bridge + small)"]))

    # 2-4. small baselines
    large = AutoModelForCausalLM.from_pretrained(str(large_dir)).eval()
    for name, init, teacher in (("small fine-tuned", "pretrained", None), ("small from scratch", "scratch", None),
                                ("distilled (logit KD from large)", "pretrained", large)):
        torch.manual_seed(cfg.seed + 7)
        model = (AutoModelForCausalLM.from_pretrained(str(small_dir)) if init == "pretrained"
                 else AutoModelForCausalLM.from_config(small_config(cfg, len(tok), tok)))
        t = time.perf_counter()
        losses = fit_causal_lm(model, train_ex, epochs=cfg.task_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                               seed=cfg.seed, pad_id=pad, teacher=teacher, kd_temperature=cfg.kd_temperature,
                               kd_alpha=cfg.kd_alpha)
        secs = time.perf_counter() - t
        vl = lm_task_loss(model, held_ex, pad)
        ho, tr, fx = (generate_answers(model, prompts(fs), max_new, tok) for fs in (world.heldout_facts, trained_sample, fixed))
        results[name] = dict(**scores(ho, tr), val_loss=vl, ppl=math.exp(min(vl, 50)),
                             trainable=sum(p.numel() for p in model.parameters()), seconds=secs)
        answers[name] = fx
        curves[name] = losses
        log(_row_line(name, results[name]))

    # 5. large alone, prompted in its corpus form
    ho, tr, fx = (generate_answers(large, [f.stem() for f in fs], 6, tok) for fs in (world.heldout_facts, trained_sample, fixed))
    key = "large model alone (corpus-form prompts)"
    results[key] = dict(**scores(ho, tr, completion_answer), val_loss=None, ppl=None, trainable=0,
                        seconds=pre.get("large_seconds", 0.0))
    answers[key] = [completion_answer(o) for o in fx]
    log(_row_line("large alone", results[key]))

    summary = {"config": dataclasses.asdict(cfg), "large_fact_accuracy": pre["large_fact_accuracy"],
               "results": results, "fixed_prompts": [f.question() for f in fixed],
               "fixed_answers": {k: [_display(extract_answer(a) if "alone" not in k else a) for a in v]
                                 for k, v in answers.items()},
               "gold": [f.value for f in fixed], "seconds": time.perf_counter() - t_start}
    write_report(out, summary, curves, pre)
    print_table(summary, log)
    log(f"report: {out / 'report.md'} (plots: loss_curves.png, accuracy.png); total {summary['seconds']:.0f} s")
    return summary


def _display(text: str) -> str:
    """An answer for a table cell: special tokens and padding removed, one line."""
    return " ".join(re.sub(r"<\|[a-z_]+\|>", " ", text).split()) or "(empty)"


def _row_line(name: str, r: dict[str, Any]) -> str:
    return (f"  {name}: held-out EM {r['heldout']:.1%} (entities {r['heldout_entities']:.1%}, "
            f"arithmetic {r['heldout_arithmetic']:.1%}), trained EM {r['trained']:.1%}")


def _table(summary: dict[str, Any]) -> list[str]:
    lines = ["| system | held-out EM | held-out entities | held-out arithmetic | trained EM | held-out loss | perplexity "
             "| trainable params | train time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["results"].items():
        vl = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        pp = "n/a" if r["ppl"] is None else f"{r['ppl']:.2f}"
        lines.append(f"| {name} | {r['heldout']:.1%} | {r['heldout_entities']:.1%} | {r['heldout_arithmetic']:.1%} "
                     f"| {r['trained']:.1%} | {vl} | {pp} | {r['trainable']:,} | {r['seconds']:.0f} |")
    return lines


def print_table(summary: dict[str, Any], log: Callable[[str], None] = print) -> None:
    log("")
    for line in _table(summary):
        log(line)


def write_report(out: Path, summary: dict[str, Any], curves: dict[str, list[float]], pre: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        if ys:
            ax.plot([i / max(1, len(ys) - 1) for i in range(len(ys))], ys, label=name)
    ax.set_xlabel("fraction of task training")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "loss_curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

    names = list(summary["results"])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    for off, key, label in ((-0.27, "heldout_entities", "held-out entity facts"),
                             (0.0, "heldout_arithmetic", "held-out arithmetic"), (0.27, "trained", "trained questions")):
        ax.bar([i + off for i in x], [summary["results"][n][key] for n in names], 0.27, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels([n.split(" (")[0] for n in names], rotation=15, fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "accuracy.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

    cfg = summary["config"]
    lines = ["# LLM Modules demo: knowledge transfer in a synthetic world", "",
             f"Seed {cfg['seed']}; {cfg['n_entities']} entities (half held out), arithmetic facts up to 9; "
             f"large model: Qwen2 {cfg['large_hidden']}x{cfg['large_layers']} pretrained on the source corpus "
             f"(knows {summary['large_fact_accuracy']:.1%} of the facts); small model: GPT-Neo "
             f"{cfg['small_hidden']}x{cfg['small_layers']} pretrained on general text without them. "
             f"Total time {summary['seconds']:.0f} s.", "",
             "Held-out entities and arithmetic pairs were never seen in task form by any trained system; "
             "only the frozen large model knows them. Chance on entity facts is about 1/8 to 1/12; arithmetic can "
             "partly be inferred from the trained pairs.", "", *_table(summary), "",
             "Distillation uses the large model's soft targets on the task text (temperature "
             f"{cfg['kd_temperature']}, weight {1 - cfg['kd_alpha']:.1f} on them). The large model never saw the task "
             "format, so those targets say little about the reasoning markers; and distillation on the trained "
             "questions cannot carry facts about held-out entities, which the LLM Module reads from the frozen source "
             "at inference. Its training loss includes the soft-target term, so its curve is not comparable.", "",
             "## Answers to fixed prompts (as the paper's Table 1)", "",
             "| prompt | gold | " + " | ".join(n.split(" (")[0] for n in summary["fixed_answers"]) + " |",
             "|---|---|" + "---|" * len(summary["fixed_answers"])]
    for i, p in enumerate(summary["fixed_prompts"]):
        cells = [str(v[i]).replace("|", "/")[:40] for v in summary["fixed_answers"].values()]
        lines.append(f"| {p} | {summary['gold'][i]} | " + " | ".join(cells) + " |")
    lines += ["", "![loss curves](loss_curves.png) ![accuracy](accuracy.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
