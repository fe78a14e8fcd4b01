"""fedbip-flower: FedBiP (one-shot federated learning with personalized latent diffusion
models, Chen et al., CVPR 2025) as a Flower application."""

__version__ = "0.1.0"
