"""THE one place that assembles the multimodal LLM input sequence, its boolean group masks, and the positions the
action head reads. Training, the CRaFT extractor/cache and inference all use it.

Per sample b (prompt length n_b = attention_mask[b].sum(); the prompt starts with `<|im_start|>`, no BOS), positions
are, as upstream VLA-Adapter assembles them (first prompt token, then the patches, then the rest):

    0               prompt token 0 (`<|im_start|>`)       (prompt_mask, first_token_mask)
    1 .. P          projected patches                     (vision_mask)
    P+1 .. P+n_b-1  prompt tokens 1 ..                    (prompt_mask)
    P+n_b .. +Q-1   ActionQuery embeddings                (query_mask)
    P+n_b+Q         stop token                            (stop_mask)
    P+n_b+Q+1 .. +N action tokens (training only, KI)     (action_token_mask)
    rest            right padding (zero embeddings)       (padding_mask)

The group masks partition every row (without action tokens `action_token_mask` is None: the inference sequence).
Every sample has exactly P vision, Q query (and N action) tokens; real tokens are contiguous from position 0 (right
padding), so default position ids 0..T-1 are correct for every sample.

What the head reads (upstream's slices in both its training script and its HF model, verified by running them):
- Raw Latent = positions 0 .. P-1: the token before the patches plus patches 0 .. P-2 (`raw_latent_mask`);
- ActionQuery latent = positions q0-1 .. q0+Q-2 (q0 = first query): the last prompt token plus queries 0 .. Q-2
  (`action_query_latent_mask`).
Both are one position left of the patches / the queries. CRaFT pools exactly these groups.

Action tokens (knowledge insulation, `--retention_method ki`, docs/BASELINES.md): the N = chunk x action_dim
discretised ground-truth action ids go AFTER the stop token, and the LM-head logits at `action_prediction_mask`
(the stop token and action tokens 0..N-2) predict them with teacher forcing. Why there: (1) with causal attention
no earlier position attends to them, so the Raw Latents and ActionQuery latents the head reads can not see the
ground-truth actions (otherwise the head could copy them: tested); (2) positions 0 .. stop are exactly the inference
sequence, so their hidden states are the ones the policy sees at inference (the training suffix changes nothing
before it); (3) the actions are predicted after the whole prompt, image and ActionQuery context, as OpenVLA predicts
them after its prompt.

Attention: the LLM keeps Qwen2's causal attention (upstream's bidirectional patch is not verified for Qwen2). The
choice lives only in `llm_attention_kwargs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LLM_ATTENTION = "causal"  # the only mode implemented; see module docstring


@dataclass
class SequenceLayout:
    """The assembled sequence and its masks, all (B, T) bool except `inputs_embeds` (B, T, D)."""

    inputs_embeds: torch.Tensor
    vision_mask: torch.Tensor
    prompt_mask: torch.Tensor
    query_mask: torch.Tensor
    stop_mask: torch.Tensor
    padding_mask: torch.Tensor
    attention_mask: torch.Tensor
    raw_latent_mask: torch.Tensor
    action_query_latent_mask: torch.Tensor
    num_vision_tokens: int
    num_query_tokens: int
    action_token_mask: torch.Tensor | None = None  # (B, T) bool; None: the sequence holds no action tokens
    action_prediction_mask: torch.Tensor | None = None  # positions whose next-token logits predict them

    @property
    def num_action_tokens(self) -> int:
        return 0 if self.action_token_mask is None else int(self.action_token_mask[0].sum())

    @property
    def first_token_mask(self) -> torch.Tensor:
        mask = torch.zeros_like(self.prompt_mask)
        mask[:, 0] = True
        return mask

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real (non-padding) tokens per sample, (B,)."""
        return self.attention_mask.sum(dim=1)

    def gather(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Select the positions of a fixed-count group (e.g. vision, query, raw / ActionQuery latents) from
        (B, T, D) -> (B, count, D), in position order."""
        count = int(mask[0].sum())
        return hidden[mask].reshape(hidden.shape[0], count, hidden.shape[-1])


def _check_prompt_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Prompt lengths (B,), after checking the mask is right-padded with the first token present."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, Tp), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths < 1).any()):
        raise ValueError("every prompt must hold at least its first token (attention_mask row with no True)")
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must be right-padded: True for the first n tokens of a row, False after")
    return lengths


def build_sequence_layout(
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    patch_embeds: torch.Tensor,
    query_embeds: torch.Tensor,
    stop_embed: torch.Tensor,
    action_token_embeds: torch.Tensor | None = None,
) -> SequenceLayout:
    """Assemble `[prompt token 0][patches][prompt tokens 1..][queries][stop][action tokens]` + right padding.

    prompt_embeds (B, Tp, D): embeddings of right-padded prompt ids; prompt_attention_mask (B, Tp);
    patch_embeds (B, P, D); query_embeds (Q, D) shared by all samples; stop_embed (D,); action_token_embeds
    (B, N, D) or None (inference: no action tokens).
    """
    batch, prompt_len, dim = prompt_embeds.shape
    if patch_embeds.ndim != 3 or patch_embeds.shape[0] != batch or patch_embeds.shape[2] != dim:
        raise ValueError(f"patch_embeds must be (B={batch}, P, D={dim}), got {tuple(patch_embeds.shape)}")
    if query_embeds.ndim != 2 or query_embeds.shape[1] != dim:
        raise ValueError(f"query_embeds must be (Q, D={dim}), got {tuple(query_embeds.shape)}")
    if stop_embed.shape != (dim,):
        raise ValueError(f"stop_embed must be (D={dim},), got {tuple(stop_embed.shape)}")
    if tuple(prompt_attention_mask.shape) != (batch, prompt_len):
        raise ValueError(f"attention_mask shape {tuple(prompt_attention_mask.shape)} does not match input_ids "
                         f"{(batch, prompt_len)}")
    if action_token_embeds is not None and (action_token_embeds.ndim != 3 or action_token_embeds.shape[0] != batch
                                            or action_token_embeds.shape[2] != dim
                                            or action_token_embeds.shape[1] == 0):
        raise ValueError(f"action_token_embeds must be (B={batch}, N>0, D={dim}), got "
                         f"{tuple(action_token_embeds.shape)}")
    lengths = _check_prompt_mask(prompt_attention_mask)
    num_patches, num_queries = patch_embeds.shape[1], query_embeds.shape[0]
    num_actions = 0 if action_token_embeds is None else action_token_embeds.shape[1]
    total = 1 + num_patches + (int(lengths.max()) - 1) + num_queries + 1 + num_actions
    device = prompt_embeds.device

    t = torch.arange(total, device=device)[None, :].expand(batch, total)
    n = lengths[:, None]
    query_start = num_patches + n
    vision_mask = (t >= 1) & (t <= num_patches)
    prompt_mask = (t == 0) | ((t > num_patches) & (t < query_start))
    query_mask = (t >= query_start) & (t < query_start + num_queries)
    stop = query_start + num_queries
    stop_mask = t == stop
    action_token_mask = (t > stop) & (t <= stop + num_actions)
    padding_mask = t > stop + num_actions
    raw_latent_mask = t < num_patches
    action_query_latent_mask = (t >= query_start - 1) & (t < query_start + num_queries - 1)

    # Gather each source at clamped indices, then pick per position: differentiable w.r.t. every source.
    token_index = torch.where(t == 0, 0, t - num_patches).clamp(0, prompt_len - 1)
    from_prompt = torch.gather(prompt_embeds, 1, token_index[..., None].expand(batch, total, dim))
    patch_index = (t - 1).clamp(0, max(num_patches - 1, 0))
    from_patches = torch.gather(patch_embeds, 1, patch_index[..., None].expand(batch, total, dim))
    from_queries = query_embeds[(t - query_start).clamp(0, num_queries - 1)]
    zeros = torch.zeros((), dtype=prompt_embeds.dtype, device=device)
    embeds = torch.where(padding_mask[..., None], zeros, stop_embed.to(prompt_embeds.dtype))
    if action_token_embeds is not None:
        from_actions = torch.gather(action_token_embeds, 1, (t - stop - 1).clamp(0, num_actions - 1)[..., None]
                                    .expand(batch, total, dim))
        embeds = torch.where(action_token_mask[..., None], from_actions.to(prompt_embeds.dtype), embeds)
    embeds = torch.where(query_mask[..., None], from_queries.to(prompt_embeds.dtype), embeds)
    embeds = torch.where(vision_mask[..., None], from_patches.to(prompt_embeds.dtype), embeds)
    embeds = torch.where(prompt_mask[..., None], from_prompt, embeds)
    return SequenceLayout(
        inputs_embeds=embeds,
        vision_mask=vision_mask,
        prompt_mask=prompt_mask,
        query_mask=query_mask,
        stop_mask=stop_mask,
        padding_mask=padding_mask,
        attention_mask=~padding_mask,
        raw_latent_mask=raw_latent_mask,
        action_query_latent_mask=action_query_latent_mask,
        num_vision_tokens=num_patches,
        num_query_tokens=num_queries,
        action_token_mask=action_token_mask if num_actions else None,
        action_prediction_mask=((t >= stop) & (t < stop + num_actions)) if num_actions else None,
    )


def llm_attention_kwargs(layout: SequenceLayout) -> dict[str, torch.Tensor]:
    """Keyword arguments controlling the LLM's attention: Qwen2's causal mask + the padding mask."""
    if LLM_ATTENTION != "causal":  # pragma: no cover - single supported mode, kept explicit for future variants
        raise NotImplementedError(f"attention mode {LLM_ATTENTION!r} is not implemented")
    return {"attention_mask": layout.attention_mask.long()}
