"""A client's upload on the wire: its RecordDict form and the server's validation of it.

The upload itself (:class:`~fedbip_flower.method.upload.ClientPayload`) and its prompt
layout belong to the method; this module is the Flower side.

Record keys: ``"upload"`` (ArrayRecord: latents fp16 (N, C, h, w), labels int64 (N,),
s float32 (n_s, D), v float32 (K, n_v, D), v_classes int64 (K,)) and ``"meta"``
(ConfigRecord: class names, domain, template, timestep, injection, model fingerprint,
counts). No image leaves a client: only noised latents, labels and concept vectors.
The server treats every field as hostile until :func:`validate_reply` accepts it.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedbip_flower.method.upload import ClientPayload, prompt_layout

UPLOAD, META, METRICS = "upload", "meta", "metrics"
# Bounds on the strings and lists of an upload (a hostile client may send anything).
MAX_NAME_CHARS = 200  # domain and each class name
MAX_TEMPLATE_CHARS = 1000
MAX_CLASSES = 10000
MAX_METRICS, MAX_METRIC_KEY_CHARS = 64, 64
_DTYPES = {"latents": "float16", "labels": "int64", "s": "float32", "v": "float32", "v_classes": "int64"}
_NDIMS = {"latents": 4, "labels": 1, "s": 2, "v": 3, "v_classes": 1}


class PayloadError(ValueError):
    """A client's reply is malformed, inconsistent, too large or from another model."""


def to_record_dict(payload: ClientPayload) -> RecordDict:
    """The upload as the reply's RecordDict (``upload``, ``meta``, ``metrics``)."""
    arrays = ArrayRecord(
        {
            "latents": payload.latents.to(torch.float16).contiguous(),
            "labels": payload.labels.to(torch.int64).contiguous(),
            "s": payload.s.float().contiguous(),
            "v": payload.v.float().contiguous(),
            "v_classes": payload.v_classes.to(torch.int64).contiguous(),
        }
    )
    meta = ConfigRecord(
        {
            "class-names": list(payload.class_names),
            "domain": payload.domain,
            "template": payload.template,
            "timestep": int(payload.timestep),
            "injection": payload.injection,
            "model-fingerprint": payload.model_fingerprint,
            "num-examples": int(payload.labels.numel()),
        }
    )
    metrics = MetricRecord({k: float(v) for k, v in payload.metrics.items()})
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
    # The server's tokenizer: when set, the upload's prompts are laid out with it during
    # validation, exactly as synthesis will do later (a template that passes the string
    # checks can still be too long in tokens for the model).
    tokenizer: object = field(default=None, compare=False, repr=False)


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


def _unprintable(text: str) -> bool:
    """Control characters (NUL, newlines, escapes, ...) or lone surrogates."""
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def safe_text(value: object, max_bytes: int = 300) -> str:
    """``value`` as one printable log line: control, format (e.g. bidi overrides) and surrogate
    characters escaped, at most ``max_bytes`` UTF-8 bytes (cut on a character boundary,
    marked with ``...``)."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(
        ch if unicodedata.category(ch) not in ("Cc", "Cf", "Cs") else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes - 3)].decode("utf-8", "ignore") + "..."


def safe_filename(value: object, default: str = "client", max_bytes: int = 64) -> str:
    """A file-name part from a client string: ASCII letters, digits, ``.``, ``-`` and ``_`` only
    (no path separators, NUL or control characters; never ``.`` or ``..``), at most
    ``max_bytes`` bytes; ``default`` if nothing is left."""
    text = value if isinstance(value, str) else ""
    out = "".join(ch if (ch.isascii() and (ch.isalnum() or ch in "._-")) else "-" for ch in text)
    out = out.strip(".-")[:max_bytes].strip(".-")
    return out or default


def _meta(meta: ConfigRecord, key: str, typ: type, max_len: int = 0):
    if key not in meta:
        raise PayloadError(f"missing meta field '{key}'")
    val = meta[key]
    if typ is list:
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            raise PayloadError(f"meta field '{key}' must be a list of strings")
        if max_len and len(val) > max_len:
            raise PayloadError(f"meta field '{key}' holds {len(val)} items, above the cap of {max_len}")
    elif not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise PayloadError(f"meta field '{key}' must be {typ.__name__}, got {type(val).__name__}")
    if typ is str:
        _check_string(key, val, max_len)
    return val


def _check_string(what: str, val: str, max_len: int) -> None:
    if max_len and len(val) > max_len:
        raise PayloadError(f"{what} is {len(val)} characters long, above the cap of {max_len}")
    if _unprintable(val):
        raise PayloadError(f"{what} {safe_text(val, 80)} contains control characters")


def _metrics(content: RecordDict) -> dict[str, float]:
    """The optional ``metrics`` MetricRecord: at most MAX_METRICS finite numeric scalars."""
    if METRICS not in content.metric_records:
        return {}
    rec = content.metric_records[METRICS]
    if len(rec) > MAX_METRICS:
        raise PayloadError(f"metrics hold {len(rec)} entries, above the cap of {MAX_METRICS}")
    out = {}
    for key, val in rec.items():
        _check_string("a metric name", key, MAX_METRIC_KEY_CHARS)
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise PayloadError(f"metric {key!r} must be a number, got {type(val).__name__}")
        try:
            num = float(val)
        except OverflowError as err:
            raise PayloadError(f"metric {key!r} is out of range") from err
        if not math.isfinite(num):
            raise PayloadError(f"metric {key!r} is not finite")
        out[key] = num
    return out


def validate_reply(content: RecordDict, exp: Expected) -> ClientPayload:
    """Check every field of a client's reply; raise PayloadError naming the first problem.

    Checked: the records and arrays present (no others in ``upload``), dtypes, ranks, shapes
    and sizes against the server's model and caps, array bytes that decode to what their
    headers claim (never a pickle), finite values in range, label and class ids, the model
    fingerprint, meta field types, bounded strings and lists without control characters,
    numeric scalar metrics and, with ``exp.tokenizer``, the prompts synthesis will build
    (template + class names tokenized within the model's length). An accepted payload is
    one synthesis can use.
    """
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
    fp = _meta(meta, "model-fingerprint", str, 100)
    if fp != exp.model_fingerprint:
        raise PayloadError(f"model fingerprint {fp!r} differs from the server's {exp.model_fingerprint!r}")
    names = _meta(meta, "class-names", list, MAX_CLASSES)
    if not names or len(set(names)) != len(names):
        raise PayloadError("class-names must be a non-empty list of distinct names")
    for name in names:
        _check_string("a class name", name, MAX_NAME_CHARS)
    template = _meta(meta, "template", str, MAX_TEMPLATE_CHARS)
    if template.count("[S]") != 1 or template.count("[V]") != 1:
        raise PayloadError("template must contain [S] and [V] exactly once")
    timestep = _meta(meta, "timestep", int)
    if not 0 <= timestep < 1000:
        raise PayloadError(f"timestep {timestep} outside [0, 1000)")
    injection = _meta(meta, "injection", str, 100)
    if injection not in ("input", "output"):
        raise PayloadError(f"injection {injection!r} is not 'input' or 'output'")
    domain = _meta(meta, "domain", str, MAX_NAME_CHARS)
    metrics = _metrics(content)

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
    if labels.min() < 0 or labels.max() >= len(names):
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
    payload = ClientPayload(
        latents=latents,
        labels=labels,
        s=s,
        v=v,
        v_classes=v_classes,
        class_names=list(names),
        domain=domain,
        template=template,
        timestep=timestep,
        injection=injection,
        model_fingerprint=fp,
        metrics=metrics,
    )
    if exp.tokenizer is not None:
        try:
            prompt_layout(exp.tokenizer, payload)
        except Exception as err:  # whatever the tokenizer makes of hostile text
            raise PayloadError(
                f"the prompts cannot be laid out with the server's tokenizer: "
                f"{type(err).__name__}: {safe_text(str(err), 400)}"
            ) from err
    return payload
