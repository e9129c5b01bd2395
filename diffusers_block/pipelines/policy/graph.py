"""One CUDA graph for a whole action chunk: every denoising step, and the block cache's static schedule with it.

A policy this small is launch-bound on a GPU: one 100-step chunk launches tens of thousands of tiny kernels, and
Python and the launches, not the arithmetic, set its latency. Capturing the loop once and replaying it removes both.

It works with block caching because a static schedule (BAC, uniform) decides everything in Python before each
kernel is issued: during capture the cache hooks run as usual and choose, step by step, to compute a sub-block or
to hand back its cached output, so the graph records exactly the kernels of that schedule and the cached tensors
live at fixed addresses in the graph's memory pool. A replay then costs only what the schedule computes. Runtime
policies (BWCache) read their indicator on the host and cannot be captured.

Inputs are copied into static tensors before each replay; the per-step DDPM noise comes from the CUDA generator,
which CUDA graphs advance on every replay, so two replays sample differently, as two eager calls do.
"""

from __future__ import annotations

import torch

from .pipeline import DiffusionPolicyPipeline, PolicyPipelineOutput, PreparedInputs


def _check_capturable(pipe: DiffusionPolicyPipeline) -> None:
    attached = getattr(pipe, "_diffusers_block_cache", None)
    for cache in getattr(attached, "caches", {}).values():
        if not cache.policy.planned:
            raise ValueError(
                f"{type(cache.config).__name__} decides at run time (reads indicators on the host), which a CUDA "
                f"graph cannot capture; use a static schedule (StaticScheduleConfig, e.g. from calibrate_schedule)"
            )


class CUDAGraphPolicy:
    """``pipe``'s denoising loop for ``batch_size`` environments and ``num_inference_steps`` steps, as one graph.

    Call it like the pipeline: ``runner(observations, task)`` -> :class:`PolicyPipelineOutput`. Enable or change
    the block cache before building the runner; the schedule is baked into the graph.
    """

    def __init__(
        self,
        pipe: DiffusionPolicyPipeline,
        batch_size: int,
        num_inference_steps: int | None = None,
        denoiser_steps=None,
        warmup: int = 2,
    ) -> None:
        device = pipe._execution_device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the policy on a CUDA device, it is on {device}")
        _check_capturable(pipe)
        pipe.check_scheduler()
        config = pipe.transformer.config
        self.pipe, self.batch_size = pipe, batch_size
        self.num_inference_steps = num_inference_steps or pipe.scheduler.config.num_train_timesteps
        self.obs = torch.zeros(batch_size, config.n_obs_steps, config.obs_dim, device=device)
        self.task_ids = torch.zeros(batch_size, dtype=torch.long, device=device) if config.task_names else None
        self.noise = torch.zeros(
            batch_size, config.horizon, config.action_dim, device=device, dtype=pipe.transformer.dtype
        )
        timesteps = pipe.set_timesteps(self.num_inference_steps)
        self.time_tokens = pipe.time_tokens(timesteps)
        inputs = PreparedInputs(self.obs, self.task_ids)

        def run() -> torch.Tensor:
            pipe.set_timesteps(self.num_inference_steps)  # a new generation for the block cache, outside the graph
            return pipe.denoise(self.noise, inputs, timesteps, self.time_tokens, denoiser_steps)

        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # cuBLAS handles and workspaces, allocator growth
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            pipe.set_timesteps(self.num_inference_steps)
            with torch.cuda.graph(self.graph):
                self.action_pred = pipe.denoise(self.noise, inputs, timesteps, self.time_tokens, denoiser_steps)

    @torch.no_grad()
    def __call__(self, observations, task=None, generator=None, output_type: str = "np") -> PolicyPipelineOutput:
        inputs = self.pipe.prepare_inputs(observations, task)
        if len(inputs.obs) != self.batch_size:
            raise ValueError(f"this graph was captured for {self.batch_size} environments, got {len(inputs.obs)}")
        self.obs.copy_(inputs.obs)
        if self.task_ids is not None:
            self.task_ids.copy_(inputs.task_ids)
        self.noise.copy_(self.pipe.initial_noise(self.batch_size, generator))
        self.graph.replay()
        return self.pipe.postprocess(self.action_pred, output_type)
