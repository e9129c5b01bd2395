"""Denoiser FLOPs of an action chunk, counted, whatever the cache did.

PyTorch's FlopCounterMode counts the matrix multiplications (and attention, through the math backend) of one
forward pass of the policy's transformer, split by module. That gives the FLOPs of each cache unit (a layer's
self-attention, cross-attention and FFN) and of everything around them (input embedding, output head); the
condition encoder runs once per chunk (observation tokens, and the time tokens of all steps). The FLOPs of a
chunk are then exact from what ran: the units the block cache's summary says were computed at each step, and the
number of denoiser calls. FLOPs grow linearly with the batch, so everything is per environment (batch 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .pipeline import DiffusionPolicyPipeline


def _count(fn) -> tuple[int, dict[str, int]]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    by_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), by_module


class DenoiserFlops:
    """Per-unit and per-call FLOPs of ``pipe.transformer`` for one environment."""

    def __init__(self, pipe: DiffusionPolicyPipeline) -> None:
        model, config = pipe.transformer, pipe.transformer.config
        device, dtype = pipe._execution_device, model.dtype
        sample = torch.zeros(1, config.horizon, config.action_dim, device=device, dtype=dtype)
        obs = torch.zeros(1, config.n_obs_steps, config.obs_dim, device=device, dtype=dtype)
        task = torch.zeros(1, dtype=torch.long, device=device) if config.task_names else None
        with torch.no_grad():
            cond = model.encode_condition(torch.zeros(1, device=device), obs, task)
            call, by_module = _count(lambda: model(sample, 0, encoder_hidden_states=cond))
            self.observation_encoding, _ = _count(lambda: model.encode_observation(obs, task))
            self.time_token, _ = _count(lambda: model.encode_time(torch.zeros(1, device=device)))
        root = type(model).__name__
        self.units = {
            f"transformer_blocks.{i}.{child}": by_module.get(f"{root}.transformer_blocks.{i}.{child}", 0)
            for i in range(len(model.transformer_blocks))
            for child in ("attn1", "attn2", "ff")
        }
        self.per_call = call
        self.outside_units = call - sum(self.units.values())

    def chunk(self, steps: int, calls: int | None = None, unit_computed: Mapping[str, int] | None = None) -> int:
        """FLOPs of one chunk of ``steps`` denoising steps with ``calls`` denoiser calls (default: every step) in
        which unit u computed ``unit_computed[u]`` times (default: at every call)."""
        calls = steps if calls is None else calls
        blocks = (
            calls * sum(self.units.values())
            if unit_computed is None
            else sum(self.units[name] * count for name, count in unit_computed.items())
        )
        return self.observation_encoding + steps * self.time_token + calls * self.outside_units + blocks


def computed_per_unit(summary) -> dict[str, int]:
    """How many times each unit computed in the generation a BlockCacheSummary describes."""
    counts = (np.asarray(summary.computed) == 1).sum(axis=(0, 1))
    return {name.split("/", 1)[-1]: int(c) for name, c in zip(summary.unit_names, counts)}
