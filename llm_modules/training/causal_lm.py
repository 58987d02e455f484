"""A plain transformers causal LM behind the Trainer's interface (the demo's pretraining and baselines).

Same loop, same loss convention (mean next-token cross-entropy over labelled positions) as an
LLM Module, so the systems of a comparison differ only in the model. With a teacher, the loss is
logit distillation on the labelled positions: alpha * CE + (1 - alpha) * T^2 * KL(teacher || student).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..io import atomic_dir
from ..loss import shifted_loss
from ..model import ModuleOutput


class CausalLMTrainee(nn.Module):
    """Wraps `model` (a *ForCausalLM) so `Trainer` and `evaluate_loss` can run it."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, teacher: PreTrainedModel | None = None,
                 kd_temperature: float = 2.0, kd_alpha: float = 0.5):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
        self.kd_temperature, self.kd_alpha = kd_temperature, kd_alpha

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "CausalLMTrainee":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"bridge": [], "generation": [p for p in self.model.parameters() if p.requires_grad]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, *,
                source_states: Tensor | None = None, return_logits: bool = True,
                loss_chunk_size: int | None = None, answer_mask: Tensor | None = None,
                source_top: Any = None) -> ModuleOutput:
        """Mean next-token loss over labelled positions (source_states, loss_chunk_size, answer_mask and source_top
        are LLM Module inputs, unused here)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        out = ModuleOutput(logits=logits if return_logits else None)
        if labels is None:
            return out
        out.loss, out.num_tokens = shifted_loss(labels, logits=logits)
        if self.teacher is not None and out.num_tokens:
            out.loss = self.kd_alpha * out.loss + (1 - self.kd_alpha) * self._kd(input_ids, attention_mask, labels, logits)
        return out

    def _kd(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, logits: Tensor) -> Tensor:
        with torch.no_grad():
            t_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        keep = labels[:, 1:] != -100
        T = self.kd_temperature
        s = F.log_softmax(logits[:, :-1][keep].float() / T, -1)
        t = F.log_softmax(t_logits[:, :-1][keep].float() / T, -1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T

    def save_pretrained(self, path: str | os.PathLike, write_extra: Callable[[Path], None] | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> None:
        """A normal transformers folder (model + tokenizer), written atomically."""
        if state_dict is not None:  # gathered from shards: keys of this wrapper, "model." first
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(str(tmp), state_dict=state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            if write_extra is not None:
                write_extra(tmp)
