"""FedBiPSynthesisPipeline: batched DDIM denoising from given noised latents at timestep T.

Unlike ``StableDiffusionPipeline`` (which starts from fresh noise at the first timestep), it
starts from the uploaded z(T) and runs only the schedule's timesteps <= T, conditioned on
per-image prompt embeddings, with classifier-free guidance. One call handles a whole batch.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class FedBiPSynthesisPipeline(DiffusionPipeline):
    """Denoise a batch of latents from ``start_timestep`` and decode them.

    Args:
        vae: the LDM's ``AutoencoderKL``.
        unet: the LDM's ``UNet2DConditionModel``.
        scheduler: a DDIM scheduler (any scheduler with ``set_timesteps``/``step`` works).
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    def timesteps_from(self, start_timestep: int, num_inference_steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps)
        ts = self.scheduler.timesteps
        return ts[ts <= start_timestep]

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        start_timestep: int = 999,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Return images in [0, 1] (``output_type="pt"``: float tensor B x 3 x H x W)."""
        unet, dev = self.unet, self.unet.device
        dtype = unet.dtype
        x = latents.to(dev, dtype)
        cond = prompt_embeds.to(dev, dtype)
        use_cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
        if use_cfg:
            neg = negative_prompt_embeds.to(dev, dtype).expand(len(x), -1, -1)
            cond = torch.cat([neg, cond])
        for t in self.progress_bar(self.timesteps_from(start_timestep, num_inference_steps)):
            inp = torch.cat([x, x]) if use_cfg else x
            inp = self.scheduler.scale_model_input(inp, t)
            noise = unet(inp, t, encoder_hidden_states=cond).sample
            if use_cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(noise, t, x, eta=eta, generator=generator).prev_sample
        images = self.vae.decode(x / self.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
