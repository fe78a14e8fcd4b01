"""What reproduces the figures of the docs and the bundled model, installed with the package and
never shipped in the app bundle (operators need none of it): ``benchmark`` (FedBiP against its
peers and ablations, privacy audit, speed), ``attacks`` (what one malicious site can do, and the
server's defences), ``scale`` (cost per site, image and device), ``pretrain`` and ``ldm_report``
(how the bundled LDM was made, and its report) and ``sdarch`` (Stable Diffusion v1-4's
architecture with random weights, for GPU checks without the weights)."""
