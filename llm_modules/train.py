"""One training loop: AdamW with bridge / small-model groups, warm-up + cosine, accumulation, clipping,
autocast, validation + early stopping, atomic best/last checkpoints and exact resume.

    llm-modules train --config recipes/tiny.yaml                 # CPU, under a minute
    llm-modules train --config recipes/paper.yaml --batch_size 4 # one GPU
    llm-modules train --config recipes/tiny.yaml --resume        # continue from runs/.../last
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from .data import Example, Formatter, collate, collate_packed, load_examples, pack_indices, split_examples
from .evaluate import evaluate_loss
from .fixtures import resolve
from .io import atomic_write, atomic_write_text
from .model import LLMModule
from .source import fingerprints_match

STATE_NAME = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Every option of a training run; a recipe YAML sets these keys, `--key value` overrides them."""

    # model
    large_model: str = "tiny:large_qwen2"
    """Knowledge source: hub id or local path (`tiny:NAME` = a locally generated fixture)."""
    small_model: str = "tiny:small_gpt_neo"
    """Generation module trunk: hub id or local path."""
    init_small: str = "pretrained"
    """pretrained | scratch."""
    init_from: str | None = None
    """Start from a saved llm-modules folder (e.g. a converted reference checkpoint) instead of building."""
    causal: bool = True
    """Causal cross-attention (false leaks the future; only for reference compatibility)."""
    source_dtype: str = "bfloat16"
    """dtype of the frozen knowledge source."""
    source_layer: int = -1
    num_layers: int = 2
    num_heads: int = 8
    adapter_dim: int = 256
    intermediate_dim: int | None = None
    dropout: float = 0.1
    gate_init: str = "paper"
    # data
    data: str | list[str] = "tiny:arith"
    """Training data: hub dataset name, or local .json/.jsonl/.parquet files or folders."""
    val_data: str | list[str] | None = None
    """Separate validation data; if unset, val_fraction of `data` is held out."""
    data_split: str = "train"
    """Split to read from a hub dataset."""
    format: str = "paper"
    """paper | chat_template."""
    loss_on: str = "assistant"
    """assistant (answer tokens + the EOS that ends them) | all (every non-padding token, as the paper)."""
    system_prompt: str | None = None
    """System prompt for rows without one (default: the reasoning prompt of Bespoke-Stratos)."""
    max_length: int = 4096
    """Examples longer than this (in large-tokenizer tokens) are dropped, never truncated."""
    subset: float = 1.0
    """Fraction of the rows to use, drawn once from `seed` (the paper used 0.3)."""
    val_fraction: float = 0.1
    seed: int = 0
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first."""
    packing: bool = False
    """Pack several short training examples into one row of up to max_length tokens (no attention
    crosses an example boundary in the source, the bridge or the trunk)."""
    # optimisation
    epochs: int = 15
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run all epochs)."""
    batch_size: int = 1
    grad_accum: int = 1
    lr_bridge: float = 1e-4
    lr_small: float = 5e-5
    """Learning rate of the small trunk and the new head."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    """cosine | constant (after warm-up)."""
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPU) | fp32 | bf16 | fp16."""
    gradient_checkpointing: bool = False
    """Recompute the small trunk's activations in backward to save memory."""
    loss_chunk_size: int = 0
    """Compute the loss in chunks of this many tokens (never materialising full-vocabulary logits); 0 = off."""
    # evaluation, checkpoints, logging
    eval_every: int = 0
    """Also validate every N optimiser steps (0: once per epoch)."""
    eval_batch_size: int = 8
    save_every: int = 0
    """Also write the `last` checkpoint every N optimiser steps (0: once per epoch)."""
    patience: int = 5
    """Early stopping: validations without improvement before stopping (0: never)."""
    min_delta: float = 0.0
    output_dir: str = "runs/tiny"
    log_every: int = 10
    tensorboard: bool = True
    """Log to TensorBoard when it is installed."""
    progress: bool = True
    device: str = "auto"
    threads: int = 0
    """torch CPU threads (0: leave as is)."""
    # frozen-feature cache (see llm_modules.features)
    feature_cache: bool = False
    """Run the knowledge source once over the data, store its states on disk, train from them."""
    cache_dir: str | None = None
    """Where the feature cache lives (default: OUTPUT_DIR/features)."""
    cache_dtype: str = "float16"
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")
        d.update(overrides or {})
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.fields()))
        if unknown:
            raise ValueError(f"{where}: unknown key(s): {', '.join(unknown)}")
        fields = cls.fields()
        cfg = cls(**{k: _coerce(k, v, str(fields[k].type), where) for k, v in d.items()})
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        checks = [
            (self.schedule in ("cosine", "constant"), "schedule must be cosine or constant"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "precision must be auto, fp32, bf16 or fp16"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.epochs >= 1 or self.max_steps >= 1, "epochs or max_steps must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{where}: {msg}")

    def module_kwargs(self) -> dict[str, Any]:
        keys = ["init_small", "causal", "source_dtype", "source_layer", "num_layers", "num_heads", "adapter_dim",
                "intermediate_dim", "dropout", "gate_init"]
        return {k: getattr(self, k) for k in keys}


def _coerce(name: str, value: Any, annotation: str, where: str) -> Any:
    """YAML reads `1e-4` as a string: convert numbers to the field's declared type, or say which key is wrong."""
    kind = annotation.split("|")[0].strip()
    if value is None or kind not in ("int", "float", "bool"):
        return value
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "int" and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return int(float(value)) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: key {name!r} must be {kind}, got {value!r}") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` pairs (dashes or underscores) -> typed values (parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; overrides are --key value")
        key = a[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            val = args[i + 1]
            i += 2
        else:
            val, i = "true", i + 1
        out[key] = yaml.safe_load(val)
    return out


# -- helpers ----------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_setup(precision: str, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler or None) for the chosen precision."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of (seed, epoch) only, so resume can rebuild it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class MetricsLog:
    """metrics.jsonl (appended, one JSON object a line) and TensorBoard when installed."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: they will be written again.
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (train per logged step, validation per evaluation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), marker="o", label="validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# -- data ---------------------------------------------------------------------------------------
def effective_max_length(cfg: TrainConfig, position_limit: int | None) -> int:
    return min(cfg.max_length, position_limit) if position_limit else cfg.max_length


def prepare_data(cfg: TrainConfig, tokenizer: Any, position_limit: int | None, log: Callable[[str], None] = print
                 ) -> tuple[list[Example], list[Example]]:
    """Load, format, length-filter and split; returns (train, validation)."""
    kw = {"system_prompt": cfg.system_prompt} if cfg.system_prompt is not None else {}
    fmt = Formatter(tokenizer, cfg.format, cfg.loss_on, **kw)
    max_len = effective_max_length(cfg, position_limit)
    if max_len < cfg.max_length:
        log(f"max_length {cfg.max_length} exceeds the small trunk's {position_limit} positions: filtering at {max_len}")
    data = [resolve(d) for d in ([cfg.data] if isinstance(cfg.data, str) else cfg.data)]
    examples, report = load_examples(data, fmt, max_length=max_len, skip_bad_rows=cfg.skip_bad_rows, split=cfg.data_split)
    if cfg.val_data:
        vdata = [resolve(d) for d in ([cfg.val_data] if isinstance(cfg.val_data, str) else cfg.val_data)]
        val, vreport = load_examples(vdata, fmt, max_length=max_len, skip_bad_rows=cfg.skip_bad_rows, split=cfg.data_split)
        train, _ = split_examples(examples, 0.0, cfg.seed, cfg.subset)
        report.dropped_too_long += vreport.dropped_too_long
    else:
        train, val = split_examples(examples, cfg.val_fraction, cfg.seed, cfg.subset)
    report.train, report.validation = len(train), len(val)
    log("data: " + report.summary())
    if not train:
        raise ValueError("no training examples left after filtering")
    return train, val


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: str
    steps: int
    best_val_loss: float | None
    first_val_loss: float | None
    stopped_early: bool
    records: list[dict[str, Any]]


def build_module(cfg: TrainConfig, tokenizer: Any = None, load_source: bool = True) -> LLMModule:
    large, small = resolve(cfg.large_model), resolve(cfg.small_model)
    if cfg.init_from:
        m = LLMModule.from_pretrained(cfg.init_from, large_model=large, source_dtype=cfg.source_dtype,
                                      load_source=load_source)
        m.config.causal = cfg.causal
        m.config.reference_compat = m.config.reference_compat and not cfg.causal
        m.bridge.causal = cfg.causal and not m.config.reference_compat
        return m
    if not load_source:
        from .model import load_trunk
        from .config import ModuleConfig
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(large)
        mcfg = ModuleConfig(large_model=large, small_model=small, vocab_size=len(tokenizer), **cfg.module_kwargs())
        return LLMModule(mcfg, load_trunk(small, cfg.init_small), None,
                         source_hidden_size=AutoConfig.from_pretrained(large).hidden_size, tokenizer=tokenizer)
    return LLMModule.build(large, small, tokenizer=tokenizer, **cfg.module_kwargs())


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a training run; returns where it wrote and what it measured.

    `stop_after` ends the run after that many optimiser steps in this call, as a kill would
    (used to test exact resume).
    """
    from transformers import AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    state = None
    if resume:
        if not (last_dir / STATE_NAME).exists():
            raise FileNotFoundError(f"{last_dir}: nothing to resume (no {STATE_NAME}); run without --resume")
        state = torch.load(last_dir / STATE_NAME, weights_only=False)
        changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if state["config"].get(k) != v)
        if changed:
            log(f"resuming with changed options: {', '.join(changed)}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    large = resolve(cfg.large_model)
    tokenizer = AutoTokenizer.from_pretrained(large)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    features = None
    if resume:
        module = LLMModule.from_pretrained(last_dir, large_model=large, source_dtype=cfg.source_dtype,
                                           load_source=not cfg.feature_cache)
    else:
        module = build_module(cfg, tokenizer, load_source=not cfg.feature_cache)
    module.config.extra.update({"format": cfg.format, "loss_on": cfg.loss_on})
    limit = None if module.config.reference_compat else module.generation.position_limit
    train_ex, val_ex = prepare_data(cfg, tokenizer, limit, log)
    if cfg.feature_cache:
        from .features import FeatureCache

        features = FeatureCache.for_training(cfg, train_ex + val_ex, tokenizer, log=log)
        if module.config.fingerprint and not fingerprints_match(module.config.fingerprint, features.fingerprint):
            raise ValueError(f"{cfg.init_from or last_dir}: was trained against a different knowledge source "
                             f"than {large!r}, whose features are cached")
        module.config.fingerprint = features.fingerprint  # no source loaded: record what the features came from
    module.to(device)
    if cfg.gradient_checkpointing:
        module.generation.trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = module.param_groups()
    opt = torch.optim.AdamW(
        [{"params": groups["bridge"], "lr": cfg.lr_bridge, "name": "bridge"},
         {"params": groups["generation"], "lr": cfg.lr_small, "name": "generation"}],
        weight_decay=cfg.weight_decay,
    )
    def epoch_batches(ep: int) -> list[list[list[int]]]:
        """Batches of units (an example, or a packed row of examples) in the order of epoch `ep`."""
        order = epoch_order(len(train_ex), cfg.seed, ep)
        if cfg.packing:
            rows = pack_indices([len(train_ex[i].input_ids) for i in order], effective_max_length(cfg, limit))
            units = [[order[j] for j in row] for row in rows]
        else:
            units = [[i] for i in order]
        return [units[i : i + cfg.batch_size] for i in range(0, len(units), cfg.batch_size)]

    steps_per_epoch = [math.ceil(len(epoch_batches(ep)) / cfg.grad_accum) for ep in range(cfg.epochs)] \
        if cfg.packing else [math.ceil(math.ceil(len(train_ex) / cfg.batch_size) / cfg.grad_accum)] * cfg.epochs
    total_steps = cfg.max_steps or sum(steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    autocast, scaler = autocast_setup(cfg.precision, device)
    pad_id = tokenizer.pad_token_id

    epoch, batch_idx, step = 0, 0, 0
    best, first_val, bad_evals, stopped_early = None, None, 0, False
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, batch_idx, step = state["epoch"], state["batch_idx"], state["step"]
        best, first_val, bad_evals = state["best"], state["first_val"], state["bad_evals"]
        set_rng_state(state["rng"])
        log(f"resumed from {last_dir} at step {step} (epoch {epoch + 1}, batch {batch_idx})")
    metrics = MetricsLog(out_dir, cfg.tensorboard, step if state is not None else None)

    def save_last() -> None:
        st = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
              "batch_idx": batch_idx, "step": step, "best": best, "first_val": first_val,
              "bad_evals": bad_evals, "rng": rng_state(), "config": dataclasses.asdict(cfg)}
        module.save_pretrained(last_dir, write_extra=lambda d: torch.save(st, d / STATE_NAME))

    def validate() -> bool:
        """Evaluate; save `best` on improvement; return True when early stopping triggers."""
        nonlocal best, first_val, bad_evals
        if not val_ex:
            return False
        r = evaluate_loss(module, val_ex, cfg.eval_batch_size, pad_id, features, autocast)
        first_val = r["loss"] if first_val is None else first_val
        metrics.log({"step": step, "epoch": epoch + 1, "val_loss": r["loss"], "val_ppl": r["perplexity"]})
        log(f"step {step}: validation loss {r['loss']:.4f} (perplexity {r['perplexity']:.2f})")
        if best is None or r["loss"] < best - cfg.min_delta:
            best, bad_evals = r["loss"], 0
            module.save_pretrained(best_dir)
        else:
            bad_evals += 1
        return bool(cfg.patience) and bad_evals >= cfg.patience

    if state is None and val_ex:
        validate()  # the starting point of the curve
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    module.train()
    steps_this_call, tokens_seen, t0 = 0, 0, time.perf_counter()
    last_val_step = step if state is None and val_ex else -1
    done = step >= total_steps
    while not done:
        batches = epoch_batches(epoch)
        while batch_idx < len(batches):
            window = batches[batch_idx : batch_idx + cfg.grad_accum]
            collated = [collate_packed([[train_ex[i] for i in u] for u in b], pad_id) if cfg.packing
                        else collate([train_ex[u[0]] for u in b], pad_id) for b in window]
            n_tok = sum(int((c["labels"][:, 1:] != -100).sum()) for c in collated)
            loss_sum = 0.0
            for b, c in zip(window, collated):
                c = {k: v.to(device) for k, v in c.items()}
                src = features.batch([[train_ex[i] for i in u] for u in b], device) if features is not None else None
                with autocast():
                    out = module(c["input_ids"], c["attention_mask"], labels=c["labels"], source_states=src,
                                 return_logits=False, loss_chunk_size=cfg.loss_chunk_size or None)
                # Token-weighted mean over the whole accumulation window.
                loss = out.loss * (out.num_tokens / max(n_tok, 1))
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += float(loss.detach())
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            gnorm = torch.nn.utils.clip_grad_norm_([p for g in groups.values() for p in g], cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            steps_this_call += 1
            batch_idx += len(window)
            tokens_seen += sum(int(c["attention_mask"].sum()) for c in collated)
            tps = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}")
            if step % cfg.log_every == 0 or step == 1:
                metrics.log({"step": step, "epoch": epoch + 1, "loss": loss_sum, "grad_norm": float(gnorm),
                             "lr_bridge": sched.get_last_lr()[0], "lr_small": sched.get_last_lr()[1],
                             "tokens_per_s": tps})
            at_epoch_end = batch_idx >= len(batches)
            if at_epoch_end:
                epoch, batch_idx = epoch + 1, 0
            done = step >= total_steps or (not cfg.max_steps and epoch >= cfg.epochs)
            if (cfg.eval_every and step % cfg.eval_every == 0) or (at_epoch_end and not cfg.eval_every) or done:
                last_val_step = step
                if validate():
                    stopped_early = done = True
            killed = stop_after is not None and steps_this_call >= stop_after
            if done or at_epoch_end or killed or (cfg.save_every and step % cfg.save_every == 0):
                save_last()
            if killed and not done:
                if bar is not None:
                    bar.close()
                metrics.close()
                return TrainResult(str(out_dir), step, best, first_val, False, metrics.records())
            if done or at_epoch_end:
                break
    if bar is not None:
        bar.close()
    metrics.close()
    records = metrics.records()
    plot_losses(records, out_dir / "loss_curve.png")
    log(f"done: {step} steps; best validation loss {best if best is None else round(best, 4)}; "
        f"checkpoints in {best_dir} and {last_dir}")
    return TrainResult(str(out_dir), step, best, first_val, stopped_early, records)


def build_feature_cache(cfg: TrainConfig, log: Callable[[str], None] = print) -> Any:
    """`llm-modules cache`: run the knowledge source once over the recipe's filtered, split data."""
    from transformers import AutoConfig, AutoTokenizer

    from .features import FeatureCache

    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.large_model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = None
    if not cfg.init_from:  # a converted reference module is cut, not filtered, at its limit
        small = AutoConfig.from_pretrained(resolve(cfg.small_model))
        limit = getattr(small, "max_position_embeddings", None) or getattr(small, "n_positions", None)
    train_ex, val_ex = prepare_data(cfg, tokenizer, limit, log)
    return FeatureCache.for_training(cfg, train_ex + val_ex, tokenizer, log=log)
