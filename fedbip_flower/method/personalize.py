"""Client side of FedBiP: bi-level personalization of the frozen LDM -> one upload.

Instance level: VAE-encode each training image once, interpolate it with a different image
of the same class (gamma ~ N(0.5, 0.1^2) clipped to [0, 1]) and forward-diffuse it to the
late timestep T. A class with a single image has no partner: its latent is noised as it is
(gamma = 1), which the noise at T already makes hard to invert.

Concept level: optimise only the domain concept S and the class concepts V
(:class:`~fedbip_flower.method.concepts.Concepts`) with the diffusion loss of the scheduler's prediction
type; the LDM stays frozen. Latents are cached and the frozen parts run without weight
gradients, so the UNet dominates each step.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedbip_flower.config import ClientConfig
from fedbip_flower.data.loading import ClientData
from fedbip_flower.method import embeddings
from fedbip_flower.method.concepts import Concepts
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.ldm import LDMComponents

log = logging.getLogger(__name__)


def first_inference_timestep(scheduler, steps: int) -> int:
    """The first timestep of the server's DDIM schedule (where synthesis starts)."""
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[0])


@torch.no_grad()
def encode_images(components: LDMComponents, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> scaled latent means z(0), float32 on CPU."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(components.device, components.dtype) / 127.5 - 1.0
        out.append(components.vae.encode(x).latent_dist.mean.float().cpu())
    if not out:
        return torch.zeros(0)
    return torch.cat(out) * components.latent_scale


def interpolation_partners(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each image, a different image of the same class (itself if it is alone)."""
    partner = torch.arange(len(labels))
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            continue
        shift = torch.randint(1, len(idx), (len(idx),), generator=gen)
        pos = (torch.arange(len(idx)) + shift) % len(idx)  # never the same position
        partner[idx] = idx[pos]
    return partner


def noised_latents(
    z0: torch.Tensor,
    labels: torch.Tensor,
    timestep: int,
    alphas_cumprod: torch.Tensor,
    cfg: ClientConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """Instance level: interpolate with a same-class partner, forward-diffuse to T, fp16."""
    if cfg.interpolate:
        partner = interpolation_partners(labels, gen)
        gamma = (torch.randn(len(z0), generator=gen) * cfg.gamma_std + cfg.gamma_mean).clamp(0, 1)
        gamma = torch.where(partner == torch.arange(len(z0)), torch.ones_like(gamma), gamma)
        g = gamma.view(-1, 1, 1, 1)
        zbar = g * z0 + (1 - g) * z0[partner]
    else:
        zbar = z0
    ab = alphas_cumprod[timestep].float()
    eps = torch.randn(zbar.shape, generator=gen)
    return (ab.sqrt() * zbar + (1 - ab).sqrt() * eps).to(torch.float16)


def _target(scheduler, z0, eps, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, eps, t)
    raise ValueError(f"unsupported prediction type {kind!r}")


def train_concepts(
    components: LDMComponents,
    z0: torch.Tensor,
    labels: torch.Tensor,
    concepts: Concepts,
    cfg: ClientConfig,
    gen: torch.Generator,
    progress: bool = True,
) -> dict[str, float]:
    """Optimise ``concepts`` (their offsets, in place) with the LDM's diffusion loss.

    ``labels`` are the class ids of ``z0``; each must be one of ``concepts.classes``.
    Returns statistics (first/last loss, seconds/step).
    """
    dev, dtype = components.device, components.dtype
    sched = components.train_scheduler
    rows = concepts.rows_for(labels)
    # The step is taken in units of the initial vectors' RMS (see Concepts): token
    # embeddings are small (RMS ~0.02 in CLIP's input table, ~1 at its output), and Adam's
    # step is about lr per coordinate whatever the scale, so a raw lr that suits one space
    # wrecks the other (lr 0.02 on input embeddings moves them by one RMS per step).
    params = [p for p in concepts.parameters() if p.requires_grad]
    if not params:
        raise ValueError("these concepts have nothing to learn (built without offsets)")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    concepts.base(components.text_encoder)  # output injection: the natural prompts, once
    acp = sched.alphas_cumprod.to(dev)
    n_train = int(sched.config.num_train_timesteps)
    k = concepts.num_classes
    losses: list[float] = []
    step_times: list[float] = []
    bar = tqdm(range(cfg.steps), desc="client concepts", unit="step", disable=not progress, leave=False)
    for _ in bar:
        t_step = time.perf_counter()
        idx = torch.randint(0, len(z0), (min(cfg.batch_size, len(z0)),), generator=gen)
        x0 = z0[idx].to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, n_train, (len(idx),), generator=gen).to(dev)
        ab = acp[t].view(-1, 1, 1, 1)
        xt = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).to(dtype)
        # Encode each class prompt once per step, then gather per sample.
        per_class = concepts(components.text_encoder)
        # Gather per sample with a one-hot matmul: the backward of indexing with repeated
        # indices accumulates in a thread-dependent order on CPU (not bit-reproducible).
        onehot = F.one_hot(rows[idx], k).to(dev, per_class.dtype)
        cond = (onehot @ per_class.flatten(1)).view(len(idx), *per_class.shape[1:])
        pred = components.unet(xt, t, cond.to(dtype)).sample
        loss = F.mse_loss(pred.float(), _target(sched, x0, eps, t).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # also waits for the device, so the step time is real
        step_times.append(time.perf_counter() - t_step)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if len(losses) % max(1, cfg.steps // 4) == 0 and len(losses) < cfg.steps:  # three lines, then the summary
            log.info("personalization: step %d/%d, loss %.4f", len(losses), cfg.steps, losses[-1])
    # The first step pays one-off costs (allocator, kernel selection): the per-step figure is
    # the median of the others.
    steady = step_times[1:] or step_times
    k = max(1, min(10, len(losses) // 5))
    stats = {"seconds-per-step": statistics.median(steady) if steady else 0.0}
    if losses:  # no concept steps, no loss (rather than NaN in the reply and results.json)
        stats |= {"loss-first": sum(losses[:k]) / k, "loss-last": sum(losses[-k:]) / k}
    return stats


def personalize(
    components: LDMComponents,
    data: ClientData,
    cfg: ClientConfig,
    template: str,
    timestep: int,
    seed: int,
    progress: bool = True,
    domain_word: str | None = None,
    learn_domain: bool = True,
) -> ClientPayload:
    """Run FedBiP's bi-level personalization on one client's few-shot data.

    ``domain_word`` (default: the client's domain name) fills the [S] slot and initialises
    S; ``learn_domain=False`` keeps S fixed (the FedDEO-like baseline of the benchmark).
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    labels = data.train_labels
    classes = labels.unique()  # sorted class ids present on this client
    z0 = encode_images(components, data.train_images)
    layout = embeddings.build_layout(
        components.tokenizer,
        template,
        cfg.n_s,
        cfg.n_v,
        domain_word or data.domain,
        [data.class_names[int(c)] for c in classes],
    )
    concepts = Concepts.initialise(
        components.text_encoder, layout, cfg.injection, cfg.init, gen, classes, learn_domain=learn_domain
    )
    stats = train_concepts(components, z0, labels, concepts, cfg, gen, progress)
    s, v = concepts.vectors()
    if cfg.upload_latents:
        zt = noised_latents(z0, labels, timestep, components.train_scheduler.alphas_cumprod, cfg, gen)
    else:  # concept level only: the labels still tell the server how many images to make
        zt = torch.zeros((0, *z0.shape[1:]), dtype=torch.float16)
    stats["client-seconds"] = time.perf_counter() - t0
    stats["num-train"] = float(len(labels))
    stats["num-test"] = float(len(data.test_labels))
    loss = f"loss {stats['loss-first']:.4f} -> {stats['loss-last']:.4f}" if cfg.steps else "no concept steps"
    log.info("personalization done: %s, %d images, %s, %.1f s", data.domain, len(labels), loss, stats["client-seconds"])
    return ClientPayload(
        latents=zt,
        labels=labels,
        s=s,
        v=v,
        v_classes=classes.to(torch.int64),
        class_names=list(data.class_names),
        domain=data.domain,
        template=template,
        timestep=int(timestep),
        injection=cfg.injection,
        model_fingerprint=components.fingerprint,
        metrics=stats,
    )
