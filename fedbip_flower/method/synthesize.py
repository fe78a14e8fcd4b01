"""Server side of FedBiP: uploads -> a labelled synthetic training set.

For each uploaded z(T): S_hat = S + eta (eta ~ N(0, sigma^2) drawn per image), denoise from
T conditioned on the prompt embedding of (S_hat, V_y) with classifier-free guidance, decode.
``multiplier`` repeats this with fresh concept noise (FedBiP-S/M/L = 1x/5x/10x). Uploads
without latents (concept level only) start from fresh Gaussian noise at the first timestep.
Everything is batched and seeded.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from fedbip_flower.config import ServerConfig
from fedbip_flower.method import embeddings
from fedbip_flower.method.concepts import Concepts
from fedbip_flower.method.pipeline import FedBiPSynthesisPipeline
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.ldm import LDMComponents

log = logging.getLogger(__name__)


def build_pipeline(components: LDMComponents) -> FedBiPSynthesisPipeline:
    """A pipeline over the shared frozen modules with its own scheduler: the scheduler holds
    the timestep state, so pipelines running at once (one per synthesis worker) each need one."""
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    pipe = FedBiPSynthesisPipeline(vae=components.vae, unet=components.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()


@torch.no_grad()
def synthesize_client(
    components: LDMComponents,
    payload: ClientPayload,
    cfg: ServerConfig,
    seed: int,
    progress: bool = True,
    desc: str = "synthesis",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images (uint8, M x 3 x H x W) and labels for one client's upload."""
    dev = components.device
    gen = torch.Generator().manual_seed(seed)
    pipe = build_pipeline(components)
    concepts = Concepts.from_payload(payload, components.tokenizer)
    rows = concepts.rows_for(payload.labels)
    # sigma is relative to the RMS of the uploaded S and V: text-encoder input embeddings
    # have RMS ~0.02-0.05 (SD v1-4's are of that order too), and an absolute sigma of 0.1
    # (the authors' code, whose concepts live in the encoder's output space, RMS ~1) would
    # drown the learned domain concept in noise.
    sigma = cfg.concept_noise * float(concepts.scale)
    uncond = embeddings.empty_prompt_embeds(components)
    concept_only = payload.latents.shape[0] == 0
    n = len(payload.labels)
    start = pipe.timesteps_from(999, cfg.inference_steps)[0].item() if concept_only else payload.timestep
    c, size = components.latent_channels, components.unet.config.sample_size
    out_x, out_y = [], []
    total = cfg.multiplier * ((n + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    for _rep in range(cfg.multiplier):
        for i in range(0, n, cfg.batch_size):
            r = rows[i : i + cfg.batch_size]
            b = len(r)
            if concept_only:
                z = torch.randn((b, c, size, size), generator=gen)
            else:
                z = payload.latents[i : i + b].float()
            emb = concepts(components.text_encoder, r, sigma, gen)  # S_hat = S + eta per image
            ddim_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            images = pipe(
                latents=z,
                prompt_embeds=emb,
                negative_prompt_embeds=uncond,
                start_timestep=int(start),
                num_inference_steps=cfg.inference_steps,
                guidance_scale=cfg.guidance_scale,
                eta=cfg.ddim_eta,
                generator=ddim_gen,
            ).images
            out_x.append(_to_uint8(images))
            out_y.append(payload.labels[i : i + b].clone())
            bar.update(1)
    bar.close()
    return torch.cat(out_x), torch.cat(out_y)


@torch.no_grad()
def synthesize_from_prompts(
    components: LDMComponents,
    prompts: list[str],
    labels: torch.Tensor,
    cfg: ServerConfig,
    seed: int,
    progress: bool = True,
    desc: str = "zero-shot synthesis",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image from fresh noise: one image per label, prompt ``prompts[label]``."""
    dev = components.device
    gen = torch.Generator().manual_seed(seed)
    pipe = build_pipeline(components)
    tok = components.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = components.text_encoder(ids.to(dev))[0]
    uncond = embeddings.empty_prompt_embeds(components)
    c, size = components.latent_channels, components.unet.config.sample_size
    start = int(pipe.timesteps_from(999, cfg.inference_steps)[0])
    out_x = []
    for i in tqdm(range(0, len(labels), cfg.batch_size), desc=desc, disable=not progress, leave=False):
        y = labels[i : i + cfg.batch_size]
        z = torch.randn((len(y), c, size, size), generator=gen)
        ddim_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        images = pipe(
            latents=z,
            prompt_embeds=prompt_embeds[y.to(dev)],
            negative_prompt_embeds=uncond,
            start_timestep=start,
            num_inference_steps=cfg.inference_steps,
            guidance_scale=cfg.guidance_scale,
            eta=cfg.ddim_eta,
            generator=ddim_gen,
        ).images
        out_x.append(_to_uint8(images))
    return torch.cat(out_x), labels.clone()
