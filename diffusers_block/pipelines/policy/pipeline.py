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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

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

    def prepare_inputs(self, observations, task: str | Sequence[str] | None = None) -> PreparedInputs:
        """``observations``: (n_obs_steps, obs_dim) for one environment or (B, n_obs_steps, obs_dim), array or tensor;
        a longer history is cut to its last ``n_obs_steps`` steps."""
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
        obs = obs[:, -config.n_obs_steps :].to(self._execution_device, torch.float32)
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

    def initial_noise(self, batch_size: int, generator=None) -> torch.Tensor:
        config = self.transformer.config
        noise = randn_tensor(
            (batch_size, config.horizon, config.action_dim),
            generator=generator,
            device=self._execution_device,
            dtype=self.transformer.dtype,
        )
        return noise * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def denoise(
        self,
        latents: torch.Tensor,
        inputs: PreparedInputs,
        timesteps: Sequence[float],
        time_tokens: torch.Tensor,
        denoiser_steps: Sequence[int] | None = None,
        generator=None,
    ) -> torch.Tensor:
        """The denoising loop over normalised actions; returns the normalised predicted horizon (B, horizon, A).

        ``denoiser_steps``: if given, the transformer runs only at these step indices and every other step reuses
        the last prediction (skipping whole steps, as a baseline for block caching).
        """
        model = self.transformer
        obs_tokens = model.encode_observation(inputs.obs.to(model.dtype), inputs.task_ids)
        batch, dim = latents.shape[0], time_tokens.shape[-1]
        run = None if denoiser_steps is None else set(denoiser_steps)
        prediction = None
        for i, t in enumerate(timesteps):
            if run is None or i in run or prediction is None:
                cond = torch.cat([time_tokens[i].expand(batch, 1, dim), obs_tokens], dim=1)
                scale = getattr(self.scheduler, "scale_model_input", None)  # FlowMatchEuler has none
                model_input = latents if scale is None else scale(latents, t)
                prediction = model(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
            latents = self.scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
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
        latents = self.initial_noise(len(inputs.obs), generator)
        action_pred = self.denoise(latents, inputs, timesteps, self.time_tokens(timesteps), denoiser_steps, generator)
        output = self.postprocess(action_pred, output_type)
        self.maybe_free_model_hooks()
        return output if return_dict else (output.actions, output.action_pred)
