"""The demo's report: results table, answers to fixed prompts, plots (written atomically)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text
from .plots import Series, plot_bars, plot_curves


def display(text: str) -> str:
    """An answer for a table cell: special tokens and padding removed, one line."""
    return " ".join(re.sub(r"<\|[a-z_]+\|>", " ", text).split()) or "(empty)"


def row_line(name: str, r: dict[str, Any]) -> str:
    return (f"  {name}: held-out EM {r['heldout']:.1%} (entities {r['heldout_entities']:.1%}, "
            f"arithmetic {r['heldout_arithmetic']:.1%}), trained EM {r['trained']:.1%}")


def _table(summary: dict[str, Any]) -> list[str]:
    lines = ["| system | held-out EM | held-out entities | held-out arithmetic | trained EM | held-out loss | perplexity "
             "| trainable params | params run per new token | train time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["results"].items():
        vl = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        pp = "n/a" if r["ppl"] is None else f"{r['ppl']:.2f}"
        lines.append(f"| {name} | {r['heldout']:.1%} | {r['heldout_entities']:.1%} | {r['heldout_arithmetic']:.1%} "
                     f"| {r['trained']:.1%} | {vl} | {pp} | {r['trainable']:,} | {_per_token(r)} | {r['seconds']:.0f} |")
    return lines


def _per_token(r: dict[str, Any]) -> str:
    return f"{r['per_token']:,}" if r.get("per_token") else "n/a"


def print_table(summary: dict[str, Any], log: Callable[[str], None] = print) -> None:
    log("")
    for line in _table(summary):
        log(line)


def write_report(out: Path, summary: dict[str, Any], curves: dict[str, list[float]], pre: dict[str, Any]) -> None:
    plot_curves(out / "loss_curves.png", curves, "fraction of task training", "training loss")
    names = list(summary["results"])
    plot_bars(out / "accuracy.png", names,
              [Series(label, [summary["results"][n][key] for n in names]) for key, label in METRICS],
              "exact match", f"seed {summary['config']['seed']}")

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
             "Knowledge lookup (`knowledge_path: lookup`): each position also attends over the source positions it "
             "may read and adds the gated log of a mixture of the source's next-token predictions there, so the "
             "module can copy what the source predicted after the question's recall cue. Prompt conditioning "
             "(`conditioning: prompt`, fast mode): the source reads the question once; the bridge, the small trunk "
             "and the head write the answer with no source step ('params run per new token').", "",
             "Distillation: the teacher is the large model fine-tuned on the training questions (its own row), so it "
             "knows the task format; the student (the pretrained small model) learns from its soft targets on the "
             f"task text (temperature {cfg['kd_temperature']}, weight {1 - cfg['kd_alpha']:.1f} on them). "
             "'+ held-out prompts' also gives the student the held-out questions answered by the teacher (unlabeled "
             "transfer inputs: what distillation can do when the questions to come are known). Distillation losses "
             "include the soft-target term, so their curves are not comparable.", "",
             "## Answers to fixed prompts (as the paper's Table 1)", "",
             "| prompt | gold | " + " | ".join(n.split(" (")[0] for n in summary["fixed_answers"]) + " |",
             "|---|---|" + "---|" * len(summary["fixed_answers"])]
    for i, p in enumerate(summary["fixed_prompts"]):
        cells = [str(v[i]).replace("|", "/")[:40] for v in summary["fixed_answers"].values()]
        lines.append(f"| {p} | {summary['gold'][i]} | " + " | ".join(cells) + " |")
    lines += ["", "![loss curves](loss_curves.png) ![accuracy](accuracy.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))


METRICS = (("heldout_entities", "held-out entity facts"), ("heldout_arithmetic", "held-out arithmetic"),
           ("trained", "trained questions"))


def aggregate_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system and metric: mean, min, max over seeds and the Wilson 95% interval of the pooled counts."""
    from .facts import wilson

    table: dict[str, dict[str, Any]] = {}
    for name in next(iter(runs.values()))["results"]:
        table[name] = {}
        for key, _ in METRICS:
            vals = [r["results"][name][key] for r in runs.values()]
            ns = [r["results"][name]["n"][key] for r in runs.values()]
            hits = sum(round(v * n) for v, n in zip(vals, ns))
            table[name][key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                                "ci95": wilson(hits, sum(ns)), "n": sum(ns)}
        table[name]["per_token"] = next(iter(runs.values()))["results"][name].get("per_token")
    return table


def seeds_table(table: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| system | " + " | ".join(label for _, label in METRICS) + " | params run per new token |",
             "|---|" + "---:|" * (len(METRICS) + 1)]
    for name, t in table.items():
        cells = [f"{c['mean']:.1%} ({c['min']:.0%}-{c['max']:.0%}) [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}]"
                 for c in (t[k] for k, _ in METRICS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_per_token(t)} |")
    return lines


def write_seeds_report(out: Path, summary: dict[str, Any]) -> None:
    table, names = summary["table"], list(summary["table"])
    plot_bars(out / "accuracy.png", names,
              [Series(label, [table[n][key]["mean"] for n in names], [table[n][key]["min"] for n in names],
                      [table[n][key]["max"] for n in names]) for key, label in METRICS],
              f"exact match (mean, min-max over {len(summary['seeds'])} seeds)")
    lines = ["# LLM Modules demo: knowledge transfer in a synthetic world, several seeds", "",
             f"Seeds {', '.join(map(str, summary['seeds']))}, each with its own world, pretraining and training "
             f"(reports in seedN/). Cells: mean over seeds (min-max) [Wilson 95% interval of all seeds' answers "
             f"pooled]. Total time {summary['seconds']:.0f} s.", "", *seeds_table(table), "",
             "![accuracy](accuracy.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
