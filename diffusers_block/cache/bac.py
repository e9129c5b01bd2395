"""BAC: an offline-calibrated, optimal per-unit schedule (Block-wise Adaptive Caching, arXiv 2506.13456).

Calibration runs the uncached model on a few inputs and records what each cache unit would cache (a block's
residual, a sub-block's output) at every step. The Adaptive Caching Scheduler turns each unit's K x K step
similarity matrix S (cosine, averaged over samples) into the M update steps that keep the reused features most
similar to the fresh ones: holding the cache computed at step a until step b scores phi(a, b) = sum_{t=a..b} S[a, t],
and a dynamic programme over the segment starts maximises the sum of phi over segments. The result is a
:class:`StaticScheduleConfig`, so nothing is decided at run time.

``shared=True`` schedules all units on the same steps (one DP over the mean similarity): units then skip together,
which on some models beats independent per-unit steps. ``bubbling_union=n`` applies BAC's fix for FFN error
amplification with ``granularity="sub_block"``: the n most variable units also update whenever an FFN at or after
their layer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..models import FFN_CHILDREN
from .apply import disable_block_cache, enable_block_cache
from .policy import CacheConfig, CachePolicy
from .slot import CacheSlot
from .static import StaticScheduleConfig


def segment_scores(similarity: torch.Tensor) -> torch.Tensor:
    """phi[a, b] = sum_{t=a..b} S[a, t] for a <= b (prefix sums along each row); -inf below the diagonal."""
    k = similarity.shape[0]
    prefix = torch.cumsum(similarity.double(), dim=1)  # prefix[a, b] = sum_{t=0..b} S[a, t]
    before = torch.cat([prefix.new_zeros(1), prefix.diagonal(-1)])  # sum_{t<a} S[a, t]
    phi = prefix - before[:, None]
    return phi.masked_fill(torch.ones(k, k, dtype=torch.bool).tril(-1), float("-inf"))


def optimal_update_steps(similarity: torch.Tensor, updates: int) -> list[int]:
    """The ``updates`` steps 0 = c_1 < ... < c_M maximising sum_m phi(c_m, c_{m+1} - 1), with c_{M+1} = K. O(M K^2)."""
    k = similarity.shape[0]
    if not 1 <= updates <= k:
        raise ValueError(f"updates must be in [1, {k}] for {k} steps, got {updates}")
    phi = segment_scores(similarity)
    best = torch.full((updates + 1, k + 1), float("-inf"), dtype=torch.float64)
    start = torch.zeros((updates + 1, k + 1), dtype=torch.long)  # start of the last segment of best[m][i]
    best[1, 1:] = phi[0, :]  # one segment [0, i - 1]
    for m in range(2, updates + 1):
        for i in range(m, k + 1):  # segments cover [0, i); the last one is [j, i - 1] with m - 1 <= j < i
            candidates = best[m - 1, m - 1 : i] + phi[m - 1 : i, i - 1]
            j = int(torch.argmax(candidates))
            best[m, i], start[m, i] = candidates[j], j + m - 1
    steps, i = [], k
    for m in range(updates, 0, -1):
        j = int(start[m, i]) if m > 1 else 0
        steps.append(j)
        i = j
    return sorted(steps)


def bubbling_union(update_steps: dict[str, list[int]], variability: dict[str, float], top: int) -> dict[str, list[int]]:
    """BAC's Bubbling Union: the ``top`` most variable units also update at every update step of every FFN unit at or
    after their own layer (unit names carry the layer as ``<list>.<index>.<child>``)."""

    def layer(name: str) -> tuple[str, int]:
        match = re.match(r"(.+?)\.(\d+)", name)
        return (match.group(1), int(match.group(2))) if match else (name, 0)

    ffn_steps = {name: steps for name, steps in update_steps.items() if name.rsplit(".", 1)[-1] in FFN_CHILDREN}
    result = {name: list(steps) for name, steps in update_steps.items()}
    for name in sorted(variability, key=variability.get, reverse=True)[:top]:
        lst, index = layer(name)
        extra = {
            s for ffn, steps in ffn_steps.items() for s in steps if layer(ffn)[0] == lst and layer(ffn)[1] >= index
        }
        result[name] = sorted(set(result[name]) | extra)
    return result


@dataclass(frozen=True)
class _RecordConfig(CacheConfig):
    """Computes everything and hands each unit's cached tensor to a recorder (calibration only)."""

    recorder: Callable | None = None

    def build(self, unit_names: Sequence[str]) -> _RecordPolicy:
        return _RecordPolicy(self, unit_names)


class _RecordPolicy(CachePolicy):
    planned = True

    def plan(self, unit: int, step: int, num_steps: int | None) -> bool:
        return True

    def observe(self, unit: int, slot: CacheSlot, step: int, primary: torch.Tensor) -> None:
        self.config.recorder(self.unit_names[unit], step, primary)


def record_similarities(
    target, generate: Callable[[object], object], granularity: str = "block", max_samples: int = 8
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run ``generate(target)`` uncached and return, per unit, the K x K cosine similarity of its cached tensor across
    steps (mean over the first ``max_samples`` samples of the batch) and its variability (mean L1 distance between
    the normalised features of all pairs of steps, BAC's ranking for Bubbling Union)."""
    features: dict[str, dict[int, torch.Tensor]] = {}

    def recorder(name: str, step: int, tensor: torch.Tensor) -> None:
        flat = tensor[:max_samples].reshape(min(len(tensor), max_samples), -1).float()
        features.setdefault(name, {})[step] = flat.cpu()

    enable_block_cache(target, _RecordConfig(granularity=granularity, recorder=recorder))
    try:
        generate(target)
    finally:
        disable_block_cache(target)
    similarities, variability = {}, {}
    for name, by_step in features.items():
        stacked = torch.stack([by_step[s] for s in sorted(by_step)])  # (K, samples, D)
        normed = torch.nn.functional.normalize(stacked, dim=-1)
        similarities[name] = torch.einsum("asd,bsd->ab", normed, normed) / normed.shape[1]
        variability[name] = float(torch.cdist(normed.transpose(0, 1), normed.transpose(0, 1), p=1).mean())
    return similarities, variability


def calibrate(
    target,
    generate: Callable[[object], object],
    updates: int | float,
    *,
    granularity: str = "block",
    shared: bool = False,
    bubbling_union_top: int = 0,
    forecast: str = "none",
    max_samples: int = 8,
) -> StaticScheduleConfig:
    """A BAC schedule for ``target`` (pipeline or transformer) from one uncached run of ``generate(target)``.

    ``updates`` is the number of update steps per unit, or, if a float in (0, 1], the fraction of steps.
    """
    similarities, variability = record_similarities(target, generate, granularity, max_samples)
    if not similarities:
        raise RuntimeError("calibration recorded nothing: did generate() call the transformer?")
    steps = next(iter(similarities.values())).shape[0]
    count = updates if isinstance(updates, int) else max(1, round(updates * steps))
    if shared:
        schedule = optimal_update_steps(torch.stack(list(similarities.values())).mean(0), count)
        update_steps = {name: schedule for name in similarities}
    else:
        update_steps = {name: optimal_update_steps(s, count) for name, s in similarities.items()}
    if bubbling_union_top:
        update_steps = bubbling_union(update_steps, variability, bubbling_union_top)
    return StaticScheduleConfig(update_steps=update_steps, granularity=granularity, forecast=forecast)
