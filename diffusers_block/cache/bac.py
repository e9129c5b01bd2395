"""BAC: an offline-calibrated, optimal per-unit schedule (Block-wise Adaptive Caching, arXiv 2506.13456).

Calibration runs the uncached model on a few inputs and records what each cache unit would cache (a block's
residual, a sub-block's output) at every step. The Adaptive Caching Scheduler turns each unit's K x K step
similarity matrix S (cosine, averaged over samples) into the M update steps that keep the reused features most
similar to the fresh ones: holding the cache computed at step a until step b scores phi(a, b) = sum_{t=a..b} S[a, t],
and a dynamic programme over the segment starts maximises the sum of phi over segments. The result is a
:class:`StaticScheduleConfig`, so nothing is decided at run time.

``shared=True`` schedules all units on the same steps (one DP over the mean similarity): units then skip together,
which on some models beats independent per-unit steps. ``objective="error"`` scores reuse by what it costs rather
than by direction: S[a, t] = -||R_t - R_a|| / mean_t ||R_t||, with R the unit's cached tensor or, when shared, the
sum of all units' (the whole stack's residual, what a step that skips every block gets wrong). Cosine similarity
ignores magnitude, so it spends updates on steps whose features turn but are too small to matter. ``bubbling_union=n`` applies BAC's fix for FFN error
amplification with ``granularity="sub_block"``: the n most variable units also update whenever an FFN at or after
their layer does. ``keep_first`` / ``keep_last`` always update the first / last steps and let the DP place the rest
around them (optimal among the schedules that contain them). :func:`select_schedule` is the validated choice: it runs
several candidate schedules (calibrated from one recording by :func:`candidate_schedules`) on held-out inputs and
keeps the one whose output is closest to the uncached one. Those two are the one implementation of "calibrate
candidates from one recording, then choose by measured error" that ``cache/tuning.py`` (a grid of options, judged on
validation prompts) and the diffusion policy (named candidates, judged by action error on held-out histories: its
own ``generate``) both use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..models import FFN_CHILDREN
from ..parallel import context_parallel, gather_sequence
from .apply import _transformers, disable_block_cache, enable_block_cache
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


def optimal_update_steps(similarity: torch.Tensor, updates: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``updates`` steps 0 = c_1 < ... < c_M maximising sum_m phi(c_m, c_{m+1} - 1), with c_{M+1} = K. O(M K^2).

    ``keep_first`` / ``keep_last``: steps 0 .. keep_first - 1 and K - keep_last .. K - 1 are always updated (they
    count towards ``updates``) and the DP places the rest optimally around them. Early steps shape the whole
    sample, so an error there costs more than the similarity matrix says (MagCache's ``retention_ratio`` makes the
    same bet); the last steps of a stochastic sampler set the sample's fine precision (DDPM adds fresh noise at
    every step, which a reused prediction cannot remove), which a similarity matrix of features does not see either.
    """
    k = similarity.shape[0]
    if not 1 <= updates <= k:
        raise ValueError(f"updates must be in [1, {k}] for {k} steps, got {updates}")
    for name, value in (("keep_first", keep_first), ("keep_last", keep_last)):
        if not 0 <= value < updates:
            raise ValueError(f"{name} must be in [0, updates) = [0, {updates}), got {value}")
    if keep_first + keep_last >= updates:
        raise ValueError(
            f"keep_first + keep_last ({keep_first} + {keep_last}) must be fewer than the updates ({updates}), so "
            f"that the schedule has steps left to place"
        )
    forced = set(range(keep_first)) | set(range(max(k - keep_last, 0), k))
    phi = segment_scores(similarity)
    if forced:  # a segment [j, e] may not run over a forced step: e < the first forced step after j
        next_forced = torch.tensor([min([f for f in forced if f > j], default=k) for j in range(k)])
        phi = phi.masked_fill(torch.arange(k)[None, :] >= next_forced[:, None], float("-inf"))
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


OBJECTIVES = ("cosine", "error")


class InfeasibleScheduleError(ValueError):
    """The budget cannot hold the steps a calibration must keep (``keep_first + keep_last >= updates``).

    Its own type so that a chooser among candidate calibrations can leave out the candidates a small budget cannot
    hold while still failing on bad input (an unknown objective, a budget larger than the number of steps)."""


def record_features(
    target, generate: Callable[[object], object], granularity: str = "block", max_samples: int = 8
) -> dict[str, torch.Tensor]:
    """Run ``generate(target)`` uncached; per unit, its cached tensor at every step, (K, samples, D) float32 on the
    CPU (the first ``max_samples`` samples of the batch).

    Under context parallelism each rank records its chunk of the sequence; the chunks are gathered (one all-gather
    per unit, after the run), so every rank holds the whole features and calibrates the same schedule."""
    features: dict[str, dict[int, torch.Tensor]] = {}

    def recorder(name: str, step: int, tensor: torch.Tensor) -> None:
        flat = tensor[:max_samples].reshape(min(len(tensor), max_samples), -1).float()
        features.setdefault(name, {})[step] = flat.cpu()

    enable_block_cache(target, _RecordConfig(granularity=granularity, recorder=recorder))
    try:
        generate(target)
    finally:
        disable_block_cache(target)
    stacked = {name: torch.stack([by_step[s] for s in sorted(by_step)]) for name, by_step in features.items()}
    layout = next(filter(None, map(context_parallel, _transformers(target).values())), None)
    if layout is not None:
        stacked = {name: gather_sequence(f, layout, dim=-1) for name, f in stacked.items()}
    return stacked


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """K x K cosine similarity between steps of (K, samples, D) features, mean over samples."""
    normed = torch.nn.functional.normalize(features, dim=-1)
    return torch.einsum("asd,bsd->ab", normed, normed) / normed.shape[1]


def negative_error_matrix(features: torch.Tensor) -> torch.Tensor:
    """S[a, t] = -||f_t - f_a|| / mean_t ||f_t||: minus the error of serving step t from step a's cache, relative to
    the features' typical size (mean over samples)."""
    per_sample = features.transpose(0, 1)  # (samples, K, D)
    distance = torch.cdist(per_sample, per_sample).mean(0)  # (K, K)
    return -distance / per_sample.norm(dim=-1).mean().clamp_min(1e-12)


def variability(features: torch.Tensor) -> float:
    """Mean L1 distance between the normalised features of all pairs of steps: BAC's ranking for Bubbling Union."""
    normed = torch.nn.functional.normalize(features, dim=-1).transpose(0, 1)
    return float(torch.cdist(normed, normed, p=1).mean())


def record_similarities(
    target, generate: Callable[[object], object], granularity: str = "block", max_samples: int = 8
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per unit, the K x K cosine similarity of its cached tensor across steps and its variability."""
    features = record_features(target, generate, granularity, max_samples)
    return (
        {name: cosine_similarity_matrix(f) for name, f in features.items()},
        {name: variability(f) for name, f in features.items()},
    )


def schedule_from_features(
    features: dict[str, torch.Tensor],
    updates: int | float,
    *,
    granularity: str = "block",
    shared: bool = False,
    bubbling_union_top: int = 0,
    forecast: str = "none",
    objective: str = "cosine",
    keep_first: int | float = 0,
    keep_last: int | float = 0,
) -> StaticScheduleConfig:
    """The BAC schedule of recorded ``features`` (from :func:`record_features`); :func:`calibrate`'s arguments.

    Apart so that one recording can give several candidate schedules (see :func:`select_schedule`)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not features:
        raise RuntimeError("calibration recorded nothing: did generate() call the transformer?")
    steps = next(iter(features.values())).shape[0]
    count = updates if isinstance(updates, int) else max(1, round(updates * steps))
    first = keep_first if isinstance(keep_first, int) else round(keep_first * steps)
    last = keep_last if isinstance(keep_last, int) else round(keep_last * steps)
    if first + last >= count:
        raise InfeasibleScheduleError(
            f"keep_first + keep_last ({first} + {last} steps) must be fewer than the updates ({count})"
        )
    if shared and objective == "error":
        if len({f.shape for f in features.values()}) == 1:  # one stream: the units' residuals add up along the stack
            score = negative_error_matrix(torch.stack(list(features.values())).sum(0))
        else:  # units of different widths (e.g. Flux's double and single blocks): mean of their own errors
            score = torch.stack([negative_error_matrix(f) for f in features.values()]).mean(0)
        update_steps = dict.fromkeys(features, optimal_update_steps(score, count, first, last))
    elif shared:
        mean_similarity = torch.stack([cosine_similarity_matrix(f) for f in features.values()]).mean(0)
        update_steps = dict.fromkeys(features, optimal_update_steps(mean_similarity, count, first, last))
    else:
        score = cosine_similarity_matrix if objective == "cosine" else negative_error_matrix
        update_steps = {name: optimal_update_steps(score(f), count, first, last) for name, f in features.items()}
    if bubbling_union_top:
        variabilities = {name: variability(f) for name, f in features.items()}
        update_steps = bubbling_union(update_steps, variabilities, bubbling_union_top)
    return StaticScheduleConfig(update_steps=update_steps, granularity=granularity, forecast=forecast)


def candidate_schedules(
    features: dict[str, torch.Tensor], updates: int | float, candidates: Mapping[str, Mapping], **common
) -> dict[str, StaticScheduleConfig]:
    """Several candidate schedules from one recording, for :func:`select_schedule` to choose between.

    ``candidates`` maps each candidate's name to its :func:`schedule_from_features` options, which take precedence
    over ``common`` (the options all candidates share). A candidate the budget cannot hold (more kept steps than
    updates: :class:`InfeasibleScheduleError`) is left out; if none is left, or on any other error (bad input), this
    raises.
    """
    schedules, infeasible = {}, {}
    for name, options in candidates.items():
        try:
            schedules[name] = schedule_from_features(features, updates, **{**common, **options})
        except InfeasibleScheduleError as error:
            infeasible[name] = str(error)
    if not schedules:
        raise ValueError(f"no option combination of the candidates is feasible for updates={updates}: {infeasible}")
    return schedules


def calibrate(
    target,
    generate: Callable[[object], object],
    updates: int | float,
    *,
    granularity: str = "block",
    shared: bool = False,
    bubbling_union_top: int = 0,
    forecast: str = "none",
    objective: str = "cosine",
    keep_first: int | float = 0,
    keep_last: int | float = 0,
    max_samples: int = 8,
) -> StaticScheduleConfig:
    """A BAC schedule for ``target`` (pipeline or transformer) from one uncached run of ``generate(target)``.

    ``updates`` is the number of update steps per unit, or, if a float in (0, 1], the fraction of steps.
    ``objective``: "cosine" (BAC's similarity matrix) or "error" (minus the relative error of reuse; see above).
    ``keep_first`` / ``keep_last``: always update the first / last steps (a count, or a float in (0, 1) for a
    fraction of the steps); they count towards ``updates``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    features = record_features(target, generate, granularity, max_samples)
    return schedule_from_features(
        features,
        updates,
        granularity=granularity,
        shared=shared,
        bubbling_union_top=bubbling_union_top,
        forecast=forecast,
        objective=objective,
        keep_first=keep_first,
        keep_last=keep_last,
    )


def _first_tensor(output) -> torch.Tensor:
    """A generation's result as one tensor: a tensor, an array, or the first field of a pipeline output / tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if hasattr(output, "to_tuple"):  # diffusers' BaseOutput
        return _first_tensor(output.to_tuple())
    try:
        return torch.as_tensor(output)
    except (TypeError, RuntimeError, ValueError) as error:
        raise TypeError(
            f"select_schedule cannot compare outputs of type {type(output).__name__}: make generate() return a "
            f"tensor, or pass distance=(cached, reference) -> float"
        ) from error


def relative_error(output, reference) -> float:
    """||output - reference|| / ||reference|| of two generations (their first tensors, in float64)."""
    out, ref = _first_tensor(output).double().cpu(), _first_tensor(reference).double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def uncached_output(target, generate: Callable[[object], object]):
    """``generate(target)`` with no cache attached: the reference that cached runs are measured against."""
    disable_block_cache(target)
    return generate(target)


def select_schedule(
    target,
    generate: Callable[[object], object],
    candidates: Mapping[str, StaticScheduleConfig],
    distance: Callable[[object, object], float] = relative_error,
    *,
    reference=None,
) -> tuple[str, dict[str, float]]:
    """The validated choice: which candidate schedule reproduces the uncached output best, measured.

    A similarity matrix ranks what reusing a feature costs that feature, not what it costs the output after the
    layers and sampling steps that follow; when several calibrations are plausible (keep the last steps or not,
    cosine or error, more Bubbling Union), run each on held-out inputs and keep the one closest to the uncached
    result. ``generate(target)`` must be deterministic (seed its noise) and should use other inputs than the
    calibration did. ``reference``: the uncached ``generate(target)`` (:func:`uncached_output`) if already made, e.g.
    once for the choices at several budgets on the same inputs; by default it is generated here. Returns the best
    candidate's name and every candidate's ``distance`` to the uncached output.
    """
    if not candidates:
        raise ValueError("select_schedule needs at least one candidate schedule")
    if reference is None:
        reference = uncached_output(target, generate)
    errors = {}
    for name, config in candidates.items():
        enable_block_cache(target, config)
        try:
            errors[name] = float(distance(generate(target), reference))
        finally:
            disable_block_cache(target)
    return min(errors, key=errors.get), errors
