"""`L1RegressionActionHead`: the bridge-attention policy head (Pro and original variants).

The head starts from x = zeros (B, chunk, action_dim * D) (+ noise), maps it through layer_norm1 -> fc1 -> ReLU, then
one block per LLM layer: block i reads layer i + 1 (Raw Latents `h_t` and `h_a` = [ActionQuery latents; proprio
token]). Each block attends from x over three groups with ONE softmax over the concatenated scores

    [q . k_self,  q . k_adapter(h_a; p),  tanh(g) . q . k_task(h_t)] / sqrt(head_dim)

then x = ffn(o_proj(attn) + x) with ffn = LayerNorm, Linear, ReLU. The gate multiplies the raw-latent scores
before the softmax: with g = 0 those scores are exactly 0 (a uniform logit, not -inf). Finally layer_norm2 -> fc2.

Pro block: separate K/V projections per group (`k_self/v_self`, `k_adapter/v_adapter`, `k_task/v_task`), RoPE on
q/k_self (positions of the chunk) and on k_adapter and k_task (each group numbered from 0). `film_gen` is kept in the
state_dict (released checkpoints hold it) but is unused.
Original block: shared `q_proj/k_proj/v_proj/o_proj`, no RoPE; groups self (x) and [h_a; p] un-gated, raw latents
gated.

State-dict names follow the released checkpoints: `model.fc1`, `model.layer_norm1`, `model.mlp_resnet_blocks.{i}.*`,
`model.layer_norm2`, `model.fc2`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTION_DIM = 7
NUM_ACTIONS_CHUNK = 8
ROPE_BASE = 10000.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (-x1, x0): upstream's convention, used with half-split tables below."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).reshape_as(x)


def rope_inv_freq(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rope_tables(inv_freq: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) as upstream builds them: angles in `inv_freq`'s dtype (bf16-rounded once
    the head is cast to bf16, positions > 256 included), laid out half-split `cat([freqs, freqs])`."""
    positions = torch.arange(length, device=inv_freq.device, dtype=inv_freq.dtype)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last dim of (B, H, N, hd), positions 0..N-1.

    Mixed convention, exactly as upstream's Pro head: half-split tables but interleaved-pair rotation. (The
    standard half-split rotation gives outputs off by ~1 with released weights.)
    """
    cos, sin = rope_tables(inv_freq, x.shape[-2], x.dtype)
    return x * cos + rotate_half(x) * sin


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.reshape(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())


def _adapter_tokens(h_a: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
    return h_a if proprio is None else torch.cat([h_a, proprio.to(h_a.dtype)], dim=1)


def gated_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over [q.k_0, q.k_1, tanh(gate) q.k_2] / sqrt(hd); returns (output, scores) in (B, H, ...) layout.

    The last group is the gated one (raw latents).
    """
    scores = [q @ k.transpose(-2, -1) for k in keys]
    scores[-1] = scores[-1] * torch.tanh(gate)
    # Divide (not multiply by the reciprocal) after the concatenation: bf16 results then equal upstream's bit for bit.
    logits = torch.cat(scores, dim=-1) / math.sqrt(q.shape[-1])
    weights = torch.softmax(logits, dim=-1)
    return weights @ torch.cat(values, dim=-2), logits


class ProBridgeBlock(nn.Module):
    """Bridge-attention block of the Pro head (see module docstring)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads != 0 or (dim // num_heads) % 2 != 0:
            raise ValueError(f"hidden dim {dim} must split into {num_heads} heads of even size (RoPE)")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_self, self.v_self = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_adapter, self.v_adapter = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_task, self.v_task = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.gating_factor = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(dim)
        self.film_gen = nn.Sequential(nn.Linear(dim, 2 * dim))  # present in released checkpoints, unused
        # Non-persistent, as upstream: not in the state_dict, but cast with the head (bf16 angles under bf16).
        self.register_buffer("inv_freq", rope_inv_freq(dim // num_heads), persistent=False)
        self.record_logits = False  # tests/diagnostics: keep the last pre-softmax scores in `last_logits`
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, h_t: torch.Tensor, h_a: torch.Tensor,
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        adapter = _adapter_tokens(h_a, proprio)
        h = self.num_heads
        rope = self.inv_freq
        q = apply_rope(_heads(self.q_proj(x), h), rope)
        keys = [apply_rope(_heads(self.k_self(x), h), rope), apply_rope(_heads(self.k_adapter(adapter), h), rope),
                apply_rope(_heads(self.k_task(h_t), h), rope)]
        values = [_heads(self.v_self(x), h), _heads(self.v_adapter(adapter), h), _heads(self.v_task(h_t), h)]
        out, logits = gated_attention(q, keys, values, self.gating_factor)
        self.last_logits = logits.detach() if self.record_logits else None
        return self.ffn(self.o_proj(_merge(out)) + x)


class OriginalBridgeBlock(nn.Module):
    """Bridge-attention block of the original head: shared projections, no RoPE (see module docstring)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gating_factor = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(dim)
        self.record_logits = False  # tests/diagnostics: keep the last pre-softmax scores in `last_logits`
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, h_t: torch.Tensor, h_a: torch.Tensor,
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        adapter = _adapter_tokens(h_a, proprio)
        h = self.num_heads
        q = _heads(self.q_proj(x), h)
        keys = [_heads(self.k_proj(t), h) for t in (x, adapter, h_t)]
        values = [_heads(self.v_proj(t), h) for t in (x, adapter, h_t)]
        out, logits = gated_attention(q, keys, values, self.gating_factor)
        self.last_logits = logits.detach() if self.record_logits else None
        return self.ffn(self.o_proj(_merge(out)) + x)


class BridgeMLPResNet(nn.Module):
    """layer_norm1 -> fc1 -> ReLU -> blocks -> layer_norm2 -> fc2 (the head's `model` submodule)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int, use_pro_version: bool,
                 num_heads: int) -> None:
        super().__init__()
        block = ProBridgeBlock if use_pro_version else OriginalBridgeBlock
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList([block(hidden_dim, num_heads) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, raw_latents: torch.Tensor, action_query_latents: torch.Tensor,
                proprio_features: torch.Tensor | None) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for i, block in enumerate(self.mlp_resnet_blocks):
            # Block i is conditioned on LLM layer i + 1 (layer 0 = embeddings is never read).
            x = block(x, h_t=raw_latents[:, i + 1], h_a=action_query_latents[:, i + 1], proprio=proprio_features)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """Predicts a chunk (B, num_actions_chunk, action_dim) of normalised actions from the VLA's per-layer latents."""

    def __init__(self, input_dim: int, hidden_dim: int, action_dim: int = ACTION_DIM,
                 num_actions_chunk: int = NUM_ACTIONS_CHUNK, num_blocks: int = 24, use_pro_version: bool = True,
                 num_heads: int = 8, noise_std: float = 0.02) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.action_dim, self.num_actions_chunk = action_dim, num_actions_chunk
        self.num_blocks, self.use_pro_version, self.noise_std = num_blocks, use_pro_version, noise_std
        self.model = BridgeMLPResNet(num_blocks, input_dim * action_dim, hidden_dim, action_dim, use_pro_version,
                                     num_heads)

    @property
    def input_shape_per_sample(self) -> tuple[int, int]:
        """Shape of the head's start tensor x (and of `noise`) without the batch axis."""
        return self.num_actions_chunk, self.action_dim * self.input_dim

    def forward(self, raw_latents: torch.Tensor, action_query_latents: torch.Tensor,
                proprio_features: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """raw_latents (B, L+1, Nv, D), action_query_latents (B, L+1, Q, D), proprio_features (B, 1, D) or None,
        noise (chunk, action_dim * D), shared by the batch as upstream draws it, or (B, chunk, action_dim * D), or
        None -> actions (B, chunk, action_dim).

        noise=None adds one N(0, noise_std) draw (shared by the batch) in train mode and nothing in eval mode; the
        training loop passes a draw derived from (seed, optimizer step) so results do not depend on the world size.
        """
        for name, latents in (("raw_latents", raw_latents), ("action_query_latents", action_query_latents)):
            if latents.ndim != 4 or latents.shape[-1] != self.input_dim:
                raise ValueError(f"{name} must be (B, L+1, N, D={self.input_dim}), got {tuple(latents.shape)}")
            if latents.shape[1] < self.num_blocks + 1:
                raise ValueError(f"{name} has {latents.shape[1]} layers but the head's {self.num_blocks} blocks "
                                 f"read layers 1..{self.num_blocks}")
        batch = raw_latents.shape[0]
        if proprio_features is not None and tuple(proprio_features.shape) != (batch, 1, self.input_dim):
            raise ValueError(f"proprio_features must be (B={batch}, 1, D={self.input_dim}), "
                             f"got {tuple(proprio_features.shape)}")
        shape = (batch, *self.input_shape_per_sample)
        x = torch.zeros(shape, dtype=raw_latents.dtype, device=raw_latents.device)
        if noise is None and self.training and self.noise_std > 0:
            noise = self.noise_std * torch.randn(self.input_shape_per_sample, device=x.device)
        if noise is not None:
            if tuple(noise.shape) not in (shape, shape[1:]):
                raise ValueError(f"noise must be {shape[1:]} (shared by the batch) or {shape}, "
                                 f"got {tuple(noise.shape)}")
            x = x + noise.to(x.dtype)
        return self.model(x, raw_latents, action_query_latents, proprio_features)
