"""Small helpers shared by several test files."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from fedbip_flower.federation.payload import Expected
from fedbip_flower.method import embeddings


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
