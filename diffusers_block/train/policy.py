"""The shipped Meta-World policy: one multi-task transformer diffusion policy trained on scripted-expert demos.

Diffusion Policy's low-dim recipe (Chi et al., 2023) through :func:`diffusers_block.train.loop.train`: windows of
16 steps (2 observations as condition, 8 actions executed), observations and actions min-max normalised to
[-1, 1], DDPM with 100 steps and the squared-cosine schedule, epsilon prediction and sample clipping, AdamW and
EMA weights. The task enters as one learned condition token. ``prediction_type="flow"`` trains the same model with
flow matching instead (x_t = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s) for
FlowMatchEulerDiscreteScheduler.

The result is a stock-layout diffusers pipeline directory (``model_index.json``, ``transformer/``, ``scheduler/``,
``normalizer/``) that ``DiffusionPolicyPipeline.from_pretrained`` loads offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..pipelines.policy.data import DemoDataset
from ..pipelines.policy.model import PolicyTransformer
from ..pipelines.policy.normalizer import PolicyNormalizer
from ..pipelines.policy.pipeline import DiffusionPolicyPipeline
from .digits_image import generator_for_step
from .loop import TrainConfig, train

TRAIN_TIMESTEPS = 100  # Diffusion Policy's DDPM schedule


def ddpm_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type=prediction_type,
        variance_type="fixed_small",
    )


def policy_loss(model, batch: dict, scheduler: DDPMScheduler, prediction_type: str) -> torch.Tensor:
    x0, noise = batch["actions"], batch["noise"]
    if prediction_type == "flow":
        s = batch["s"].view(-1, 1, 1)
        noisy, target, timestep = (1 - s) * x0 + s * noise, noise - x0, batch["s"] * 1000
    else:
        noisy = scheduler.add_noise(x0, noise, batch["t"])
        target, timestep = (noise if prediction_type == "epsilon" else x0), batch["t"]
    prediction = model(noisy, timestep, obs=batch["obs"], task_ids=batch["task_ids"], return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())


def train_policy(
    data_path: str | Path,
    output_dir: str | Path,
    config: TrainConfig,
    prediction_type: str = "epsilon",
    model_kwargs: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Train on the demos at ``data_path``; save the pipeline (weights in ``dtype``) to ``output_dir``."""
    out = Path(output_dir)
    probe = PolicyTransformer(**(model_kwargs or {}))  # the window geometry comes from the model config
    geometry = {k: probe.config[k] for k in ("horizon", "n_obs_steps", "n_action_steps")}
    dataset = DemoDataset(data_path, **geometry)
    normalizer = PolicyNormalizer.fit(dataset.obs, dataset.actions)
    model = PolicyTransformer(
        **{**(model_kwargs or {}), "task_names": tuple(dataset.task_names), "prediction_type": prediction_type}
    )
    scheduler = ddpm_scheduler("epsilon" if prediction_type == "flow" else prediction_type)
    dataset.obs = normalizer.normalize_obs(dataset.obs)
    dataset.actions = normalizer.normalize_action(dataset.actions)

    def sample_batch(step: int, rank: int, device: torch.device) -> dict:
        data = dataset.to(device)  # a no-op after the first batch
        g = generator_for_step(step, rank, config.seed, device)
        batch = data.sample(config.batch_size, g)
        batch["noise"] = torch.randn(batch["actions"].shape, generator=g, device=device)
        batch["t"] = torch.randint(0, TRAIN_TIMESTEPS, (config.batch_size,), generator=g, device=device)
        batch["s"] = torch.rand(config.batch_size, generator=g, device=device)
        return batch

    trained = train(model, sample_batch, lambda m, b: policy_loss(m, b, scheduler, prediction_type), config)
    flow = prediction_type == "flow"
    pipe = DiffusionPolicyPipeline(
        transformer=trained.to("cpu", dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0) if flow else scheduler,
        normalizer=normalizer.to("cpu"),
    )
    pipe.save_pretrained(out)
    return out


def train_policy_cli(args) -> Path:
    """``python -m diffusers_block.train policy ...`` (arguments parsed in ``train/__main__.py``)."""
    config = TrainConfig(
        output_dir=str(Path(args.out) / "runs" / "policy"),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-3,
        warmup_steps=500,
        checkpoint_every=max(args.steps // 4, 1),
        seed=args.seed,
        max_minutes=args.max_minutes,
    )
    return train_policy(args.data, args.out, config, args.prediction_type)
