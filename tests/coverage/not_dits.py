"""Classes exported with diffusers' transformers that are not text-to-image or text-to-video diffusion transformers."""

from .registry import not_a_dit

not_a_dit("AceStepTransformer1DModel", "music generation (1D audio latents)")
not_a_dit("LongCatAudioDiTTransformer", "audio generation (1D audio latents)")
not_a_dit("MiniMaxMusic3Transformer1DModel", "music generation (1D audio latents)")
not_a_dit("MiniMaxMusic3RVQDepthDecoder", "autoregressive RVQ token decoder of a music model, not a denoiser")
not_a_dit("StableAudioDiTModel", "audio generation (1D audio latents)")
not_a_dit("StableAudio3DiTModel", "audio generation (1D audio latents)")
not_a_dit("PriorTransformer", "unCLIP prior: denoises one CLIP image embedding, no image or video tokens")
not_a_dit("T5FilmDecoder", "spectrogram diffusion decoder (music), T5-style")
not_a_dit("RFD4ProteinaTransformer", "protein structure generation (residue and pair features)")
not_a_dit(
    "Transformer2DModel", "the attention layer inside UNets (SD 1.x/2.x/XL); DiT and PixArt have their own classes"
)
not_a_dit("TransformerTemporalModel", "the temporal attention layer inside video UNets (AnimateDiff, SVD)")
not_a_dit(
    "Cosmos3OmniTransformer",
    "a mixture-of-transformers vision-language model whose layers take packed understanding and generation "
    "sequences (und_seq, gen_seq), not a denoiser called once per step on latents",
)
not_a_dit("DreamLiteTransformer2DModel", "the attention layer inside the DreamLite U-Net, like Transformer2DModel")
