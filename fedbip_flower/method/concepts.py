"""A site's learned concepts: the domain concept S and the class concepts V, as one object.

:class:`Concepts` holds the initial vectors S0 (n_s, D) and V0 (K, n_v, D), their scale
(the RMS of the initial vectors) and the learned offsets dS, dV, with
``S = S0 + scale * dS`` and ``V = V0 + scale * dV``; the prompt layout (one prompt per class
row) and the class id of each row. Client training, server synthesis and the privacy audit
(through synthesis) all use it: :func:`initial_vectors` is where concepts are initialised,
:meth:`Concepts.batch` builds (S, V) for a batch of class rows (with optional per-image noise
on S) and :meth:`Concepts.encode` is the one place prompts are encoded with the concepts,
at the text encoder's input or its output (:class:`Injection`).

Input-injected concepts are token embeddings, so a site can reuse them in any Stable
Diffusion pipeline with the same text encoder: :func:`export_textual_inversion` writes them
in diffusers' textual-inversion format (S as one multi-vector token ``<site-domain>``, each
class's V as a token ``<site-class>``), loadable with
``StableDiffusionPipeline.load_textual_inversion``::

    python -m fedbip_flower.tools.export_concepts outputs/concepts --partition-id 0 --num-partitions 4
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from fedbip_flower.jsonio import write_json
from fedbip_flower.method.embeddings import PromptLayout
from fedbip_flower.method.upload import prompt_layout

MANIFEST = "concepts.json"


class Injection(str, Enum):
    """Where the learned vectors enter the frozen text encoder (``client.injection``)."""

    INPUT = "input"  # token embeddings at the slots (the paper; textual inversion)
    OUTPUT = "output"  # the text encoder's outputs at the slots (the authors' code)

    def __str__(self) -> str:
        return self.value


class Init(str, Enum):
    """How concepts start (``client.init``)."""

    WORD = "word"  # the natural words' vectors
    RANDOM = "random"  # Gaussian with the scale of the natural words' vectors

    def __str__(self) -> str:
        return self.value


@torch.no_grad()
def initial_vectors(
    text_encoder, layout: PromptLayout, injection: Injection | str, init: Init | str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial S (n_s, D) and V (K, n_v, D), float32 on CPU.

    ``word``: the natural words' token embeddings (input injection) or the text encoder's
    outputs at the slots of the natural prompt (output injection); S is the mean over the
    class prompts. ``random``: Gaussian with the scale of the corresponding word vectors.
    """
    injection, init = Injection(injection), Init(init)
    ids = layout.ids.to(text_encoder.device)
    if injection is Injection.INPUT:
        source = text_encoder.get_input_embeddings()(ids)
    else:
        source = text_encoder(ids)[0]
    source = source.float().cpu()
    s = source[:, layout.s_pos].mean(0)
    v = source[:, layout.v_pos]
    if init is Init.RANDOM:
        s = torch.randn(s.shape, generator=generator) * s.std()
        v = torch.randn(v.shape, generator=generator) * v.std()
    return s.contiguous(), v.contiguous()


def vector_scale(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The RMS of all vectors of S and V (a 0-d tensor, at least 1e-8)."""
    return torch.cat([s.flatten(), v.flatten()]).pow(2).mean().sqrt().clamp_min(1e-8)


@contextmanager
def _input_injection(text_encoder, layout: PromptLayout, s: torch.Tensor, v: torch.Tensor):
    """Overwrite the token embeddings at the slots with s (B, n_s, D) and v (B, n_v, D).

    A forward hook on the token-embedding layer: the text encoder itself is never modified.
    The hook acts only in the thread that set it, so threads sharing one text encoder (the
    server's synthesis workers on one device) each get their own concepts.
    """
    owner = threading.get_ident()

    def hook(_module, _inputs, out):
        if threading.get_ident() != owner:
            return None  # another thread's forward pass: leave its embeddings alone
        out = out.clone()
        out[:, layout.s_pos] = s.to(out.dtype)
        out[:, layout.v_pos] = v.to(out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Concepts(nn.Module):
    """S and V of one site: ``S = S0 + scale * dS``, ``V = V0 + scale * dV``.

    Training optimises the offsets dS, dV (parameters, in units of ``scale``, the RMS of the
    initial vectors: Adam moves each coordinate by about lr per step whatever the space, so
    ``client.lr`` means the same for input and output injection). ``learn_domain=False``
    keeps S at S0. Concepts built without offsets (``learnable=False``, e.g. from an upload)
    are S0 and V0 as they are.

    ``layout`` holds one prompt per row of V; ``classes`` (K,) the class id of each row.
    """

    def __init__(
        self,
        layout: PromptLayout,
        s0: torch.Tensor,
        v0: torch.Tensor,
        injection: Injection | str,
        classes: torch.Tensor | None = None,
        *,
        learnable: bool = True,
        learn_domain: bool = True,
    ) -> None:
        super().__init__()
        if s0.ndim != 2 or v0.ndim != 3 or s0.shape[-1] != v0.shape[-1]:
            raise ValueError(f"S0 must be (n_s, D) and V0 (K, n_v, D), got {tuple(s0.shape)} and {tuple(v0.shape)}")
        if (layout.num_classes, len(layout.s_pos), len(layout.v_pos)) != (v0.shape[0], s0.shape[0], v0.shape[1]):
            raise ValueError(
                f"layout of {layout.num_classes} prompts with {len(layout.s_pos)} [S] and "
                f"{len(layout.v_pos)} [V] slots does not fit S0 {tuple(s0.shape)}, "
                f"V0 {tuple(v0.shape)}"
            )
        self.layout = layout
        self.injection = Injection(injection)
        self.classes = torch.arange(v0.shape[0]) if classes is None else torch.as_tensor(classes).to(torch.int64)
        if self.classes.shape != (v0.shape[0],):
            raise ValueError(f"{v0.shape[0]} rows of V0 but classes of shape {tuple(self.classes.shape)}")
        self.register_buffer("s0", s0)
        self.register_buffer("v0", v0)
        self.register_buffer("scale", vector_scale(s0, v0))
        if learnable:
            self.ds = nn.Parameter(torch.zeros_like(s0), requires_grad=learn_domain)
            self.dv = nn.Parameter(torch.zeros_like(v0))
        else:
            self.register_parameter("ds", None)
            self.register_parameter("dv", None)
        self._base: tuple[weakref.ref, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def initialise(
        cls,
        text_encoder,
        layout: PromptLayout,
        injection: Injection | str,
        init: Init | str,
        generator: torch.Generator,
        classes: torch.Tensor | None = None,
        *,
        learn_domain: bool = True,
    ) -> Concepts:
        """Learnable concepts on the text encoder's device, from :func:`initial_vectors`."""
        s0, v0 = initial_vectors(text_encoder, layout, injection, init, generator)
        dev = text_encoder.device
        return cls(layout, s0.to(dev), v0.to(dev), injection, classes, learn_domain=learn_domain)

    @classmethod
    def from_payload(cls, payload, tokenizer) -> Concepts:
        """An upload's concepts as the server uses them (fixed, on the CPU)."""
        return cls(
            prompt_layout(tokenizer, payload),
            payload.s,
            payload.v,
            payload.injection,
            payload.v_classes,
            learnable=False,
        )

    # ------------------------------------------------------------------ vectors
    @property
    def num_classes(self) -> int:
        return int(self.v0.shape[0])

    @property
    def s(self) -> torch.Tensor:
        """S (n_s, D)."""
        return self.s0 if self.ds is None else self.s0 + self.scale * self.ds

    @property
    def v(self) -> torch.Tensor:
        """V (K, n_v, D)."""
        return self.v0 if self.dv is None else self.v0 + self.scale * self.dv

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, V) detached, float32 on the CPU: what a site uploads."""
        return self.s.detach().float().cpu(), self.v.detach().float().cpu()

    def rows_for(self, labels: torch.Tensor) -> torch.Tensor:
        """The row of V (and of the layout) for each class id in ``labels``."""
        row_of = {int(c): i for i, c in enumerate(self.classes.tolist())}
        return torch.tensor([row_of[int(y)] for y in labels], dtype=torch.int64)

    def batch(
        self, rows: torch.Tensor | None = None, s_noise: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S (B, n_s, D), V (B, n_v, D)) for class ``rows`` (B,) (None: every row, in order).

        With a ``generator``, each image gets its own S: S + ``s_noise`` * N(0, 1) (drawn on
        the CPU even when ``s_noise`` is 0, so the generator advances the same way).
        """
        s, v = self.s, self.v
        if rows is None:
            n = v.shape[0]
        else:
            n, v = len(rows), v[rows.to(v.device)]
        if generator is None:
            return s.unsqueeze(0).expand(n, -1, -1), v
        noise = s_noise * torch.randn((n, *s.shape), generator=generator)
        return s.unsqueeze(0) + noise.to(s.device), v

    # ------------------------------------------------------------------ prompts
    def base(self, text_encoder) -> torch.Tensor | None:
        """Output injection: the text encoder's output for the natural prompts (K, L, D),
        computed once per text encoder; None for input injection."""
        if self.injection is Injection.INPUT:
            return None
        if self._base is None or self._base[0]() is not text_encoder:
            with torch.no_grad():
                out = text_encoder(self.layout.ids.to(text_encoder.device))[0]
            self._base = (weakref.ref(text_encoder), out)
        return self._base[1]

    def encode(self, text_encoder, s: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings (B, L, D) of class ``rows`` (None: every row) with S (B, n_s, D)
        and V (B, n_v, D) in the slots, at the text encoder's input or output."""
        dev = text_encoder.device
        ids = self.layout.ids if rows is None else self.layout.ids[rows]
        s, v = s.to(dev), v.to(dev)
        if self.injection is Injection.INPUT:
            with _input_injection(text_encoder, self.layout, s, v):
                return text_encoder(ids.to(dev))[0]
        base = self.base(text_encoder)
        out = base.clone() if rows is None else base[rows.to(dev)].clone()
        out[:, self.layout.s_pos] = s.to(out.dtype)
        out[:, self.layout.v_pos] = v.to(out.dtype)
        return out

    def forward(
        self,
        text_encoder,
        rows: torch.Tensor | None = None,
        s_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings of class ``rows`` with these concepts (see :meth:`batch`)."""
        s, v = self.batch(rows, s_noise, generator)
        return self.encode(text_encoder, s, v, rows)

    def extra_repr(self) -> str:
        return (
            f"injection={self.injection.value}, classes={self.num_classes}, n_s={self.s0.shape[0]}, "
            f"n_v={self.v0.shape[1]}, dim={self.s0.shape[1]}, learnable={self.ds is not None}"
        )


# ---------------------------------------------------------------------- textual inversion
class ExportError(ValueError):
    """The concepts cannot be written as textual-inversion embeddings."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def textual_inversion_tokens(site: str, class_names: list[str], class_ids: list[int]) -> tuple[str, list[str]]:
    """The domain token ``<site-domain>`` and one ``<site-class>`` token per class.

    Lower-case ASCII letters, digits and ``-`` only (CLIP lower-cases prompts); a class
    whose token would repeat another one gets its class id appended.
    """
    site = _slug(site) or "site"
    domain = f"<{site}-domain>"
    taken, out = {domain}, []
    for name, cid in zip(class_names, class_ids, strict=True):
        tok = f"<{site}-{_slug(name) or 'class'}>"
        if tok in taken:
            tok = f"<{site}-{_slug(name) or 'class'}-{cid}>"
        taken.add(tok)
        out.append(tok)
    return domain, out


def export_textual_inversion(payload, folder: str | Path, site: str | None = None) -> dict:
    """Write a site's input-injected concepts as diffusers textual-inversion embeddings.

    ``payload`` is the site's :class:`~fedbip_flower.method.upload.ClientPayload`. One
    ``.safetensors`` file per token, each a dict {token: tensor (n, D)} (diffusers' format
    holds one token per file; a token with n > 1 vectors loads as a multi-vector token):
    S as ``<site-domain>`` and each class's V as ``<site-class>``. ``concepts.json`` lists
    the tokens, files and each class's prompt (the site's template with the tokens in the
    slots). Load them all with :func:`load_textual_inversion`, or one file with
    ``pipe.load_textual_inversion(path)``. Returns the manifest.

    Output-injected concepts live in the text encoder's output space, not its token
    embeddings: they raise :class:`ExportError`.
    """
    if Injection(payload.injection) is not Injection.INPUT:
        raise ExportError(
            f"concepts learned with {payload.injection} injection live in the text encoder's output space and "
            "cannot be used as token embeddings; train with client.injection=input to export them as "
            "textual-inversion embeddings"
        )
    site = site if site is not None else payload.domain
    class_ids = [int(c) for c in payload.v_classes]
    names = [payload.class_names[c] for c in class_ids]
    domain_token, class_tokens = textual_inversion_tokens(site, names, class_ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    def write(token: str, vectors: torch.Tensor) -> str:
        name = token.strip("<>") + ".safetensors"
        save_file({token: vectors.detach().float().cpu().contiguous()}, str(folder / name))
        return name

    def prompt(token: str) -> str:
        return payload.template.replace("[S]", domain_token).replace("[V]", token)

    manifest = {
        "format": "diffusers-textual-inversion",
        "site": site,
        "domain": payload.domain,
        "template": payload.template,
        "model_fingerprint": payload.model_fingerprint,
        "domain_token": {
            "token": domain_token,
            "file": write(domain_token, payload.s),
            "num_vectors": int(payload.s.shape[0]),
        },
        "classes": [
            {
                "id": cid,
                "name": name,
                "token": tok,
                "file": write(tok, payload.v[k]),
                "num_vectors": int(payload.v.shape[1]),
                "prompt": prompt(tok),
            }
            for k, (cid, name, tok) in enumerate(zip(class_ids, names, class_tokens, strict=True))
        ],
    }
    write_json(folder / MANIFEST, manifest, ensure_ascii=False)
    return manifest


def load_textual_inversion(pipe, folder: str | Path) -> dict:
    """Load every token of an :func:`export_textual_inversion` folder into a diffusers
    pipeline (its tokenizer and text encoder); returns the manifest."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    entries = [manifest["domain_token"], *manifest["classes"]]
    pipe.load_textual_inversion([str(folder / e["file"]) for e in entries], token=[e["token"] for e in entries])
    return manifest
