"""The shipped LDM: a standard SD pipeline folder, found wherever the code runs, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fedbip_flower.models.ldm import BUNDLED_NAME, bundled_model_path, load_components, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_pipeline_loads_offline_and_generates():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = bundled_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(pipe.components)
    out = pipe(
        "a photo style of a star",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3) and 0 <= out.min() and out.max() <= 1
    card = json.loads((path / "fedbip_model_card.json").read_text())
    assert card["command"].startswith("python -m fedbip_flower.research.pretrain") and card["unet_steps"] > 0
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 16 * 2**20
    # the real SD v1 tokenizer ids
    assert pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_fingerprint_is_stable():
    """Two independent loads (the per-process cache bypassed) give the fingerprint that the
    docs and the LDM report name for the shipped weights."""
    from fedbip_flower.models import ldm

    source = resolve_model("bundled")
    assert source == str(bundled_model_path())
    first, second = (ldm._load.__wrapped__(source, "cpu", "float32") for _ in range(2))
    assert first is not second and first.unet is not second.unet
    report = json.loads((Path(__file__).resolve().parents[1] / "docs" / "ldm_report.json").read_text())
    assert first.fingerprint == second.fingerprint == report["fingerprint"]


def test_weights_are_found_from_an_app_bundle_copy(tmp_path):
    """Flower runs the app from an unpacked bundle that holds code only: the package copy
    there has no weights, so the installed package's weights must be found on sys.path."""
    fab = tmp_path / "fab"
    for f in (ROOT / "fedbip_flower").rglob("*.py"):
        dest = fab / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f.read_text())
    code = "import fedbip_flower.models.ldm as l; print(l.__file__); print(l.bundled_model_path())"
    env = {k: v for k, v in os.environ.items() if k != "FEDBIP_BUNDLED_MODEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(fab), str(ROOT)])
    out = subprocess.run([sys.executable, "-c", code], cwd=fab, env=env, capture_output=True, text=True, check=True)
    module_file, found = out.stdout.split()
    assert module_file.startswith(str(fab))  # the bundle's copy was imported ...
    assert Path(found, "model_index.json").is_file() and BUNDLED_NAME in found  # ... and found the weights


def test_missing_model_folder_is_a_clear_error(tmp_path):
    import pytest

    from fedbip_flower.models.ldm import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_personalization_on_the_bundled_model_is_bit_reproducible():
    """Same seed, same upload, to the bit, on the real model with all CPU threads (a gather
    whose backward accumulates in thread order once made S/V differ by ~1e-10)."""
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.data.loading import NodeConfig, load_client_data
    from fedbip_flower.federation.client import template_for
    from fedbip_flower.method.personalize import personalize

    comps = load_components("bundled", "cpu", "float32")
    cfg = FedBiPConfig.from_run_config({"client.steps": 3, "data.per-class": 20, "data.shots": 4})
    data = load_client_data(cfg.data, NodeConfig(0, 4), 0)
    runs = [personalize(comps, data, cfg.client, template_for(cfg), 801, 0, progress=False) for _ in range(3)]
    for other in runs[1:]:
        for name in ("s", "v", "latents", "labels"):
            assert torch.equal(getattr(runs[0], name), getattr(other, name)), name
