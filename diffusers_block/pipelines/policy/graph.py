"""One CUDA graph for a whole action chunk: normalisation, noise, every denoising step and the block cache's schedule.

A policy this small is launch-bound on a GPU: one 100-step chunk launches thousands of tiny kernels, and Python and
the launches, not the arithmetic, set its latency. Capturing the chunk once and replaying it removes both.

It works with block caching because a static schedule (BAC, uniform) decides everything in Python before each
kernel is issued: during capture the cache hooks run as usual and choose, step by step, to compute a sub-block or
to hand back its cached output, so the graph records exactly the kernels of that schedule and the cached tensors
live at fixed addresses in the graph's memory pool. A replay then costs only what the schedule computes. Runtime
policies (BWCache) read their indicator on the host and cannot be captured.

Everything between the raw observations and the executed actions is in the graph: observation normalisation, the
condition tokens, the chunk's random numbers (one draw, :meth:`DiffusionPolicyPipeline.chunk_noise`), the fused
DDPM steps and the action un-normalisation. A call copies the raw observations (and task indices, when they change)
into static tensors, replays, and copies the actions out. The noise comes from a generator registered with the
graph (``CUDAGraph.register_generator_state``, PyTorch >= 2.5): before a replay it takes the state of the caller's
generator (or of the default CUDA generator), and hands the advanced state back after, so a replay draws exactly
what an eager pipeline call draws from the same seed, and two replays draw differently, as two eager calls do.
Where that registration is missing the draw runs just before the replay instead, with the same numbers.
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
    """``pipe``'s whole chunk for ``batch_size`` environments and ``num_inference_steps`` steps, as one graph.

    Call it like the pipeline: ``runner(observations, task, generator=None)`` -> :class:`PolicyPipelineOutput`,
    the same actions as ``pipe(observations, task, generator=...)`` from the same generator state. Enable or change
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
        self.pipe, self.batch_size, self.device = pipe, batch_size, device
        self.num_inference_steps = num_inference_steps or pipe.scheduler.config.num_train_timesteps
        self.raw_obs = torch.zeros(batch_size, config.n_obs_steps, config.obs_dim, device=device)
        self.task_ids = torch.zeros(batch_size, dtype=torch.long, device=device) if config.task_names else None
        self._tasks = None  # the task names whose indices are in self.task_ids
        timesteps = pipe.set_timesteps(self.num_inference_steps)
        self.time_tokens = pipe.time_tokens(timesteps)
        self.coefficients = pipe.step_coefficients(timesteps)
        self.graph = torch.cuda.CUDAGraph()
        self.generator = torch.Generator(device)
        register = getattr(self.graph, "register_generator_state", None)
        self.noise_in_graph = register is not None
        if self.noise_in_graph:
            register(self.generator)
        else:  # the draw runs before each replay, into this static tensor
            self.noise = pipe.chunk_noise(batch_size, self.coefficients, self.generator)

        def chunk() -> tuple[torch.Tensor, torch.Tensor]:
            noise = (
                pipe.chunk_noise(batch_size, self.coefficients, self.generator) if self.noise_in_graph else self.noise
            )
            inputs = PreparedInputs(pipe.normalizer.normalize_obs(self.raw_obs), self.task_ids)
            action_pred = pipe.denoise(
                noise[0], inputs, timesteps, self.time_tokens, denoiser_steps, self.generator, noise[1:]
            )
            output = pipe.postprocess(action_pred, "pt")
            return output.actions, output.action_pred

        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # Triton compilation, cuBLAS handles and workspaces, allocator growth
                    pipe.set_timesteps(self.num_inference_steps)  # a new generation for the block cache
                    chunk()
            torch.cuda.current_stream().wait_stream(stream)
            pipe.set_timesteps(self.num_inference_steps)
            with torch.cuda.graph(self.graph):
                self.actions, self.action_pred = chunk()

    def _default_generator(self) -> torch.Generator:
        return torch.cuda.default_generators[self.device.index if self.device.index is not None else 0]

    @torch.no_grad()
    def __call__(self, observations, task=None, generator=None, output_type: str = "np") -> PolicyPipelineOutput:
        obs = self.pipe.check_observations(observations)
        if len(obs) != self.batch_size:
            raise ValueError(f"this graph was captured for {self.batch_size} environments, got {len(obs)}")
        if self.task_ids is not None:
            tasks = [task] * self.batch_size if isinstance(task, str) else task
            key = None if tasks is None else tuple(tasks)
            if key != self._tasks:  # indices (and their check) only when the tasks change
                self.task_ids.copy_(self.pipe.task_ids(task, self.batch_size))
                self._tasks = key
        else:
            self.pipe.task_ids(task, self.batch_size)  # raises for a task given to a single-task policy
        self.raw_obs.copy_(obs)
        source = generator if generator is not None else self._default_generator()
        if source.device.type != "cuda":
            raise ValueError(f"the graph draws its noise on the GPU: pass a CUDA generator, got one on {source.device}")
        self.generator.set_state(source.get_state())
        if not self.noise_in_graph:
            self.noise.copy_(self.pipe.chunk_noise(self.batch_size, self.coefficients, self.generator))
        self.graph.replay()
        source.set_state(self.generator.get_state())
        if output_type == "np":  # one copy to the host; the executed actions are a slice of the horizon
            action_pred = self.action_pred.cpu().numpy()
            start = self.pipe.transformer.config.n_obs_steps - 1
            return PolicyPipelineOutput(action_pred[:, start : start + self.actions.shape[1]], action_pred)
        if output_type == "pt":
            return PolicyPipelineOutput(self.actions.clone(), self.action_pred.clone())
        raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
