"""A StableDiffusionPipeline folder with Stable Diffusion v1-4's architecture and random weights.

No SD weights exist offline, but the cost of FedBiP on a GPU is a property of the architecture,
not of the weights. This writes a folder that ``model.id`` accepts, for speed and memory checks
at full size (UNet 860M parameters, CLIP ViT-L/14 text encoder, 77 tokens, 512 px images):

    python -m fedbip_flower.research.sdarch /tmp/sd-v1-4-random [--dtype float16]

The configurations are those of CompVis/stable-diffusion-v1-4 (unet, vae, text_encoder); the
tokenizer is the bundled one (SD v1's own CLIP BPE vocabulary) with SD's 77-token context, and
the scheduler is the bundled DDIM config (SD's scaled-linear betas).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from fedbip_flower.models.ldm import bundled_model_path

log = logging.getLogger(__name__)

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


def write_sd_v1_4_random(out: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    src = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(src, subfolder="tokenizer")
    tok.model_max_length = 77
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        tokenizer=tok,
        unet=UNet2DConditionModel(**UNET),
        scheduler=DDIMScheduler.from_pretrained(src, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in pipe.unet.parameters())
    log.info("wrote %s (UNet %.0fM parameters, %s)", out, n / 1e6, dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    write_sd_v1_4_random(a.out, a.seed, getattr(torch, a.dtype))


if __name__ == "__main__":
    main()
