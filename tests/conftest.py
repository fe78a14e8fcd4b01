"""Shared fixtures: a tiny, randomly initialised LDM in the real (SD) folder format.

The tiny model uses the bundled model's tokenizer (SD v1's real CLIP vocabulary, shipped
in the repository) and the same component classes as the bundled LDM, so production code
runs unchanged on it; only the sizes are small.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def build_tiny_model(folder, seed: int = 0, hidden: int = 16, max_len: int = 32) -> str:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    from fedbip_flower.models.ldm import bundled_model_path
    from fedbip_flower.research.pretrain import build_schedulers

    tok = CLIPTokenizerFast.from_pretrained(str(bundled_model_path()), subfolder="tokenizer")
    tok.model_max_length = max_len
    torch.manual_seed(seed)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_len,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        mid_block_add_attention=False,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=hidden,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    _, ddim = build_schedulers()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=ddim,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny SD-format pipeline folder (random weights)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-ldm"))


@pytest.fixture(scope="session")
def tiny_components(tiny_model):
    from fedbip_flower.models.ldm import load_components

    return load_components(tiny_model, "cpu", "float32")


@pytest.fixture
def fast_run_config(tiny_model) -> dict:
    """A run config small enough for unit and app tests."""
    return {
        "model.id": tiny_model,
        "data.per-class": 6,
        "data.shots": 3,
        "data.max-test-per-class": 3,
        "client.steps": 2,
        "client.batch-size": 8,
        "server.inference-steps": 2,
        "server.multiplier": 1,
        "server.batch-size": 16,
        "classifier.epochs": 1,
        "classifier.batch-size": 16,
        "min-clients": 2,
        "server.wait-timeout": 5.0,
    }
