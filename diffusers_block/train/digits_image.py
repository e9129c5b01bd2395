"""The shipped image model: a class-conditioned flow-matching SD3-architecture transformer on handwritten digits.

Two stages, both through :func:`diffusers_block.train.loop.train`:

1. ``AutoencoderKL`` (1 -> 4 channels, 32x32 -> 16x16): reconstruction + a small KL term; afterwards its
   ``scaling_factor`` / ``shift_factor`` are set from the training latents, as SD3 expects.
2. ``SD3Transformer2DModel`` + a :class:`LabelEncoder` trained jointly with rectified flow (x_t = (1 - t) x0 + t
   noise, target noise - x0, t logit-normal as in SD3), labels dropped 10% of the time for classifier-free guidance.

The result is saved as a stock ``StableDiffusion3Pipeline`` (its tokenizer and text-encoder slots hold
``NoTextEncoder``: prompts are the label encoder's embeddings, saved beside it in ``label_encoder/``), loadable offline
with plain ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from ..data.digits import load_digit_images
from ..zoo.label_encoder import LabelEncoder
from ..zoo.no_text_encoder import fill_text_slots
from .loop import TrainConfig, train

IMAGE_SIZE = 32
LABEL_DROPOUT = 0.1
MAX_SHIFT = 2  # pixels of random translation when training the autoencoder


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_transformer(width: int = 128, layers: int = 10, head_dim: int = 32) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=width,
        caption_projection_dim=width,
        pooled_projection_dim=width,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )


def _random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels, filling with background (-1)."""
    padded = F.pad(images, (MAX_SHIFT,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (2, len(images), 1), generator=generator, device=images.device)
    grid = torch.arange(IMAGE_SIZE, device=images.device)
    rows, cols = (offsets + grid).unbind(0)  # (B, size) each
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def generator_for_step(step: int, rank: int, seed: int, device: torch.device) -> torch.Generator:
    """Batches are drawn on the training device, from a generator seeded by (seed, step, rank)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1_009 + rank)


def train_vae(config: TrainConfig, images: torch.Tensor, kl_weight: float = 1e-4) -> AutoencoderKL:
    on_device = functools.cache(images.to)  # one copy per device, not one per step

    def sample_batch(step, rank, device):
        data = on_device(device)
        g = generator_for_step(step, rank, config.seed, device)
        index = torch.randint(0, len(data), (config.batch_size,), generator=g, device=device)
        return {"images": _random_shift(data[index], g)}

    def loss_fn(vae, batch):
        posterior = vae.encode(batch["images"]).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return (
            F.mse_loss(reconstruction, batch["images"]) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        )

    vae = train(build_vae(), sample_batch, loss_fn, config)
    with torch.no_grad():
        device = next(vae.parameters()).device
        latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean for chunk in images.split(256)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
    return vae


def train_flow_transformer(config: TrainConfig, vae: AutoencoderKL, images: torch.Tensor, labels: torch.Tensor):
    device = next(vae.parameters()).device
    with torch.no_grad():
        posterior = [vae.encode(chunk.to(device)).latent_dist for chunk in images.split(256)]
    means = torch.cat([p.mean for p in posterior]).cpu()
    stds = torch.cat([p.std for p in posterior]).cpu()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    transformer = build_transformer()
    width = transformer.config.joint_attention_dim
    encoder = LabelEncoder(num_classes=10, num_tokens=4, dim=width, pooled_dim=width)
    model = torch.nn.ModuleDict({"transformer": transformer, "label_encoder": encoder})

    @functools.cache  # one copy per device, not one per step
    def on_device(device):
        return means.to(device), stds.to(device), labels.to(device)

    def sample_batch(step, rank, device):
        mu, sigma, y = on_device(device)
        g = generator_for_step(step, rank, config.seed, device)
        index = torch.randint(0, len(mu), (config.batch_size,), generator=g, device=device)
        x0 = (mu[index] + sigma[index] * torch.randn(mu[index].shape, generator=g, device=device) - shift) * scale
        drop = torch.rand(len(index), generator=g, device=device) < LABEL_DROPOUT
        t = torch.sigmoid(torch.randn(len(index), generator=g, device=device))  # logit-normal(0, 1), as SD3
        noise = torch.randn(x0.shape, generator=g, device=device)
        return {"x0": x0, "labels": torch.where(drop, encoder.null_label, y[index]), "t": t, "noise": noise}

    def loss_fn(model, batch):
        tokens, pooled = model["label_encoder"](batch["labels"])

        def velocity(x_t, timestep):
            return model["transformer"](
                hidden_states=x_t,
                encoder_hidden_states=tokens,
                pooled_projections=pooled,
                timestep=timestep,
                return_dict=False,
            )[0]

        return rectified_flow_loss(velocity, batch["x0"], batch["noise"], batch["t"])

    trained = train(model, sample_batch, loss_fn, config)
    return trained["transformer"], trained["label_encoder"]


def rectified_flow_loss(velocity, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE of ``velocity(x_t, 1000 t)`` against noise - x0 on the straight path x_t = (1 - t) x0 + t noise; ``t`` is
    (B,) in [0, 1], scaled to diffusers' 0..1000 timestep convention for flow-matching schedulers."""
    t_b = t.view(-1, *([1] * (x0.ndim - 1)))
    predicted = velocity((1 - t_b) * x0 + t_b * noise, t * 1000)
    return F.mse_loss(predicted.float(), (noise - x0).float())


def train_digits_image(
    output_dir: str,
    vae_steps: int,
    steps: int,
    batch_size: int = 256,
    flow_batch_size: int = 1024,
    seed: int = 0,
    max_minutes: float | None = None,
) -> Path:
    """Both stages; saves the pipeline (bf16 weights) to ``output_dir`` and returns the path."""
    out = Path(output_dir)
    images, labels = load_digit_images("train", IMAGE_SIZE)
    base = TrainConfig(
        output_dir=str(out / "runs" / "vae"),
        steps=vae_steps,
        batch_size=batch_size,
        lr=1e-3,
        warmup_steps=100,
        seed=seed,
        checkpoint_every=max(vae_steps // 4, 1),
    )
    vae = train_vae(base, images)
    flow = replace(
        base,
        output_dir=str(out / "runs" / "transformer"),
        steps=steps,
        lr=5e-4,
        warmup_steps=500,
        batch_size=flow_batch_size,
        checkpoint_every=max(steps // 4, 1),
        max_minutes=max_minutes,
    )
    transformer, encoder = train_flow_transformer(flow, vae, images, labels)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to("cpu", torch.bfloat16),
        vae=vae.to("cpu", torch.bfloat16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    fill_text_slots(pipe)  # loadable with plain DiffusionPipeline.from_pretrained
    pipe.save_pretrained(out)
    encoder.to("cpu", torch.bfloat16).save_pretrained(out / "label_encoder")
    return out
