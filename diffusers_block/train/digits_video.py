"""The shipped video model: a Wan-architecture flow-matching transformer on moving digits, run by a stock WanPipeline.

Clips are 17 frames of one handwritten digit moving on a 32x32 canvas (``data.digits.make_moving_digits``),
conditioned on the digit and its motion class. 17, not 16: WanPipeline and AutoencoderKLWan take ``4k + 1`` frames
(the first frame is encoded on its own, then chunks of four).

Two stages, both through :func:`diffusers_block.train.loop.train`:

1. ``AutoencoderKLWan`` (1 -> 4 channels, 2x down in space and in time: 17x32x32 -> 9x16x16), trained on
   9-frame windows (two causal chunks after the first frame) with reconstruction + a small KL term; afterwards its
   per-channel ``latents_mean`` / ``latents_std`` are set from the training latents, as WanPipeline expects.
2. ``WanTransformer3DModel`` + a :class:`ClipLabelEncoder` trained jointly with rectified flow (x_t = (1 - t) x0 +
   t noise, target noise - x0, logit-normal t), labels dropped 10% of the time for classifier-free guidance.

The result is saved as a stock ``WanPipeline`` (its tokenizer and text-encoder slots hold ``NoTextEncoder``:
prompts are the label encoder's embeddings, saved beside it in ``label_encoder/``), loadable offline with plain
``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from ..data.digits import MOTIONS, make_moving_digits
from ..zoo.label_encoder import ClipLabelEncoder
from ..zoo.no_text_encoder import fill_text_slots
from .digits_image import LABEL_DROPOUT, generator_for_step, rectified_flow_loss
from .loop import TrainConfig, process_device, train

FRAMES = 17
CANVAS = 32
VAE_WINDOW = 9  # the first frame plus two causal chunks of four: the decoder sees its feature cache carried over


def build_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=32,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        in_channels=1,
        out_channels=1,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    )


def build_transformer(width: int = 256, layers: int = 8, head_dim: int = 64, text_dim: int = 64):
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=4 * width,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def make_clips(
    n_clips: int, seed: int, canvas: int = CANVAS, digit_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training clips (N, 1, F, H, W) in [-1, 1] (the layout AutoencoderKLWan takes), digit and motion labels."""
    clips, labels = make_moving_digits(n_clips, "train", frames=FRAMES, size=canvas, seed=seed, digit_size=digit_size)
    return clips.transpose(1, 2).contiguous(), labels["digits"][:, 0], labels["motion"]


def train_vae(config: TrainConfig, clips: torch.Tensor, kl_weight: float = 1e-4) -> AutoencoderKLWan:
    on_device = functools.cache(clips.to)  # one copy per device, not one per step

    def sample_batch(step, rank, device):
        data = on_device(device)
        g = generator_for_step(step, rank, config.seed, device)
        index = torch.randint(0, len(data), (config.batch_size,), generator=g, device=device)
        start = int(torch.randint(0, FRAMES - VAE_WINDOW + 1, (1,), generator=g, device=device))
        return {"clips": data[index, :, start : start + VAE_WINDOW]}

    def loss_fn(vae, batch):
        posterior = vae.encode(batch["clips"]).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return F.mse_loss(reconstruction, batch["clips"]) + kl_weight * kl

    vae = train(build_vae(), sample_batch, loss_fn, config)
    mean, std = latent_statistics(vae, clips)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return vae


def load_vae(path: str) -> AutoencoderKLWan:
    """A trained autoencoder from ``path`` (its own folder, or a pipeline folder with ``vae/``), in float32."""
    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no AutoencoderKLWan in {path}: pass the folder --vae-only wrote (OUT/vae)")
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32)
    return vae.to(process_device())


@torch.no_grad()
def encode_clips(vae: AutoencoderKLWan, clips: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every clip, computed on the VAE's device, returned there."""
    device = next(vae.parameters()).device
    posteriors = [vae.encode(part.to(device, vae.dtype)).latent_dist for part in clips.split(chunk)]
    return torch.cat([p.mean.float() for p in posteriors]), torch.cat([p.std.float() for p in posteriors])


def latent_statistics(vae: AutoencoderKLWan, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, _ = encode_clips(vae, clips[:4096])
    return means.mean(dim=(0, 2, 3, 4)).cpu(), means.std(dim=(0, 2, 3, 4)).cpu()


def train_flow_transformer(
    config: TrainConfig, vae, clips, digits, motions, compile: bool = False, width: int = 256, layers: int = 8
):
    """``compile``: ``torch.compile`` the transformer in place (same state dict); training is bound by its many small
    elementwise kernels (modulation, norms, rotary embedding), which compilation fuses."""
    means, stds = encode_clips(vae, clips)
    shift = torch.tensor(vae.config.latents_mean, device=means.device).view(1, -1, 1, 1, 1)
    scale = torch.tensor(vae.config.latents_std, device=means.device).view(1, -1, 1, 1, 1)
    transformer = build_transformer(width=width, layers=layers)
    if compile:
        transformer.compile()
    encoder = ClipLabelEncoder(num_digits=10, num_motions=len(MOTIONS), dim=transformer.config.text_dim)
    model = torch.nn.ModuleDict({"transformer": transformer, "label_encoder": encoder})

    @functools.cache  # one copy per device, not one per step
    def on_device(device):
        return means.to(device), stds.to(device), digits.to(device), motions.to(device)

    def sample_batch(step, rank, device):
        mu, sigma, d, m = on_device(device)
        g = generator_for_step(step, rank, config.seed, device)
        index = torch.randint(0, len(mu), (config.batch_size,), generator=g, device=device)
        sample = mu[index] + sigma[index] * torch.randn(mu[index].shape, generator=g, device=device)
        x0 = (sample - shift.to(device)) / scale.to(device)
        drop = torch.rand(len(index), generator=g, device=device) < LABEL_DROPOUT
        null_digit, null_motion = encoder.config.num_digits, encoder.config.num_motions
        t = torch.sigmoid(torch.randn(len(index), generator=g, device=device))  # logit-normal(0, 1)
        return {
            "x0": x0,
            "digits": torch.where(drop, null_digit, d[index]),
            "motions": torch.where(drop, null_motion, m[index]),
            "t": t,
            "noise": torch.randn(x0.shape, generator=g, device=device),
        }

    def loss_fn(model, batch):
        tokens = model["label_encoder"](batch["digits"], batch["motions"])

        def velocity(x_t, timestep):
            return model["transformer"](
                hidden_states=x_t, timestep=timestep, encoder_hidden_states=tokens, return_dict=False
            )[0]

        return rectified_flow_loss(velocity, batch["x0"], batch["noise"], batch["t"])

    trained = train(model, sample_batch, loss_fn, config)
    return trained["transformer"], trained["label_encoder"]


def train_digits_video(
    output_dir: str,
    vae_steps: int,
    steps: int,
    clips: int = 20000,
    vae_batch_size: int = 64,
    flow_batch_size: int = 256,
    seed: int = 0,
    vae_minutes: float | None = None,
    max_minutes: float | None = None,
    compile: bool = False,
    vae_from: str | None = None,
    vae_only: bool = False,
    canvas: int = CANVAS,
    digit_size: int | None = None,
    width: int = 256,
    layers: int = 8,
) -> Path:
    """Both stages; saves the pipeline (bf16 weights) to ``output_dir`` and returns the path.

    The stages can run apart (e.g. in two jobs of a time-limited machine): ``vae_only`` trains the autoencoder and
    saves it (float32) to ``output_dir/vae``; ``vae_from`` (that folder, or a pipeline folder holding ``vae/``) skips
    stage 1 and trains the transformer on it.

    ``canvas`` / ``digit_size`` shape the clips (``make_moving_digits``), ``width`` / ``layers`` the transformer. The
    autoencoder is convolutional, so one trained on 14 px digits on a 32 px canvas serves the same digits on a larger
    canvas: that is how the long-sequence model (64 px canvas, 4x the tokens) reuses the shipped one.
    """
    if vae_only and vae_from:
        raise ValueError("vae_only trains the autoencoder and vae_from reuses one: pass one of them")
    out = Path(output_dir)
    data, digits, motions = make_clips(clips, seed, canvas, digit_size)
    base = TrainConfig(
        output_dir=str(out / "runs" / "vae"),
        steps=vae_steps,
        batch_size=vae_batch_size,
        lr=1e-3,
        warmup_steps=100,
        seed=seed,
        checkpoint_every=max(vae_steps // 4, 1),
        max_minutes=vae_minutes,
    )
    if vae_from:
        vae = load_vae(vae_from)
    else:
        vae = train_vae(base, data)
    if vae_only:
        vae.to("cpu", torch.float32).save_pretrained(out / "vae")
        return out / "vae"
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
    transformer, encoder = train_flow_transformer(flow, vae, data, digits, motions, compile, width, layers)
    pipe = WanPipeline(
        transformer=transformer.to("cpu", torch.bfloat16),
        vae=vae.to("cpu", torch.bfloat16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        text_encoder=None,
        tokenizer=None,
    )
    fill_text_slots(pipe)  # loadable with plain DiffusionPipeline.from_pretrained
    pipe.save_pretrained(out)
    encoder.to("cpu", torch.bfloat16).save_pretrained(out / "label_encoder")
    return out
