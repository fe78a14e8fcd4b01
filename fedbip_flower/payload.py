"""The one upload of a client, its RecordDict form, and the server's validation of it.

Record keys: ``"upload"`` (ArrayRecord: latents fp16 (N, C, h, w), labels int64 (N,),
s float32 (n_s, D), v float32 (K, n_v, D), v_classes int64 (K,)) and ``"meta"``
(ConfigRecord: class names, domain, template, timestep, injection, model fingerprint,
counts). No image leaves a client: only noised latents, labels and concept vectors.
The server treats every field as hostile until :func:`validate_reply` accepts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

UPLOAD, META, METRICS = "upload", "meta", "metrics"
_DTYPES = {"latents": "float16", "labels": "int64", "s": "float32", "v": "float32", "v_classes": "int64"}
_NDIMS = {"latents": 4, "labels": 1, "s": 2, "v": 3, "v_classes": 1}


class PayloadError(ValueError):
    """A client's reply is malformed, inconsistent, too large or from another model."""


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

    def to_record_dict(self) -> RecordDict:
        arrays = ArrayRecord(
            {
                "latents": self.latents.to(torch.float16).contiguous(),
                "labels": self.labels.to(torch.int64).contiguous(),
                "s": self.s.float().contiguous(),
                "v": self.v.float().contiguous(),
                "v_classes": self.v_classes.to(torch.int64).contiguous(),
            }
        )
        meta = ConfigRecord(
            {
                "class-names": list(self.class_names),
                "domain": self.domain,
                "template": self.template,
                "timestep": int(self.timestep),
                "injection": self.injection,
                "model-fingerprint": self.model_fingerprint,
                "num-examples": int(self.labels.numel()),
            }
        )
        metrics = MetricRecord({k: float(v) for k, v in self.metrics.items()})
        return RecordDict({UPLOAD: arrays, META: meta, METRICS: metrics})


@dataclass(frozen=True)
class Expected:
    """What the server requires of every upload."""

    model_fingerprint: str
    latent_channels: int
    latent_size: int
    hidden_size: int
    max_bytes: int
    max_images: int
    max_tokens: int = 8
    allow_empty_latents: bool = False


def _array(rec: ArrayRecord, key: str, exp: Expected) -> torch.Tensor:
    if key not in rec:
        raise PayloadError(f"missing array '{key}'")
    arr = rec[key]
    if arr.dtype != _DTYPES[key]:
        raise PayloadError(f"array '{key}' has dtype {arr.dtype}, expected {_DTYPES[key]}")
    shape = tuple(arr.shape)
    if len(shape) != _NDIMS[key] or any((not isinstance(d, int)) or d < 0 for d in shape):
        raise PayloadError(f"array '{key}' has shape {shape}, expected {_NDIMS[key]} dimensions")
    itemsize = np.dtype(_DTYPES[key]).itemsize
    if math.prod(shape) * itemsize > exp.max_bytes:
        raise PayloadError(f"array '{key}' of shape {shape} exceeds the size cap")
    try:
        data = arr.numpy()
    except Exception as err:  # corrupt bytes, pickles (numpy refuses them), truncation
        raise PayloadError(f"array '{key}' cannot be decoded: {err}") from err
    if tuple(data.shape) != shape or str(data.dtype) != _DTYPES[key]:
        raise PayloadError(f"array '{key}' content ({data.dtype}, {data.shape}) contradicts its header")
    t = torch.from_numpy(np.array(data, copy=True))
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise PayloadError(f"array '{key}' contains NaN or infinite values")
    return t


def _meta(meta: ConfigRecord, key: str, typ: type):
    if key not in meta:
        raise PayloadError(f"missing meta field '{key}'")
    val = meta[key]
    if typ is list:
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            raise PayloadError(f"meta field '{key}' must be a list of strings")
    elif not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise PayloadError(f"meta field '{key}' must be {typ.__name__}, got {type(val).__name__}")
    return val


def validate_reply(content: RecordDict, exp: Expected) -> ClientPayload:
    """Check every field of a client's reply; raise PayloadError naming the first problem."""
    if UPLOAD not in content.array_records:
        raise PayloadError(f"no '{UPLOAD}' ArrayRecord in the reply")
    if META not in content.config_records:
        raise PayloadError(f"no '{META}' ConfigRecord in the reply")
    rec, meta = content.array_records[UPLOAD], content.config_records[META]
    extra = set(rec.keys()) - set(_DTYPES)
    if extra:
        raise PayloadError(f"unexpected array(s) {sorted(extra)}")
    if rec.count_bytes() > exp.max_bytes:
        raise PayloadError(f"upload is {rec.count_bytes()} bytes, above the cap of {exp.max_bytes}")
    fp = _meta(meta, "model-fingerprint", str)
    if fp != exp.model_fingerprint:
        raise PayloadError(f"model fingerprint {fp!r} differs from the server's {exp.model_fingerprint!r}")
    names = _meta(meta, "class-names", list)
    if not names or len(names) > 100000 or len(set(names)) != len(names):
        raise PayloadError("class-names must be a non-empty list of distinct names")
    template = _meta(meta, "template", str)
    if template.count("[S]") != 1 or template.count("[V]") != 1 or len(template) > 1000:
        raise PayloadError("template must contain [S] and [V] exactly once (and be short)")
    timestep = _meta(meta, "timestep", int)
    if not 0 <= timestep < 1000:
        raise PayloadError(f"timestep {timestep} outside [0, 1000)")
    injection = _meta(meta, "injection", str)
    if injection not in ("input", "output"):
        raise PayloadError(f"injection {injection!r} is not 'input' or 'output'")
    domain = _meta(meta, "domain", str)[:200]

    latents, labels = _array(rec, "latents", exp), _array(rec, "labels", exp)
    s, v, v_classes = _array(rec, "s", exp), _array(rec, "v", exp), _array(rec, "v_classes", exp)
    n = labels.shape[0]
    concept_only = latents.shape[0] == 0 and exp.allow_empty_latents
    if n == 0:
        raise PayloadError("the upload holds no labels")
    if latents.shape[0] != n and not concept_only:
        raise PayloadError(f"{latents.shape[0]} latents but {n} labels")
    if n > exp.max_images:
        raise PayloadError(f"{n} labels exceed the cap of {exp.max_images}")
    if not concept_only and tuple(latents.shape[1:]) != (exp.latent_channels, exp.latent_size, exp.latent_size):
        raise PayloadError(
            f"latents of shape {tuple(latents.shape[1:])}, expected "
            f"{(exp.latent_channels, exp.latent_size, exp.latent_size)}"
        )
    if latents.numel() and latents.abs().max() > 1e3:
        raise PayloadError("latent values out of range")
    if (labels.min() < 0 or labels.max() >= len(names)):
        raise PayloadError(f"label ids outside [0, {len(names)})")
    if not (1 <= s.shape[0] <= exp.max_tokens) or s.shape[1] != exp.hidden_size:
        raise PayloadError(f"s has shape {tuple(s.shape)}, expected (1..{exp.max_tokens}, {exp.hidden_size})")
    if v.shape[0] != v_classes.shape[0] or v.shape[0] == 0:
        raise PayloadError("v and v_classes disagree in length or are empty")
    if not (1 <= v.shape[1] <= exp.max_tokens) or v.shape[2] != exp.hidden_size:
        raise PayloadError(f"v has shape {tuple(v.shape)}, expected (K, 1..{exp.max_tokens}, {exp.hidden_size})")
    if v_classes.min() < 0 or v_classes.max() >= len(names) or v_classes.unique().numel() != v_classes.numel():
        raise PayloadError("v_classes must be distinct class ids in range")
    missing = set(labels.unique().tolist()) - set(v_classes.tolist())
    if missing:
        raise PayloadError(f"labels {sorted(missing)} have no class concept")
    if max(s.abs().max().item(), v.abs().max().item()) > 1e4:
        raise PayloadError("concept vectors out of range")
    return ClientPayload(
        latents=latents, labels=labels, s=s, v=v, v_classes=v_classes, class_names=list(names),
        domain=domain, template=template, timestep=timestep, injection=injection,
        model_fingerprint=fp,
    )  # fmt: skip
