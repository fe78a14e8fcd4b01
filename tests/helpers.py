"""Small helpers shared by several test files."""

from __future__ import annotations

import itertools
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Message, Metadata, RecordDict

from fedbip_flower.federation.payload import Expected
from fedbip_flower.method import embeddings
from fedbip_flower.method.upload import ClientPayload


def fake_flwr(folder: Path, body: str) -> Path:
    """A stand-in ``flwr`` executable in ``folder`` running ``body`` (sys, time, json imported);
    returns the folder, to put in place of the launcher's BIN."""
    exe = folder / "flwr"
    exe.write_text(f"#!{sys.executable}\nimport sys, time, json\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


def flag(command: list[str], name: str) -> str:
    """The value following ``name`` in a command list."""
    assert name in command, f"{name} missing from {command}"
    index = command.index(name)
    assert index + 1 < len(command), f"{name} has no value in {command}"
    return str(command[index + 1])


def layout(comps, n_s: int = 2, n_v: int = 1, classes=("star", "ring")):
    """A prompt layout of the test template for the domain 'medical'."""
    return embeddings.build_layout(comps.tokenizer, "a [S] style of a [V]", n_s, n_v, "medical", list(classes))


def expected(**overrides) -> Expected:
    """The server's expectations of an upload from the tiny model (fields overridable)."""
    base = dict(
        model_fingerprint="fp", latent_channels=4, latent_size=16, hidden_size=16, max_bytes=2**22, max_images=1000
    )
    return Expected(**{**base, **overrides})


@dataclass
class Model:
    """What an honest upload needs to know about the server's model."""

    fingerprint: str
    channels: int
    size: int
    hidden: int
    timestep: int = 500
    class_names: list[str] = field(default_factory=lambda: [f"class{i}" for i in range(5)])
    # The text encoder's token-embedding table (vocabulary, hidden): honest concepts start at
    # their words' vectors and stay near them (the server screens for that); None: random.
    embeddings: torch.Tensor | None = field(default=None, compare=False, repr=False)
    tokenizer: object = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, components, resolution: int) -> Model:
        return cls(
            components.fingerprint,
            components.latent_channels,
            resolution // components.vae_factor,
            components.hidden_size,
            embeddings=components.text_encoder.get_input_embeddings().weight.detach().float().cpu(),
            tokenizer=components.tokenizer,
        )

    def word(self, text: str) -> torch.Tensor:
        """The token embedding of ``text``'s first token (needs ``embeddings``)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids or [0]
        return self.embeddings[ids[0]]


def honest_payload(model: Model, seed: int, n: int = 6, domain: str = "medical") -> ClientPayload:
    """A valid upload (random numbers of the right shapes) for ``model``."""
    g = torch.Generator().manual_seed(seed)
    k = len(model.class_names)
    labels = torch.arange(n) % min(k, 3)
    classes = labels.unique()
    latents = torch.randn(n, model.channels, model.size, model.size, generator=g).half()
    s = torch.randn(1, model.hidden, generator=g)
    v = torch.randn(len(classes), 1, model.hidden, generator=g)
    if model.embeddings is not None:  # concepts as honest training leaves them: near the words
        words = torch.stack([model.word(model.class_names[int(c)]) for c in classes])[:, None]
        v = words + 0.2 * words.norm(dim=-1, keepdim=True) * v / model.hidden**0.5
        s = 0.5 * model.word(domain).norm() * s / model.hidden**0.5
    return ClientPayload(
        latents=latents,
        labels=labels,
        s=s,
        v=v,
        v_classes=classes,
        class_names=list(model.class_names),
        domain=domain,
        template="a [S] style of a [V]",
        timestep=model.timestep,
        injection="input",
        model_fingerprint=model.fingerprint,
        metrics={"loss-first": 0.5, "num-train": float(n)},
    )


_ids = itertools.count(1)


def instruction(nid: int, kind: str = "train", content: RecordDict | None = None) -> Message:
    """A server->node message with the metadata the SuperLink would give it (the fake Grid's
    messages too)."""
    md = Metadata(
        run_id=1,
        message_id=f"msg{next(_ids)}",
        src_node_id=1,
        dst_node_id=nid,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=kind,
    )
    return Message(content=content if content is not None else RecordDict(), metadata=md)
