"""The policy's denoiser: a transformer over noisy action tokens, conditioned on time and observation tokens.

It follows Diffusion Policy's ``TransformerForDiffusion`` (Chi et al., 2023; low-dim config: 8 layers, 4 heads,
width 256, causal self-attention over the action horizon, time and observations as condition tokens passed
through a token-wise MLP), with one change of layout that block caching needs: every decoder layer
(``transformer_blocks.i``) keeps its three branches as separate child modules, ``attn1`` (self-attention),
``attn2`` (cross-attention to the condition tokens) and ``ff`` (feed-forward), each with its own pre-norm and
returning its output before the residual add. A cache can then skip a whole layer or any single branch, and a
skipped branch skips its norm too (BAC's sub-block granularity).

A multi-task policy adds one learned task token to the condition (``task_names`` in the config), so one set of
weights serves several Meta-World tasks and refuses a task it was not trained for.

The condition encoder is token-wise, so the observation tokens are the same at every denoising step and only the
time token changes: :meth:`PolicyTransformer.encode_observation` and :meth:`PolicyTransformer.encode_time` let a
sampler encode the observations once per action chunk and the time tokens of all steps in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

PREDICTION_TYPES = ("epsilon", "sample", "flow")


class PolicySelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the action tokens (causal, as Diffusion Policy's default)."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden_states.shape
        q, k, v = self.to_qkv(self.norm(hidden_states)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, t, d))


class PolicyCrossAttention(nn.Module):
    """Pre-norm multi-head attention from the action tokens to the condition (time, observation, task) tokens."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden_states.shape
        s, h = encoder_hidden_states.shape[1], self.heads
        q = self.to_q(self.norm(hidden_states)).view(b, t, h, d // h).transpose(1, 2)
        k, v = self.to_kv(encoder_hidden_states).view(b, s, 2, h, d // h).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(out.transpose(1, 2).reshape(b, t, d))


class PolicyFeedForward(nn.Module):
    """Pre-norm MLP (GELU, ``mult`` x width), as in Diffusion Policy's decoder layers."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(hidden_states))


class PolicyTransformerBlock(nn.Module):
    """One decoder layer: three residual branches, each a child module a block cache can skip on its own."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.attn1 = PolicySelfAttention(dim, heads, dropout, causal)
        self.attn2 = PolicyCrossAttention(dim, heads, dropout)
        self.ff = PolicyFeedForward(dim, ffn_mult, dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn1(hidden_states)
        hidden_states = hidden_states + self.attn2(hidden_states, encoder_hidden_states)
        return hidden_states + self.ff(hidden_states)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Diffusion Policy's SinusoidalPosEmb: [sin(t w_i), cos(t w_i)] with w_i = 10000^(-i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=timestep.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
    angles = timestep.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


@dataclass
class PolicyTransformerOutput(BaseOutput):
    sample: torch.Tensor  # (batch, horizon, action_dim): predicted noise, clean actions or velocity


class PolicyTransformer(ModelMixin, ConfigMixin):
    """Transformer denoiser of a diffusion policy (Diffusion Policy's TransformerForDiffusion, diffusers-style).

    Inputs: noisy normalised actions (B, horizon, action_dim), the diffusion timestep, and either the normalised
    observation history (B, n_obs_steps, obs_dim) with task indices (B,), or condition tokens already encoded by
    :meth:`encode_condition`. Output: ``prediction_type`` (epsilon, the clean sample, or a flow velocity).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        action_dim: int = 4,
        obs_dim: int = 39,
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        num_layers: int = 8,
        num_attention_heads: int = 4,
        hidden_size: int = 256,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        causal_attn: bool = True,
        task_names: tuple[str, ...] = (),
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_attention_heads {num_attention_heads}"
            )
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(
                f"n_obs_steps - 1 + n_action_steps = {n_obs_steps - 1 + n_action_steps} actions are executed from a "
                f"horizon of {horizon}: raise horizon or lower n_action_steps"
            )
        d = hidden_size
        self.input_emb = nn.Linear(action_dim, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, d))
        self.cond_obs_emb = nn.Linear(obs_dim, d)
        self.task_emb = nn.Embedding(len(task_names), d) if task_names else None
        num_cond = 1 + n_obs_steps + (1 if task_names else 0)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, num_cond, d))
        self.cond_encoder = nn.Sequential(nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)
        self.transformer_blocks = nn.ModuleList(
            [PolicyTransformerBlock(d, num_attention_heads, ffn_mult, dropout, causal_attn) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(d)
        self.proj_out = nn.Linear(d, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Diffusion Policy's init: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- condition ----------------------------------------------------------------------------------------------
    def encode_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Encoded time tokens: (...,) timesteps -> (..., hidden_size)."""
        tokens = sinusoidal_embedding(timestep, self.config.hidden_size).to(self.cond_pos_emb.dtype)
        return self.cond_encoder(self.drop(tokens + self.cond_pos_emb[0, 0]))

    def encode_observation(self, obs: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded observation (and task) tokens: (B, n_obs_steps, obs_dim) -> (B, n_obs_steps [+ 1], hidden_size)."""
        tokens = self.cond_obs_emb(obs.to(self.cond_pos_emb.dtype))
        if self.task_emb is not None:
            if task_ids is None:
                raise ValueError(
                    f"this policy is multi-task ({', '.join(self.config.task_names)}): pass task_ids, one per sample"
                )
            tokens = torch.cat([tokens, self.task_emb(task_ids)[:, None]], dim=1)
        return self.cond_encoder(self.drop(tokens + self.cond_pos_emb[:, 1:]))

    def encode_condition(
        self, timestep: torch.Tensor, obs: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Condition tokens (B, 1 + n_obs_steps [+ 1], hidden_size) for one timestep per sample (B,)."""
        time = self.encode_time(timestep.expand(obs.shape[0]))[:, None]
        return torch.cat([time, self.encode_observation(obs, task_ids)], dim=1)

    # -- denoising ----------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        obs: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """``hidden_states`` (B, horizon, action_dim); ``timestep`` scalar or (B,); give ``obs`` (and ``task_ids``)
        or precomputed ``encoder_hidden_states`` from :meth:`encode_condition`."""
        if encoder_hidden_states is None:
            if obs is None:
                raise ValueError("PolicyTransformer needs `obs` (and `task_ids`) or `encoder_hidden_states`")
            if not torch.is_tensor(timestep):
                timestep = torch.tensor(timestep, device=hidden_states.device)
            encoder_hidden_states = self.encode_condition(timestep, obs, task_ids)
        x = self.drop(self.input_emb(hidden_states) + self.pos_emb[:, : hidden_states.shape[1]])
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        sample = self.proj_out(self.norm_out(x))
        return PolicyTransformerOutput(sample=sample) if return_dict else (sample,)
