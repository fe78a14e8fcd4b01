"""Pretrain the bundled latent diffusion model on FedBiP-Shapes' pretraining styles.

The result is a standard ``StableDiffusionPipeline`` folder (CLIPTokenizer with the real SD
v1 BPE vocabulary, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDIM scheduler,
safetensors), loadable offline with ``StableDiffusionPipeline.from_pretrained(folder)``.

Only pretraining images are seen: the 36 named styles (``shapes.PRETRAIN_STYLES``) and the
788 unnamed combinations (``shapes.PRETRAIN_COMBOS``, ``--combo-per-class`` images per class
each). The client styles (medical, satellite, thermal, chalkboard) are combinations of factor
values that never occur three together, under names no caption uses, and the control style
has a palette no pretraining image has. Captions follow FedBiP's template
``"a {style} style of a {class}"`` where {style} is a named style's name or (``--describe``,
half of its captions) its factor words, e.g. "a grayscale patchwork glowing pixelated style of
a star"; an unnamed combination always gets its factor words. Captions are dropped (empty
prompt) with probability ``--caption-dropout`` for classifier-free guidance.

The learning rate is constant after warm-up, so the checkpoint written after step k is the
model that ``--unet-steps k`` would produce (same seed, same machine).

The UNet loss is weighted with Min-SNR-gamma (Hang et al., ICCV 2023; the ``--snr_gamma``
of diffusers' text-to-image example): ``min(SNR(t), gamma) / SNR(t)`` for epsilon prediction,
with SNR from ``diffusers.training_utils.compute_snr``, which stops the nearly-clean timesteps
from dominating the gradient and converges faster. The EMA of the weights is diffusers'
``EMAModel`` and the warm-up ``diffusers.optimization.get_constant_schedule_with_warmup``
(the hand-written versions that trained the shipped weights ramped the rate from step 1 instead
of 0, one step earlier; the rest is the same arithmetic).

Every checkpoint also writes a training state (``.<name>.train_state.pt`` next to the output
folder: fp32 weights, EMA, optimizer, learning-rate schedule, random generator); ``--resume``
continues from it and gives the same weights as an uninterrupted run.

Usage (the shipped weights; see the model card for the exact command and its duration)::

    python -m fedbip_flower.research.pretrain --output fedbip_flower/assets/fedbip-ldm-shapes \
        --seed 0 --per-class 70 --combo-per-class 3 --vae-steps 600 --unet-steps 8000 \
        --threads 2 --tokenizer fedbip_flower/assets/fedbip-ldm-shapes
"""

from __future__ import annotations

import argparse
import gzip
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from fedbip_flower.data import shapes
from fedbip_flower.jsonio import write_json

log = logging.getLogger(__name__)
PROMPT = "a {style} style of a {cls}"


def build_clip_tokenizer(max_length: int = 32):
    """SD v1's CLIP BPE tokenizer, built from the vocabulary shipped in ``open_clip``."""
    from importlib.resources import files

    from transformers import CLIPTokenizer

    try:
        bpe = files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    except ModuleNotFoundError as err:  # pragma: no cover - pretraining-only dependency
        raise SystemExit("pretraining needs `pip install open_clip_torch` for the BPE file") from err
    lines = gzip.open(str(bpe), "rt", encoding="utf-8").read().split("\n")
    merges = [m for m in lines[1 : 49152 - 256 - 2 + 1] if m.strip()]
    bytes_ = _bytes_to_unicode()
    vocab = list(bytes_.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = Path(tempfile.mkdtemp())
    write_json(tmp / "vocab.json", {t: i for i, t in enumerate(vocab)}, indent=None)
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(tmp / "vocab.json"),
        str(tmp / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    shutil.rmtree(tmp)
    ids = tok("a photo of a dog").input_ids
    if ids != [49406, 320, 1125, 539, 320, 1929, 49407]:
        raise RuntimeError(f"tokenizer does not match SD v1-4's ids: {ids}")
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_models(hidden: int = 32, resolution: int = 32):
    """Fresh, randomly initialised components of the bundled LDM architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=resolution,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return text_encoder, vae, unet


def build_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    return DDPMScheduler(**kw), DDIMScheduler(set_alpha_to_one=False, **kw)


def load_tokenizer(source: str | None, max_length: int = 32):
    """SD v1's tokenizer: built from open_clip's vocabulary, or loaded from a pipeline folder."""
    if not source:
        return build_clip_tokenizer(max_length)
    from transformers import CLIPTokenizer

    path = Path(source)
    sub = "tokenizer" if (path / "tokenizer").is_dir() else ""
    tok = CLIPTokenizer.from_pretrained(str(path), subfolder=sub, model_max_length=max_length)
    if tok("a photo of a dog").input_ids != [49406, 320, 1125, 539, 320, 1929, 49407]:
        raise SystemExit(f"{source}: not SD v1's CLIP tokenizer")
    return tok


def snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, from diffusers' ``compute_snr``
    (1 everywhere when gamma <= 0), as in diffusers' text-to-image training script."""
    if gamma <= 0:
        return torch.ones(len(t))
    snr = compute_snr(scheduler, t)
    return torch.clamp(snr, max=gamma) / snr


def state_path(output: Path) -> Path:
    return output.parent / f".{output.name}.train_state.pt"


def _to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, gen) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="VAE", unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def captions(
    labels: np.ndarray, names: Sequence[str | None], words: Sequence[str], seed: int = 0, describe: float = 0.5
) -> list[str]:
    """One caption per image: ``"a {style} style of a {class}"``. For a named style, {style}
    is its name or, with probability ``describe``, its factor words (``shapes.describe``), so
    the model learns both what the names mean and how the factors compose; an unnamed
    combination (``names[i]`` is None) always gets its factor words."""
    rng = np.random.default_rng([seed, 7])
    use_words = rng.random(len(labels)) < describe
    return [
        PROMPT.format(style=w if (n is None or u) else n, cls=shapes.CLASSES[c])
        for c, n, w, u in zip(labels, names, words, use_words, strict=True)
    ]


def pretraining_set(per_class: int, combo_per_class: int, seed: int, resolution: int):
    """Images (uint8 NHWC), labels, and per image the style name (None for an unnamed
    combination) and factor words: the named pretraining styles, then the unnamed ones."""
    imgs, labels, styles = shapes.render_array(shapes.PRETRAIN_STYLES, per_class, seed=seed, resolution=resolution)
    names: list[str | None] = [shapes.STYLES[s] for s in styles]
    words = [shapes.describe(n) for n in names]
    if combo_per_class:
        ci, cl, ck = shapes.render_combos(shapes.PRETRAIN_COMBOS, combo_per_class, seed=seed, resolution=resolution)
        imgs, labels = np.concatenate([imgs, ci]), np.concatenate([labels, cl])
        names += [None] * len(ck)
        words += [" ".join(shapes.PRETRAIN_COMBOS[k]) for k in ck]
    return imgs, labels, names, words


def save_pipeline(out: Path, tokenizer, text_encoder, vae, unet, scheduler, meta: dict) -> None:
    """Save as a StableDiffusionPipeline folder; UNet and VAE stored as fp16 to stay small."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_json(tmp / "fedbip_model_card.json", meta)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32, choices=shapes.SUPPORTED_RESOLUTIONS)
    p.add_argument("--per-class", type=int, default=70, help="images per class and style")
    p.add_argument(
        "--combo-per-class",
        type=int,
        default=3,
        help="images per class of each unnamed combination (shapes.PRETRAIN_COMBOS; 0: named styles only)",
    )
    p.add_argument(
        "--describe",
        type=float,
        default=0.5,
        help="share of a named style's captions using its factor words instead of its name",
    )
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=48)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-gamma weighting (0: off)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=32, help="text encoder width")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument(
        "--tokenizer",
        default="",
        help="pipeline folder holding SD v1's tokenizer (default: build it from open_clip's BPE vocabulary)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()

    n_img = len(shapes.CLASSES) * (
        a.per_class * len(shapes.PRETRAIN_STYLES) + a.combo_per_class * len(shapes.PRETRAIN_COMBOS)
    )
    log.info("rendering %d pretraining images", n_img)
    imgs, labels, names, words = pretraining_set(a.per_class, a.combo_per_class, a.seed + 1000, a.resolution)
    x = _to_tensor(imgs)
    tokenizer = load_tokenizer(a.tokenizer)
    text_encoder, vae, unet = build_models(a.hidden, a.resolution)
    train_sched, infer_sched = build_schedulers()
    resumed = _load_state(a) if a.resume else None
    if resumed is None:
        train_vae(vae, x, a.vae_steps, a.vae_batch, a.vae_lr, gen)
    else:
        vae.load_state_dict(resumed["vae"])
    vae.requires_grad_(False)
    mean, std = encode_all(vae, x)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log.info("VAE done in %.0f s; latent scaling factor %.4f", time.time() - t0, scale)

    caps = captions(labels, names, words, a.seed, a.describe)
    ids_all = tokenizer(caps, padding="max_length", truncation=True, return_tensors="pt")
    ids_all = ids_all.input_ids
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # diffusers' training utilities: EMA with decay min(ema, (1 + k) / (10 + k)) at optimizer
    # step k (update_after_step=-1 counts from the first step), and a linear warm-up.
    ema = EMAModel(params, decay=a.ema, update_after_step=-1)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)
    warmup = get_constant_schedule_with_warmup(opt, num_warmup_steps=a.warmup)
    acp = train_sched.alphas_cumprod
    start = 1
    if resumed is not None:
        unet.load_state_dict(resumed["unet"])
        text_encoder.load_state_dict(resumed["text_encoder"])
        opt.load_state_dict(resumed["optimizer"])
        warmup.load_state_dict(resumed["lr_scheduler"])
        ema.load_state_dict(resumed["ema"])
        gen.set_state(resumed["generator"])
        start = resumed["step"] + 1
        t0 = time.time() - resumed["train_seconds"]
        log.info("resumed after %d UNet steps", resumed["step"])
    meta = {
        "name": "fedbip-ldm-shapes",
        "command": "python -m fedbip_flower.research.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) for k, v in vars(a).items()},
        "pretraining_styles": list(shapes.PRETRAIN_STYLES),
        "unnamed_pretraining_combinations": len(shapes.PRETRAIN_COMBOS) if a.combo_per_class else 0,
        "heldout_styles": list(shapes.HELDOUT_STYLES),
        "control_styles": list(shapes.CONTROL_STYLES),
        "style_factors": {k: list(v) for k, v in shapes.STYLE_FACTORS.items()},
        "classes": list(shapes.CLASSES),
        "prompt_template": PROMPT,
        "resolution": a.resolution,
    }

    def snapshot(step: int) -> None:
        ema.store(params)  # the live weights, put back after saving the EMA ones
        ema.copy_to(params)
        meta.update(unet_steps=step, train_seconds=round(time.time() - t0))
        save_pipeline(a.output, tokenizer, text_encoder, vae, unet, infer_sched, meta)
        ema.restore(params)
        state = {
            "args": _state_args(a),
            "step": step,
            "train_seconds": time.time() - t0,
            "vae": vae.state_dict(),
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": warmup.state_dict(),
            "ema": ema.state_dict(),
            "generator": gen.get_state(),
        }
        tmp = state_path(a.output).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(state_path(a.output))
        log.info("saved EMA weights after %d UNet steps to %s", step, a.output)

    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, a.unet_steps + 1), desc="UNet", unit="step", initial=start - 1, total=a.unet_steps)
    for step in bar:
        idx = torch.randint(0, len(x), (a.batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(a.batch, generator=gen) < a.caption_dropout
        ids[drop] = empty
        t = torch.randint(0, 1000, (a.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        ab = acp[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        cond = text_encoder(ids)[0]
        err = F.mse_loss(unet(zt, t, cond).sample, eps, reduction="none").mean(dim=(1, 2, 3))
        loss = (err * snr_weights(train_sched, t, a.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % a.checkpoint_every == 0 or step == a.unet_steps:
            snapshot(step)
    log.info("pretraining finished in %.1f min", (time.time() - t0) / 60)


def _state_args(a: argparse.Namespace) -> dict:
    """The arguments a resumed run must share with the run it continues."""
    skip = {"output", "unet_steps", "checkpoint_every", "threads", "resume", "tokenizer"}
    return {k: v for k, v in vars(a).items() if k not in skip}


def _load_state(a: argparse.Namespace) -> dict:
    path = state_path(a.output)
    if not path.is_file():
        raise SystemExit(f"--resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    diff = {k: (v, _state_args(a).get(k)) for k, v in state["args"].items() if _state_args(a).get(k) != v}
    if diff:
        raise SystemExit(f"--resume: arguments differ from the saved run (saved, now): {diff}")
    if state["step"] >= a.unet_steps:
        raise SystemExit(f"--resume: the saved run already has {state['step']} >= {a.unet_steps} steps")
    return state


if __name__ == "__main__":
    main()
