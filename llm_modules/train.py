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

from .data import DataReport, Example, Formatter, collate, collate_packed, load_examples, pack_indices, split_examples
from .evaluate import evaluate_loss
from .fixtures import resolve
from .io import atomic_write, atomic_write_text
from .config import ModuleConfig
from .model import LLMModule
from .source import fingerprints_match, load_tokenizer

STATE_NAME = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Every option of a training run; a recipe YAML sets these keys, `--key value` overrides them."""

    # model
    large_model: str = "tiny:large_qwen2"
    """Knowledge source: hub id or local path (`tiny:NAME` = a locally generated fixture)."""
    small_model: str = "tiny:small_gpt_neo"
    """Generation module trunk: hub id or local path."""
    init_from: str | None = None
    """Start from a saved llm-modules folder (e.g. a converted reference checkpoint) instead of building."""
    # The module's own hyper-parameters: defaults and meaning as in ModuleConfig.
    init_small: str = ModuleConfig.init_small
    causal: bool = ModuleConfig.causal
    source_dtype: str = ModuleConfig.source_dtype
    source_layer: int = ModuleConfig.source_layer
    num_layers: int = ModuleConfig.num_layers
    num_heads: int = ModuleConfig.num_heads
    adapter_dim: int = ModuleConfig.adapter_dim
    intermediate_dim: int | None = ModuleConfig.intermediate_dim
    dropout: float = ModuleConfig.dropout
    gate_init: str = ModuleConfig.gate_init
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
    """Free-form metadata of the run (a description, links); stored with the trainer state, not used."""

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
                 ) -> tuple[list[Example], list[Example], DataReport]:
    """Load, format, length-filter and split; returns (train, validation, report)."""
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
    return train, val, report


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
        from transformers import AutoConfig

        from .model import load_trunk

        tokenizer = tokenizer or load_tokenizer(large)
        mcfg = ModuleConfig(large_model=large, small_model=small, vocab_size=len(tokenizer), **cfg.module_kwargs())
        return LLMModule(mcfg, load_trunk(small, cfg.init_small), None,
                         source_hidden_size=AutoConfig.from_pretrained(large).hidden_size, tokenizer=tokenizer)
    return LLMModule.build(large, small, tokenizer=tokenizer, **cfg.module_kwargs())


def _mixed_precision(precision: str, use_cpu: bool) -> str:
    """Accelerate's mixed_precision for our `precision` option."""
    if precision == "auto":
        if use_cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a training run; returns where it wrote and what it measured.

    Runs on one device, or on several processes under `accelerate launch` / `torchrun` (DDP: each
    rank takes its share of every global batch of batch_size x world_size units; the frozen source
    is replicated and never takes part in gradient synchronisation). Checkpoints are written by the
    main process and resume at any world size. `stop_after` ends the run after that many optimiser
    steps in this call, as a kill would (used to test exact resume).
    """
    from accelerate import Accelerator
    
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # Accelerate keeps one state per process; a later run in the same process (a notebook, the demo,
    # tests) may want another precision. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=_mixed_precision(cfg.precision, use_cpu), cpu=use_cpu)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    say = log if main else (lambda s: None)
    out_dir = Path(cfg.output_dir)
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    state = None
    if resume:
        if not (last_dir / STATE_NAME).exists():
            raise FileNotFoundError(f"{last_dir}: nothing to resume (no {STATE_NAME}); run without --resume")
        # Our own file; it holds RNG states (numpy arrays, tuples) that weights_only cannot load.
        state = torch.load(last_dir / STATE_NAME, weights_only=False)
        changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if state["config"].get(k) != v)
        if changed:
            say(f"resuming with changed options: {', '.join(changed)}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    large = resolve(cfg.large_model)
    tokenizer = load_tokenizer(large)
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
    train_ex, val_ex, report = prepare_data(cfg, tokenizer, limit, say)
    # What inference defaults to: the prompt format and the system prompt the module was trained with.
    module.config.extra.update({"system_prompt": report.common_system()})
    if cfg.feature_cache:
        from .features import FeatureCache

        features = FeatureCache.for_training(cfg, train_ex + val_ex, tokenizer, log=say, rank=rank,
                                             world_size=world, barrier=acc.wait_for_everyone)
        if module.config.fingerprint and not fingerprints_match(module.config.fingerprint, features.fingerprint):
            raise ValueError(f"{cfg.init_from or last_dir}: was trained against a different knowledge source "
                             f"than {large!r}, whose features are cached")
        module.config.fingerprint = features.fingerprint  # no source loaded: record what the features came from
    if cfg.gradient_checkpointing:
        trunk = module.generation.trunk
        if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5.2 name
            trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = module.param_groups()
    opt = torch.optim.AdamW(
        [{"params": groups["bridge"], "lr": cfg.lr_bridge, "name": "bridge"},
         {"params": groups["generation"], "lr": cfg.lr_small, "name": "generation"}],
        weight_decay=cfg.weight_decay,
    )
    if world > 1 and module.source is not None:
        # The frozen source is identical on every rank: keep it out of DDP's start-up broadcast.
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, _ in module.named_parameters() if n.startswith("source.")]
        frozen += [n for n, _ in module.named_buffers() if n.startswith("source.")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    model, opt = acc.prepare(module, opt)
    device = acc.device
    global_batch = cfg.batch_size * world

    def epoch_units(ep: int) -> list[list[int]]:
        """Units (an example, or a packed row of examples) in the order of epoch `ep`; a function of (seed, ep) only."""
        order = epoch_order(len(train_ex), cfg.seed, ep)
        if not cfg.packing:
            return [[i] for i in order]
        rows = pack_indices([len(train_ex[i].input_ids) for i in order], effective_max_length(cfg, limit))
        return [[order[j] for j in row] for row in rows]

    def steps_in(ep: int) -> int:
        n = len(epoch_units(ep)) if cfg.packing else len(train_ex)
        return math.ceil(math.ceil(n / global_batch) / cfg.grad_accum)

    total_steps = cfg.max_steps or sum(steps_in(ep) for ep in range(cfg.epochs))
    # Not prepared: accelerate would step it once per process.
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lr_lambda(cfg, total_steps))
    pad_id = tokenizer.pad_token_id

    epoch, pos, step = 0, 0, 0  # pos: units of the current epoch already consumed (world-size independent)
    best, first_val, bad_evals, stopped_early = None, None, 0, False
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        epoch, pos, step = state["epoch"], state["pos"], state["step"]
        best, first_val, bad_evals = state["best"], state["first_val"], state["bad_evals"]
        rngs = state["rng"]
        if len(rngs) != world:
            say(f"resuming on {world} process(es) from a run on {len(rngs)}: RNG streams restart from rank 0's")
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        say(f"resumed from {last_dir} at step {step} (epoch {epoch + 1}, {pos} units into it)")
    metrics = MetricsLog(out_dir, cfg.tensorboard and main, step if state is not None else None) if main else None

    def log_metrics(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.log(record)

    def gather_rng() -> list[dict[str, Any]]:
        if world == 1:
            return [rng_state()]
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, rng_state())
        return out

    def full_state() -> dict[str, torch.Tensor] | None:
        """Under FSDP / DeepSpeed the weights are sharded: gather them (a collective, every rank calls it)."""
        from accelerate.utils import DistributedType

        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return acc.get_state_dict(model)
        return None

    def save_last() -> None:
        rngs = gather_rng()
        weights = full_state()
        if main:
            st = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "epoch": epoch,
                  "pos": pos, "step": step, "best": best, "first_val": first_val, "bad_evals": bad_evals,
                  "rng": rngs, "world_size": world, "config": dataclasses.asdict(cfg)}
            acc.unwrap_model(model).save_pretrained(last_dir, write_extra=lambda d: torch.save(st, d / STATE_NAME),
                                                    state_dict=weights)
        acc.wait_for_everyone()

    def validate() -> bool:
        """Evaluate (each rank its share, then summed); save `best` on improvement; True when early stopping triggers."""
        nonlocal best, first_val, bad_evals
        if not val_ex:
            return False
        share = val_ex[rank::world]
        r = evaluate_loss(acc.unwrap_model(model), share, cfg.eval_batch_size, pad_id, features, acc.autocast) \
            if share else {"loss": 0.0, "tokens": 0}
        tot = acc.reduce(torch.tensor([r["loss"] * r["tokens"], float(r["tokens"])], device=device), "sum")
        loss = float(tot[0] / tot[1].clamp(min=1))
        first_val = loss if first_val is None else first_val
        log_metrics({"step": step, "epoch": epoch + 1, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
        say(f"step {step}: validation loss {loss:.4f} (perplexity {math.exp(min(loss, 50.0)):.2f})")
        if best is None or loss < best - cfg.min_delta:
            best, bad_evals = loss, 0
            weights = full_state()
            if main:
                acc.unwrap_model(model).save_pretrained(best_dir, state_dict=weights)
            acc.wait_for_everyone()
        else:
            bad_evals += 1
        return bool(cfg.patience) and bad_evals >= cfg.patience

    if state is None and val_ex:
        validate()  # the starting point of the curve
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    steps_this_call, tokens_seen, t0 = 0, 0, time.perf_counter()
    done = step >= total_steps
    params = [p for g in groups.values() for p in g]
    while not done:
        units = epoch_units(epoch)
        while pos < len(units):
            # One optimiser step: grad_accum global batches; this rank takes its slice of each.
            window = [units[pos + k * global_batch : pos + (k + 1) * global_batch] for k in range(cfg.grad_accum)]
            window = [g for g in window if g]
            mine = [g[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for g in window]
            # A rank left without data in a short last batch runs a zero-weight copy (DDP needs every rank).
            batches = [(m, 1.0) if m else (g[:1], 0.0) for m, g in zip(mine, window)]
            collated = [(collate_packed([[train_ex[i] for i in u] for u in b], pad_id) if cfg.packing
                         else collate([train_ex[u[0]] for u in b], pad_id), w) for b, w in batches]
            n_local = sum(int((c["labels"][:, 1:] != -100).sum()) * w for c, w in collated)
            n_tok = float(acc.reduce(torch.tensor(float(n_local), device=device), "sum"))
            loss_sum = 0.0
            for k, ((b, w), (c, _)) in enumerate(zip(batches, collated)):
                c = {key: v.to(device) for key, v in c.items()}
                src = features.batch([[train_ex[i] for i in u] for u in b], device) if features is not None else None
                sync = contextlib.nullcontext() if k == len(batches) - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        out = model(c["input_ids"], c["attention_mask"], labels=c["labels"], source_states=src,
                                    return_logits=False, loss_chunk_size=cfg.loss_chunk_size or None)
                    # Token-weighted mean over the global window; DDP averages over ranks, so scale by world.
                    loss = out.loss * (w * out.num_tokens / max(n_tok, 1.0))
                    acc.backward(loss * world)
                loss_sum += float(loss.detach())
            gnorm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loss_sum = float(acc.reduce(torch.tensor(loss_sum, device=device), "sum"))
            step += 1
            steps_this_call += 1
            pos += sum(len(g) for g in window)
            tokens_seen += sum(int(c["attention_mask"].gt(0).sum()) for c, w in collated if w) * world
            tps = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}")
            if step % cfg.log_every == 0 or step == 1:
                log_metrics({"step": step, "epoch": epoch + 1, "loss": loss_sum, "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                             "lr_bridge": sched.get_last_lr()[0], "lr_small": sched.get_last_lr()[1],
                             "tokens_per_s": tps})
            at_epoch_end = pos >= len(units)
            if at_epoch_end:
                epoch, pos = epoch + 1, 0
            done = step >= total_steps or (not cfg.max_steps and epoch >= cfg.epochs)
            if (cfg.eval_every and step % cfg.eval_every == 0) or (at_epoch_end and not cfg.eval_every) or done:
                if validate():
                    stopped_early = done = True
            killed = stop_after is not None and steps_this_call >= stop_after
            if done or at_epoch_end or killed or (cfg.save_every and step % cfg.save_every == 0):
                save_last()
            if killed and not done:
                if bar is not None:
                    bar.close()
                records = metrics.records() if metrics is not None else []
                if metrics is not None:
                    metrics.close()
                return TrainResult(str(out_dir), step, best, first_val, False, records)
            if done or at_epoch_end:
                break
    if bar is not None:
        bar.close()
    records: list[dict[str, Any]] = []
    if metrics is not None:
        metrics.close()
        records = metrics.records()
        plot_losses(records, out_dir / "loss_curve.png")
    say(f"done: {step} steps; best validation loss {best if best is None else round(best, 4)}; "
        f"checkpoints in {best_dir} and {last_dir}")
    acc.wait_for_everyone()
    return TrainResult(str(out_dir), step, best, first_val, stopped_early, records)


def build_feature_cache(cfg: TrainConfig, log: Callable[[str], None] = print) -> Any:
    """`llm-modules cache`: run the knowledge source once over the recipe's filtered, split data."""
    from transformers import AutoConfig

    from .features import FeatureCache

    tokenizer = load_tokenizer(resolve(cfg.large_model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = None
    if not cfg.init_from:  # a converted reference module is cut, not filtered, at its limit
        small = AutoConfig.from_pretrained(resolve(cfg.small_model))
        limit = getattr(small, "max_position_embeddings", None) or getattr(small, "n_positions", None)
    train_ex, val_ex, _ = prepare_data(cfg, tokenizer, limit, log)
    return FeatureCache.for_training(cfg, train_ex + val_ex, tokenizer, log=log)
