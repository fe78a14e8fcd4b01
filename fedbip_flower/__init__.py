"""fedbip-flower: FedBiP (one-shot federated learning with personalized latent diffusion
models, Chen et al., CVPR 2025) as a Flower application.

Layout (each layer imports only the layers above it; ``tests/test_layers.py`` walks every
import, deferred ones included, and imports ``data``, ``models`` and ``method`` with Flower
blocked):

- ``fedbip_flower.data.shapes`` (the bundled benchmark's generator) and
  ``fedbip_flower.pictures`` (image grids): pure helpers, no package imports.
- ``fedbip_flower.config``: the run config (every knob, parsed and checked on construction).
- ``fedbip_flower.data``: what a site holds (its partition, few-shot train / private test
  split) and the bundled FedBiP-Shapes benchmark.
- ``fedbip_flower.models``: the latent diffusion model (diffusers components, bundled or
  SD v1-4) and the global classifier.
- ``fedbip_flower.method``: the FedBiP algorithm without any Flower: the upload
  (``upload.py``), concepts, bi-level personalization (client side) and synthesis (server side).
- ``fedbip_flower.federation``: the Flower side: the upload's wire form and its validation, the
  ClientApp and ServerApp logic, the one-shot strategy and the server pipeline.
- ``fedbip_flower.tools``: operator tooling that never ships in the app bundle: the
  simulation launcher, deployment helpers, benchmark, LDM pretraining and report, fuzzer,
  concept export.

``client_app/`` and ``server_app/`` (top level) hold the Flower ``ClientApp`` and
``ServerApp`` objects; ``pyproject.toml``'s ``fab-include`` ships ``config``, ``data``,
``models``, ``method`` and ``federation`` to the nodes.
"""

__version__ = "0.1.0"
