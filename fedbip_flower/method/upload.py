"""What a FedBiP client uploads, as the method sees it (no Flower here).

Noised latents z(T) and their labels (instance level), the learned domain and class concept
vectors (concept level), and what the server needs to use them: class names, domain, prompt
template, timestep, injection mode and the model's fingerprint. No image: only latents,
labels and concept vectors. The wire format and its validation are in
:mod:`fedbip_flower.federation.payload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedbip_flower.method.embeddings import PromptLayout, build_layout


@dataclass
class ClientPayload:
    latents: torch.Tensor  # z(T), float16 (N, C, h, w)
    labels: torch.Tensor  # int64 (N,)
    s: torch.Tensor  # float32 (n_s, D)
    v: torch.Tensor  # float32 (K, n_v, D)
    v_classes: torch.Tensor  # int64 (K,): which class each row of v belongs to
    class_names: list[str]
    domain: str
    template: str
    timestep: int
    injection: str
    model_fingerprint: str
    metrics: dict[str, float] = field(default_factory=dict)


def prompt_layout(tokenizer, payload: ClientPayload) -> PromptLayout:
    """The prompt layout synthesis uses for ``payload`` (one row per row of ``v``)."""
    return build_layout(
        tokenizer,
        payload.template,
        payload.s.shape[0],
        payload.v.shape[1],
        payload.domain,
        [payload.class_names[int(c)] for c in payload.v_classes],
    )
