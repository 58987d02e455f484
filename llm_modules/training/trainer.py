"""The training loop: AdamW with bridge / small-model groups, warm-up + cosine, accumulation,
clipping, autocast, validation + early stopping, atomic best/last checkpoints and exact resume.

    llm-modules train --config recipes/tiny.yaml                 # CPU, under a minute
    llm-modules train --config recipes/paper.yaml --batch_size 4 # one GPU
    llm-modules train --config recipes/tiny.yaml --resume        # continue from runs/.../last
    torchrun --nproc_per_node 8 -m llm_modules.cli train --config recipes/paper.yaml   # DDP

`Trainer(cfg).fit()` runs setup -> (restore) -> step / validate / save -> close. The model is an
LLMModule built from the recipe, or any model with the same training interface (see `Trainee`),
e.g. the demo's plain causal LMs.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..data import collate, collate_packed, pack_indices, pad_id
from ..loss import evaluate_loss
from ..io import recover_dir
from .checkpoint import read_trainer_state, rng_state, set_rng_state, write_trainer_state
from .metrics import MetricsLog, plot_losses
from .pipeline import RunInputs, prepare_run
from .recipe import TrainConfig


class Trainee(Protocol):
    """What the Trainer needs of a model (LLMModule has all of it)."""

    def __call__(self, input_ids: Any, attention_mask: Any, *, labels: Any, source_states: Any = None,
                 return_logits: bool = False, loss_chunk_size: int | None = None, answer_mask: Any = None,
                 source_top: Any = None) -> Any: ...
    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]: ...
    def save_pretrained(self, path: Any, write_extra: Callable[[Path], None] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None: ...


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    best_val_loss: float | None
    first_val_loss: float | None
    stopped_early: bool
    records: list[dict[str, Any]]


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine down to min_lr_ratio."""
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of (seed, epoch) only, so resume can rebuild it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _mixed_precision(precision: str, use_cpu: bool) -> str:
    """Accelerate's mixed_precision for our `precision` option."""
    if precision == "auto":
        if use_cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


class Trainer:
    """One training run. Give `inputs` to train a model of your own (it must be a `Trainee`);
    otherwise the recipe's module, data and features are prepared in `setup`."""

    def __init__(self, cfg: TrainConfig, *, log: Callable[[str], None] = print, inputs: RunInputs | None = None,
                 desc: str = "train"):
        self.cfg, self.log, self.given, self.desc = cfg, log, inputs, desc
        self.out_dir = Path(cfg.output_dir)
        self.last_dir, self.best_dir = self.out_dir / "last", self.out_dir / "best"
        self.epoch = self.pos = self.step_count = self.bad_evals = 0
        self.best: float | None = None
        self.first_val: float | None = None
        self.stopped_early = False
        self.last_val: float | None = None
        self.bar: Any = None
        self.metrics: MetricsLog | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        # Accelerate keeps one state per process; a later run in the same process (a notebook, the
        # demo, tests) may want another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = acc = Accelerator(mixed_precision=_mixed_precision(cfg.precision, use_cpu), cpu=use_cpu)
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.say = self.log if self.main else (lambda s: None)
        if resume:
            for folder in (self.last_dir, self.best_dir):  # either may have been mid-save when the run was killed
                if self.main and recover_dir(folder):
                    self.say(f"{folder}: put back the checkpoint a kill left aside mid-save")
            acc.wait_for_everyone()
        saved = read_trainer_state(self.last_dir) if resume else None
        if saved is not None:
            changed = sorted(k for k, v in cfg.to_recipe().items() if saved["config"].get(k) != v)
            if changed:
                self.say(f"resuming with changed options: {', '.join(changed)}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.inputs = self.given or prepare_run(cfg, resume_from=self.last_dir if resume else None, log=self.say,
                                                rank=self.rank, world_size=self.world, barrier=acc.wait_for_everyone)
        self.train_ex, self.val_ex, self.features = self.inputs.train, self.inputs.val, self.inputs.features
        self.pad = pad_id(self.inputs.tokenizer)
        # Only models that distil get the options (a plain causal LM trainee has its own teacher).
        self.loss_options = ({"distill_weight": cfg.distill_weight, "distill_temperature": cfg.distill_temperature}
                             if cfg.distill_weight else {})
        self._prepare_model(self.inputs.module)
        self.total_steps = cfg.max_steps or sum(self._steps_in(ep) for ep in range(cfg.epochs))
        # Not prepared: accelerate would step it once per process.
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt.optimizer, lr_lambda(cfg, self.total_steps))
        if saved is not None:
            self.restore(saved)
        if self.main:
            self.metrics = MetricsLog(self.out_dir, cfg.tensorboard, self.step_count if saved is not None else None)

    def _prepare_model(self, module: Any) -> None:
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            trunk = module.generation.trunk
            if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = module.param_groups()
        self.params = [p for g in groups.values() for p in g]
        opt = torch.optim.AdamW(
            [{"params": groups["bridge"], "lr": cfg.lr_bridge, "name": "bridge"},
             {"params": groups["generation"], "lr": cfg.lr_small, "name": "generation"}],
            weight_decay=cfg.weight_decay,
        )
        if self.world > 1 and getattr(module, "source", None) is not None:
            # The frozen source is identical on every rank: keep it out of DDP's start-up broadcast.
            from torch.nn.parallel import DistributedDataParallel

            frozen = [n for n, _ in module.named_parameters() if n.startswith("source.")]
            frozen += [n for n, _ in module.named_buffers() if n.startswith("source.")]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        self.model, self.opt = self.acc.prepare(module, opt)

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a saved state: optimiser, schedule, scaler, data position, RNG streams."""
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        if self.acc.scaler is not None and saved.get("scaler"):
            self.acc.scaler.load_state_dict(saved["scaler"])
        self.epoch, self.pos, self.step_count = saved["epoch"], saved["pos"], saved["step"]
        self.best, self.first_val, self.bad_evals = saved.get("best"), saved.get("first_val"), saved.get("bad_evals", 0)
        rngs = saved["rng"]
        if len(rngs) != self.world:
            self.say(f"resuming on {self.world} process(es) from a run on {len(rngs)}: RNG streams restart from rank 0's")
        set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        self.say(f"resumed from {self.last_dir} at step {self.step_count} (epoch {self.epoch + 1}, {self.pos} units into it)")

    # -- data order ------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    def epoch_units(self, ep: int) -> list[list[int]]:
        """Units (an example, or a packed row of examples) in the order of epoch `ep`; a function of (seed, ep) only."""
        order = epoch_order(len(self.train_ex), self.cfg.seed, ep)
        if not self.cfg.packing:
            return [[i] for i in order]
        rows = pack_indices([len(self.train_ex[i].input_ids) for i in order], self.inputs.max_length)
        return [[order[j] for j in row] for row in rows]

    def _steps_in(self, ep: int) -> int:
        n = len(self.epoch_units(ep)) if self.cfg.packing else len(self.train_ex)
        return math.ceil(math.ceil(n / self.global_batch) / self.cfg.grad_accum)

    def _window(self, units: list[list[int]]) -> tuple[list[tuple[list[list[int]], float]], int]:
        """This rank's (batch, weight) pairs for the next optimiser step (grad_accum global batches,
        its slice of each), and how many units the step consumes on all ranks together.

        A rank left without data in a short last batch runs a zero-weight copy (DDP needs every rank).
        """
        cfg, g = self.cfg, self.global_batch
        window = [units[self.pos + k * g : self.pos + (k + 1) * g] for k in range(cfg.grad_accum)]
        window = [w for w in window if w]
        mine = [w[self.rank * cfg.batch_size : (self.rank + 1) * cfg.batch_size] for w in window]
        return [(m, 1.0) if m else (w[:1], 0.0) for m, w in zip(mine, window)], sum(len(w) for w in window)

    def _collate(self, batch: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        if self.cfg.packing:
            return collate_packed([[self.train_ex[i] for i in u] for u in batch], self.pad)
        return collate([self.train_ex[u[0]] for u in batch], self.pad)

    # -- one optimiser step -----------------------------------------------------------------------
    def step(self, batches: list[tuple[list[list[int]], float]]) -> tuple[float, float, int]:
        """Forward/backward over the window, clip, optimiser and schedule step; (loss, grad norm, tokens)."""
        acc, cfg, device = self.acc, self.cfg, self.acc.device
        collated = [(self._collate(b), w) for b, w in batches]
        n_local = sum(int((c["labels"][:, 1:] != -100).sum()) * w for c, w in collated)
        n_tok = float(acc.reduce(torch.tensor(float(n_local), device=device), "sum"))
        loss_sum = 0.0
        for k, ((b, w), (c, _)) in enumerate(zip(batches, collated)):
            c = {key: v.to(device) for key, v in c.items()}
            src, top = None, None
            if self.features is not None:
                rows = [[self.train_ex[i] for i in u] for u in b]
                src, top = self.features.batch(rows, device), self.features.top(rows, device)
            sync = contextlib.nullcontext() if k == len(batches) - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    out = self.model(c["input_ids"], c["attention_mask"], labels=c["labels"], source_states=src,
                                     return_logits=False, loss_chunk_size=cfg.loss_chunk_size or None,
                                     answer_mask=c["answer_mask"], source_top=top, **self.loss_options)
                # Token-weighted mean over the global window; DDP averages over ranks, so scale by world.
                loss = out.loss * (w * out.num_tokens / max(n_tok, 1.0))
                acc.backward(loss * self.world)
            loss_sum += float(loss.detach())
        gnorm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        loss_sum = float(acc.reduce(torch.tensor(loss_sum, device=device), "sum"))
        tokens = sum(int(c["attention_mask"].gt(0).sum()) for c, w in collated if w) * self.world
        return loss_sum, float(gnorm) if gnorm is not None else float("nan"), tokens

    # -- validation and checkpoints ---------------------------------------------------------------
    def validate(self) -> bool:
        """Evaluate (each rank its share, then summed); save `best` on improvement; True when early stopping triggers."""
        if not self.val_ex:
            return False
        share = self.val_ex[self.rank :: self.world]
        r = {"loss": 0.0, "tokens": 0}
        if share:
            r = evaluate_loss(self.acc.unwrap_model(self.model), share, self.cfg.eval_batch_size, self.pad,
                              self.features, self.acc.autocast)
        tot = self.acc.reduce(torch.tensor([r["loss"] * r["tokens"], float(r["tokens"])], device=self.acc.device), "sum")
        loss = float(tot[0] / tot[1].clamp(min=1))
        self.first_val = loss if self.first_val is None else self.first_val
        ppl = math.exp(min(loss, 50.0))
        self._log_metrics({"step": self.step_count, "epoch": self.epoch + 1, "val_loss": loss, "val_ppl": ppl})
        self.last_val = loss
        if self.bar is None:
            self.say(f"step {self.step_count}: validation loss {loss:.4f} (perplexity {ppl:.2f})")
        if self.best is None or loss < self.best - self.cfg.min_delta:
            self.best, self.bad_evals = loss, 0
            self.save(self.best_dir)
        else:
            self.bad_evals += 1
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP / DeepSpeed the weights are sharded: gather them (a collective, every rank calls it)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return self.acc.get_state_dict(self.model)
        return None

    def _gather_rng(self) -> list[dict[str, Any]]:
        if self.world == 1:
            return [rng_state()]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, rng_state())
        return out

    def save(self, folder: Path, with_state: bool = False) -> None:
        """Write the weights (and, for `last`, the trainer state) atomically; every rank calls it."""
        rngs = self._gather_rng() if with_state else None
        weights = self._full_state()
        if self.main:
            extra = None
            if with_state:
                state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                         "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                         "epoch": self.epoch, "pos": self.pos, "step": self.step_count, "best": self.best,
                         "first_val": self.first_val, "bad_evals": self.bad_evals, "rng": rngs,
                         "world_size": self.world, "config": self.cfg.to_recipe()}
                extra = lambda d: write_trainer_state(d, state)  # noqa: E731
            self.acc.unwrap_model(self.model).save_pretrained(folder, write_extra=extra, state_dict=weights)
        self.acc.wait_for_everyone()

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run (or resume) the whole run. `stop_after` ends it after that many optimiser steps of
        this call, saving `last`, as a kill would (used to test exact resume)."""
        self.setup(resume)
        try:
            if not resume and self.val_ex:
                self.validate()  # the starting point of the curve
            if self.cfg.progress and self.main:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.total_steps, initial=self.step_count, desc=self.desc, dynamic_ncols=True)
            self._run(stop_after)
        finally:
            records = self.close()
        return TrainResult(str(self.out_dir), self.step_count, self.best, self.first_val, self.stopped_early, records)

    def _run(self, stop_after: int | None) -> None:
        cfg, steps_this_call, tokens_seen, t0 = self.cfg, 0, 0, time.perf_counter()
        self.model.train()
        done = self.step_count >= self.total_steps
        while not done:
            units = self.epoch_units(self.epoch)
            while self.pos < len(units):
                batches, consumed = self._window(units)
                loss, gnorm, tokens = self.step(batches)
                self.step_count, self.pos, steps_this_call = self.step_count + 1, self.pos + consumed, steps_this_call + 1
                tokens_seen += tokens
                self._report(loss, gnorm, tokens_seen / max(time.perf_counter() - t0, 1e-9))
                at_epoch_end = self.pos >= len(units)
                if at_epoch_end:
                    self.epoch, self.pos = self.epoch + 1, 0
                done = self.step_count >= self.total_steps or (not cfg.max_steps and self.epoch >= cfg.epochs)
                if (cfg.eval_every and self.step_count % cfg.eval_every == 0) or (at_epoch_end and not cfg.eval_every) or done:
                    if self.validate():
                        self.stopped_early = done = True
                killed = stop_after is not None and steps_this_call >= stop_after
                if done or at_epoch_end or killed or (cfg.save_every and self.step_count % cfg.save_every == 0):
                    self.save(self.last_dir, with_state=True)
                if killed and not done:
                    return
                if done or at_epoch_end:
                    break

    def _report(self, loss: float, gnorm: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            val = "" if self.last_val is None else f" val={self.last_val:.3f}"
            self.bar.set_postfix_str(f"loss={loss:.3f}{val} tok/s={tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)
        if self.step_count % self.cfg.log_every == 0 or self.step_count == 1:
            lrs = self.sched.get_last_lr()
            self._log_metrics({"step": self.step_count, "epoch": self.epoch + 1, "loss": loss, "grad_norm": gnorm,
                               "lr_bridge": lrs[0], "lr_small": lrs[1], "tokens_per_s": tokens_per_s})

    def close(self) -> list[dict[str, Any]]:
        """Close the bar and logs, plot the losses; the records logged."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        records: list[dict[str, Any]] = []
        if self.metrics is not None:
            self.metrics.close()
            records = self.metrics.records()
            if records:
                plot_losses(records, self.out_dir / "loss_curve.png")
        if getattr(self, "acc", None) is not None and self.step_count >= getattr(self, "total_steps", 1):
            best = None if self.best is None else round(self.best, 4)
            self.say(f"done: {self.step_count} steps; best validation loss {best}; "
                     f"checkpoints in {self.best_dir} and {self.last_dir}")
        return records


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a training run from a recipe; returns where it wrote and what it measured.

    Runs on one device, or on several processes under `accelerate launch` / `torchrun` (DDP: each
    rank takes its share of every global batch of batch_size x world_size units; the frozen source
    is replicated and never takes part in gradient synchronisation). Checkpoints are written by the
    main process and resume at any world size.
    """
    return Trainer(cfg, log=log).fit(resume=resume, stop_after=stop_after)

