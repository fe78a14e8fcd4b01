"""Load the frozen latent diffusion model (a Stable-Diffusion-format folder or hub id).

``model.id = "bundled"`` resolves to the small LDM shipped inside the installed package.
Flower unpacks the app bundle (code only, no weights) into its own folder and puts it first
on ``sys.path``, so the weights are looked up in every ``sys.path`` entry, not only next to
this file; ``FEDBIP_BUNDLED_MODEL`` overrides the search.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
BUNDLED_NAME = "fedbip-ldm-shapes"
_REL = Path("fedbip_flower") / "assets" / BUNDLED_NAME


class ModelError(RuntimeError):
    """The configured model cannot be found or loaded."""


@dataclass
class LDMComponents:
    """The frozen parts of the LDM plus its identity."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object  # DDIM, for synthesis
    train_scheduler: object  # DDPM, for the concept loss and forward diffusion
    fingerprint: str
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def bundled_model_path() -> Path:
    """Folder of the shipped LDM, wherever the package is installed."""
    env = os.environ.get("FEDBIP_BUNDLED_MODEL")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "assets" / BUNDLED_NAME)
    candidates += [Path(p) / _REL for p in sys.path if p]
    for c in candidates:
        if (c / "model_index.json").is_file():
            return c
    raise ModelError(
        "the bundled LDM was not found (looked for fedbip_flower/assets/"
        f"{BUNDLED_NAME}/model_index.json next to the package and on sys.path). "
        "Install the project (`pip install -e .`) or set model.id to a model folder."
    )


def resolve_model(model_id: str) -> str:
    if model_id == "bundled":
        return str(bundled_model_path())
    p = Path(model_id).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise ModelError(f"model folder {str(p)!r} has no model_index.json (not a diffusers pipeline)")
        return str(p.resolve())
    if model_id.startswith(("/", ".", "~")):
        raise ModelError(f"model folder {model_id!r} does not exist")
    return model_id  # a hub id


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {name!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def pick_devices(spec: str) -> list[torch.device]:
    """The devices of a ``model.device`` value: ``auto`` = every visible GPU (else the CPU),
    or a comma-separated list (a device may repeat: two workers sharing it)."""
    from fedbip_flower.config import device_list

    items = device_list(spec)
    if items == ["auto"]:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]
    return [pick_device(d) for d in items]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16}[name]


def fingerprint(text_encoder, vae, unet) -> str:
    """Identity of a model: its configs plus a sample of its weights (cheap for SD sizes)."""
    h = hashlib.sha256()
    for m in (text_encoder, vae, unet):
        cfg = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for _, p in list(m.named_parameters())[:: max(1, len(list(m.parameters())) // 8)]:
            h.update(p.detach().flatten()[:64].float().cpu().numpy().round(3).tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _load(source: str, device: str, dtype_name: str) -> LDMComponents:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    dtype = getattr(torch, dtype_name)
    try:
        tok = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        te = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
        sched_cfg = DDIMScheduler.load_config(source, subfolder="scheduler")
    except Exception as err:
        raise ModelError(f"cannot load the LDM from {source!r}: {err}") from err
    fp = fingerprint(te, vae, unet)
    dev = torch.device(device)
    for m in (te, vae, unet):
        m.requires_grad_(False)
        m.eval()
        m.to(dev) if dtype == torch.float32 else m.to(dev, dtype)
    # NHWC convolutions: ~15-30% faster UNet on CPU (oneDNN) and GPU (cuDNN), same results.
    unet.to(memory_format=torch.channels_last)
    return LDMComponents(
        tokenizer=tok,
        text_encoder=te,
        vae=vae,
        unet=unet,
        scheduler=DDIMScheduler.from_config(sched_cfg),
        train_scheduler=DDPMScheduler.from_config(sched_cfg),
        fingerprint=fp,
        source=source,
        device=dev,
        dtype=dtype,
    )


def load_components(model_id: str, device: str = "auto", dtype: str = "auto") -> LDMComponents:
    """Load (and cache per process) the frozen LDM parts on ``device``."""
    source = resolve_model(model_id)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    log.info("loading LDM %s on %s (%s)", source, dev, dt)
    return _load(source, str(dev), str(dt).replace("torch.", ""))


def load_server_components(model_id: str, device: str = "auto", dtype: str = "auto") -> list[LDMComponents]:
    """The LDM once per server device (:func:`pick_devices`); the first is the main one
    (screening, classifier), all of them synthesize. A repeated device shares one copy."""
    return [load_components(model_id, str(d), dtype) for d in pick_devices(device)]
