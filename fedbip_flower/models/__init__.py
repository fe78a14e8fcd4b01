"""The networks: the latent diffusion model as diffusers components, bundled or any
StableDiffusionPipeline folder / hub id (``ldm``), and the global classifier (``classifier``)."""
