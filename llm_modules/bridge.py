"""The bridge: projections, intermediate MLP and Enhanced Cross-Attention layers.

Data flow (widths: L = knowledge source, S = generation module):

    P = pre_proj(H)                      # [B, T, L]  source states, re-projected
    stream = intermediate(P)             # [B, T, S]
    for layer in layers:                 # Enhanced Cross-Attention
        stream = stream + layer(P, stream)
    inputs_embeds = stream + proj(P)     # [B, T, S]

Each layer: cross-attention (queries from the stream, keys/values from P, LayerNorm on both
inputs), an adapter (Linear-GELU-Linear-LayerNorm + residual) and a gate g = sigmoid(W[x; a])
returning g * a + (1 - g) * x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import cross_attention_mask, prompt_limits


class CrossAttention(nn.Module):
    """Multi-head attention: queries from the small-width stream, keys/values from source states."""

    def __init__(self, stream_dim: int, source_dim: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if stream_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the small width {stream_dim}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_source = nn.LayerNorm(source_dim)
        self.norm_stream = nn.LayerNorm(stream_dim)
        self.q_proj = nn.Linear(stream_dim, stream_dim)
        self.k_proj = nn.Linear(source_dim, stream_dim)
        self.v_proj = nn.Linear(source_dim, stream_dim)
        self.out_proj = nn.Linear(stream_dim, stream_dim)
        # A key bias adds q.b to every score of a query alike, which softmax cancels: its gradient is
        # exactly zero and Adam would only amplify rounding noise. Kept (reference checkpoints carry
        # it) but not trained.
        self.k_proj.bias.requires_grad_(False)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

    def source_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, Ts, Dh] of source states; cacheable, as they depend on nothing else."""
        s = self.norm_source(source)
        return self._heads(self.k_proj(s)), self._heads(self.v_proj(s))

    def forward(self, stream: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        q = self._heads(self.q_proj(self.norm_stream(stream)))
        k, v = kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        B, H, T, Dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


class Adapter(nn.Module):
    """Extra non-linear transform of the attended states: LayerNorm(fc2(GELU(fc1(a)))) + a."""

    def __init__(self, dim: int, adapter_dim: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(dim, adapter_dim)
        self.fc2 = nn.Linear(adapter_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, a: Tensor) -> Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(a)))) + a


class Gate(nn.Module):
    """g = sigmoid(W [x; a]); returns g * a + (1 - g) * x, blending knowledge into the stream."""

    def __init__(self, dim: int, init: str = "paper"):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.init = init
        self.reset_gate()

    def reset_gate(self) -> None:
        if self.init == "closed":
            # Start (almost) shut: the stream passes through unchanged until training opens it.
            nn.init.zeros_(self.proj.weight)
            nn.init.constant_(self.proj.bias, -4.0)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        g = torch.sigmoid(self.proj(torch.cat([x, a], dim=-1)))
        return g * a + (1 - g) * x


class EnhancedCrossAttention(nn.Module):
    """Cross-attention -> adapter -> gate (the paper's three parts of one bridge layer)."""

    def __init__(
        self,
        stream_dim: int,
        source_dim: int,
        num_heads: int = 8,
        adapter_dim: int = 256,
        dropout: float = 0.1,
        gate_init: str = "paper",
    ):
        super().__init__()
        self.cross_attn = CrossAttention(stream_dim, source_dim, num_heads, dropout)
        self.adapter = Adapter(stream_dim, adapter_dim)
        self.gate = Gate(stream_dim, gate_init)

    def forward(self, stream: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        a = self.adapter(self.cross_attn(stream, kv, mask))
        return self.gate(stream, a)


class Bridge(nn.Module):
    """Maps knowledge-source states [B, T, L] to the generation module's inputs_embeds [B, T, S]."""

    def __init__(
        self,
        source_dim: int,
        stream_dim: int,
        num_layers: int = 2,
        num_heads: int = 8,
        adapter_dim: int = 256,
        intermediate_dim: int | None = None,
        dropout: float = 0.1,
        gate_init: str = "paper",
        causal: bool = True,
    ):
        super().__init__()
        mid = intermediate_dim or (source_dim + stream_dim) // 2
        self.causal = causal
        self.pre_proj = nn.Linear(source_dim, source_dim)
        self.proj = nn.Linear(source_dim, stream_dim)
        self.intermediate = nn.Sequential(
            nn.Linear(source_dim, mid),
            nn.LayerNorm(mid),
            nn.GELU(),
            nn.Linear(mid, stream_dim),
            nn.LayerNorm(stream_dim),
        )
        self.layers = nn.ModuleList(
            EnhancedCrossAttention(stream_dim, source_dim, num_heads, adapter_dim, dropout, gate_init)
            for _ in range(num_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_proj.weight.dtype

    def project_source(self, source_states: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """P = pre_proj(H) and each layer's cross-attention keys/values over it."""
        # transformers 5 may run the source in bf16: compute the bridge in its own dtype.
        p = self.pre_proj(source_states.to(self.dtype))
        return p, [layer.cross_attn.source_kv(p) for layer in self.layers]

    def stream(self, p: Tensor | None, kvs: list[tuple[Tensor, Tensor]], mask: Tensor | None,
               answer_embeds: Tensor | None = None, answer: Tensor | None = None) -> Tensor:
        """Run the stream for queries at the positions of `p` against cached keys/values `kvs`.

        Prompt conditioning: positions inside an answer (`answer` True) start from `answer_embeds`
        (the module's own token embeddings) instead of the source's states and take no proj(P)
        residual; `p` is None when every query is an answer token (decoding: no source step).
        """
        if p is None:
            s = answer_embeds
        else:
            s = self.intermediate(p)
            if answer is not None:
                s = torch.where(answer[..., None], answer_embeds.to(s.dtype), s)
        for layer, kv in zip(self.layers, kvs):
            s = s + layer(s, kv, mask)
        if p is None:
            return s
        residual = self.proj(p)
        return s + (residual if answer is None else residual.masked_fill(answer[..., None], 0.0))

    def cross_mask(self, attention_mask: Tensor, answer_mask: Tensor | None = None) -> Tensor:
        """[B, 1, T, T]: the source positions each position reads (see `forward`)."""
        limit = prompt_limits(answer_mask) if answer_mask is not None else None
        return cross_attention_mask(attention_mask, attention_mask.shape[1], causal=self.causal, key_limit=limit)

    def forward(self, source_states: Tensor, attention_mask: Tensor | None = None, answer_mask: Tensor | None = None,
                answer_embeds: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """`attention_mask` [B, T]: 0 = padding, else 1 (or segment ids for packed rows). With `answer_mask`
        (prompt conditioning), answer positions read the source only up to the prompt before their answer.
        `mask`: `cross_mask(attention_mask, answer_mask)` when the caller already has it."""
        B, T, _ = source_states.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=source_states.device)
        if mask is None:
            mask = self.cross_mask(attention_mask, answer_mask)
        p, kvs = self.project_source(source_states)
        return self.stream(p, kvs, mask, answer_embeds, answer_mask > 0 if answer_mask is not None else None)
