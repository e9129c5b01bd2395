"""``DiffusionPolicyPipeline``: an observation history in, a chunk of actions out.

Diffusion Policy's inference (Chi et al., 2023): start from Gaussian noise over the whole action horizon, denoise it
with a diffusers scheduler conditioned on the last ``n_obs_steps`` observations, and execute ``n_action_steps``
actions starting at the current step (index ``n_obs_steps - 1`` of the horizon). Everything is batched over
environments. Observations and actions are normalised by the :class:`PolicyNormalizer` saved with the policy.

Schedulers: DDPM with 100 steps (Diffusion Policy's default), DDIM (fewer steps, same weights), or
FlowMatchEulerDiscreteScheduler for a policy trained with flow matching (``prediction_type="flow"``).

The denoising loop (:meth:`DiffusionPolicyPipeline.denoise`) reads only tensors already on the device and Python
numbers: the timesteps stay on the CPU, so the scheduler's arithmetic uses host scalars and nothing in the loop waits
for the GPU. That is what lets :mod:`.graph` capture the whole loop, block cache included, in one CUDA graph.

With DDPM (the default) a step is one fused kernel (:mod:`.ddpm_step`) and all of a chunk's random numbers, the
initial noise and every step's noise, come from one draw (:meth:`DiffusionPolicyPipeline.chunk_noise`): a chunk
launches fewer kernels, and a CUDA graph replay of it draws exactly what the eager call draws from the same seed.
The condition tokens of every step are built in one batch too (observations are encoded once per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...state import TRACKER_HOOK
from .ddpm_step import DDPMStepCoefficients, ddpm_step
from .model import PolicyTransformer
from .normalizer import PolicyNormalizer


class PolicyInputError(ValueError):
    """An observation or task the policy cannot act on (wrong size, unknown task)."""


@dataclass
class PolicyPipelineOutput(BaseOutput):
    """actions: (B, n_action_steps, action_dim), the chunk to execute now; action_pred: the whole predicted horizon."""

    actions: np.ndarray | torch.Tensor
    action_pred: np.ndarray | torch.Tensor


@dataclass
class PreparedInputs:
    """Normalised observations (B, n_obs_steps, obs_dim) and task indices (B,) on the policy's device."""

    obs: torch.Tensor
    task_ids: torch.Tensor | None


class DiffusionPolicyPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: PolicyTransformer, scheduler, normalizer: PolicyNormalizer) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, normalizer=normalizer)

    # -- inputs -------------------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.transformer.config.task_names)

    def task_ids(self, task: str | Sequence[str] | None, batch_size: int) -> torch.Tensor | None:
        """Task names -> indices of the policy's task tokens; a clear error for a task it was not trained on."""
        names = self.task_names
        if not names:
            if task is not None:
                raise PolicyInputError(f"this policy has no task input (single-task); got task={task!r}")
            return None
        if task is None:
            raise PolicyInputError(f"this policy serves several tasks: pass task= one of {names}")
        tasks = [task] * batch_size if isinstance(task, str) else list(task)
        if len(tasks) != batch_size:
            raise PolicyInputError(f"got {len(tasks)} task names for a batch of {batch_size} observation histories")
        unknown = sorted(set(tasks) - set(names))
        if unknown:
            raise PolicyInputError(
                f"this policy was not trained for task(s) {unknown}; it was trained for {names}. Load a policy "
                f"trained for that task, or pick one of these."
            )
        return torch.tensor([names.index(t) for t in tasks], device=self._execution_device)

    def check_observations(self, observations) -> torch.Tensor:
        """Raw observations as a float32 (B, n_obs_steps, obs_dim) tensor, on the device they came from; a clear error
        for a wrong shape. ``observations``: (n_obs_steps, obs_dim) for one environment or (B, n_obs_steps,
        obs_dim), array or tensor; a longer history is cut to its last ``n_obs_steps`` steps."""
        config = self.transformer.config
        obs = torch.as_tensor(np.asarray(observations) if not torch.is_tensor(observations) else observations)
        if obs.ndim == 2:
            obs = obs[None]
        if obs.ndim != 3:
            raise PolicyInputError(
                f"observations must be (n_obs_steps, obs_dim) or (batch, n_obs_steps, obs_dim), got shape "
                f"{tuple(obs.shape)}"
            )
        if obs.shape[-1] != config.obs_dim:
            raise PolicyInputError(
                f"observation has {obs.shape[-1]} values per step, but this policy was trained on {config.obs_dim}-d "
                f"observations (Meta-World's state observation is 39-d); pass the environment's full observation"
            )
        if obs.shape[1] < config.n_obs_steps:
            raise PolicyInputError(
                f"the policy needs the last {config.n_obs_steps} observations, got {obs.shape[1]}; repeat the first "
                f"observation to pad the history at the start of an episode"
            )
        return obs[:, -config.n_obs_steps :].to(torch.float32)

    def prepare_inputs(self, observations, task: str | Sequence[str] | None = None) -> PreparedInputs:
        """Normalised observations and task indices on the policy's device (see :meth:`check_observations`)."""
        obs = self.check_observations(observations).to(self._execution_device)
        return PreparedInputs(self.normalizer.normalize_obs(obs), self.task_ids(task, len(obs)))

    def check_scheduler(self) -> None:
        flow_scheduler = isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)
        flow_model = self.transformer.config.prediction_type == "flow"
        if flow_scheduler != flow_model:
            raise ValueError(
                f"{type(self.scheduler).__name__} cannot sample a policy trained with prediction_type="
                f"{self.transformer.config.prediction_type!r}: use "
                + ("DDPMScheduler or DDIMScheduler" if flow_scheduler else "FlowMatchEulerDiscreteScheduler")
            )
        if not flow_model and self.scheduler.config.prediction_type != self.transformer.config.prediction_type:
            raise ValueError(
                f"the scheduler's prediction_type {self.scheduler.config.prediction_type!r} differs from the "
                f"policy's {self.transformer.config.prediction_type!r}"
            )

    # -- sampling -----------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> list:
        """Set the schedule (timesteps kept on the CPU, see the module docstring); returns them as Python numbers."""
        self.scheduler.set_timesteps(num_inference_steps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)  # no timestep lookup (a device sync) inside step()
        return self.scheduler.timesteps.tolist()

    def time_tokens(self, timesteps: Sequence[float]) -> torch.Tensor:
        """Encoded time tokens of every step of the schedule, (K, hidden_size), in one batch."""
        t = torch.tensor(timesteps, dtype=torch.float32, device=self._execution_device)
        return self.transformer.encode_time(t)

    def step_coefficients(self, timesteps: Sequence[float]) -> DDPMStepCoefficients | None:
        """The fused DDPM step's coefficients for ``timesteps``, or None for a scheduler it does not cover (then the
        loop calls ``scheduler.step``)."""
        return DDPMStepCoefficients.from_scheduler(self.scheduler, timesteps)

    def chunk_noise(
        self, batch_size: int, coefficients: DDPMStepCoefficients | None = None, generator=None
    ) -> torch.Tensor:
        """All random numbers of one chunk in one draw, (1 + noisy steps, B, horizon, action_dim): row 0 is the
        initial noise (times the scheduler's ``init_noise_sigma``), row 1 + i the noise of fused DDPM step i."""
        config = self.transformer.config
        rows = 1 + (coefficients.noisy_steps() if coefficients is not None else 0)
        # Drawn environment-major (as a list of per-environment generators needs), so environment b gets the same
        # numbers in any batch size; then one copy makes every row contiguous for the step kernel.
        noise = randn_tensor(
            (batch_size, rows, config.horizon, config.action_dim),
            generator=generator,
            device=self._execution_device,
            dtype=self.transformer.dtype,
        )
        noise = noise.transpose(0, 1).contiguous()
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        if sigma != 1.0:
            noise[0] *= sigma
        return noise

    def initial_noise(self, batch_size: int, generator=None) -> torch.Tensor:
        """Initial noise only, (B, horizon, action_dim)."""
        return self.chunk_noise(batch_size, None, generator)[0]

    def condition_tokens(self, inputs: PreparedInputs, time_tokens: torch.Tensor) -> torch.Tensor:
        """The condition tokens of every step, (K, B, 1 + n_obs_steps [+ 1], hidden_size): the observations are
        encoded once and joined to each step's time token in one op."""
        model = self.transformer
        obs_tokens = model.encode_observation(inputs.obs.to(model.dtype), inputs.task_ids)
        steps, (batch, tokens, dim) = time_tokens.shape[0], obs_tokens.shape
        return torch.cat(
            [time_tokens[:, None, None].expand(steps, batch, 1, dim), obs_tokens.expand(steps, batch, tokens, dim)],
            dim=2,
        )

    def denoise(
        self,
        latents: torch.Tensor,
        inputs: PreparedInputs,
        timesteps: Sequence[float],
        time_tokens: torch.Tensor,
        denoiser_steps: Sequence[int] | None = None,
        generator=None,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoising loop over normalised actions; returns the normalised predicted horizon (B, horizon, A).

        ``denoiser_steps``: if given, the transformer runs only at these step indices and every other step reuses
        the last prediction (skipping whole steps, as a baseline for block caching).
        ``step_noise``: the fused DDPM steps' noise, rows 1: of :meth:`chunk_noise`; without it each noisy step
        draws its own from ``generator`` (as ``DDPMScheduler.step`` does).
        """
        model = self.transformer
        conds = self.condition_tokens(inputs, time_tokens)
        coefficients = self.step_coefficients(timesteps)
        # The fused step bypasses scheduler.step, which is how a block cache counts steps: tell its tracker instead.
        registry = getattr(model, "_diffusers_hook", None)
        hook = registry.get_hook(TRACKER_HOOK) if coefficients is not None and registry is not None else None
        tracker = getattr(hook, "tracker", None)
        run = None if denoiser_steps is None else set(denoiser_steps)
        prediction = None
        for i, t in enumerate(timesteps):
            if run is None or i in run or prediction is None:
                scale = getattr(self.scheduler, "scale_model_input", None)  # FlowMatchEuler has none
                model_input = latents if scale is None else scale(latents, t)
                if tracker is not None and i > 0:
                    tracker.on_step_start(i)
                prediction = model(model_input, t, encoder_hidden_states=conds[i], return_dict=False)[0]
            if coefficients is None:
                latents = self.scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
                continue
            noise = None
            if coefficients.std[i] > 0:
                noise = (
                    step_noise[i]
                    if step_noise is not None
                    else randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                )
            latents = ddpm_step(prediction, latents, noise, coefficients, i)
        return latents

    def postprocess(self, action_pred: torch.Tensor, output_type: str) -> PolicyPipelineOutput:
        config = self.transformer.config
        action_pred = self.normalizer.unnormalize_action(action_pred.float())
        start = config.n_obs_steps - 1
        actions = action_pred[:, start : start + config.n_action_steps]
        if output_type == "np":
            return PolicyPipelineOutput(actions.cpu().numpy(), action_pred.cpu().numpy())
        if output_type == "pt":
            return PolicyPipelineOutput(actions, action_pred)
        raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        observations,
        task: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        denoiser_steps: Sequence[int] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        """Actions to execute for a batch of observation histories.

        observations: (n_obs_steps, obs_dim) or (B, n_obs_steps, obs_dim) raw (unnormalised) observations.
        task: the task name (or one per environment) of a multi-task policy.
        num_inference_steps: default the scheduler's training steps (100 DDPM steps, as Diffusion Policy).
        Returns :class:`PolicyPipelineOutput` (numpy with ``output_type="np"``), or a tuple (actions, action_pred).
        """
        self.check_scheduler()
        inputs = self.prepare_inputs(observations, task)
        steps = num_inference_steps or self.scheduler.config.num_train_timesteps
        timesteps = self.set_timesteps(steps)
        noise = self.chunk_noise(len(inputs.obs), self.step_coefficients(timesteps), generator)
        action_pred = self.denoise(
            noise[0], inputs, timesteps, self.time_tokens(timesteps), denoiser_steps, generator, noise[1:]
        )
        output = self.postprocess(action_pred, output_type)
        self.maybe_free_model_hooks()
        return output if return_dict else (output.actions, output.action_pred)
