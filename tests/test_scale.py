"""Scale: the synthetic set streamed to disk, synthesis over several devices, the classifier's
resolution, and the device list. (A site's data in O(own share): tests/test_shapes.py.)"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fedbip_flower.config import ClassifierConfig, ConfigError, FedBiPConfig, device_list
from fedbip_flower.federation import server_pipeline
from fedbip_flower.federation.synthetic_set import SyntheticSet, SyntheticStore, read_synthetic_folder
from fedbip_flower.models.classifier import build_classifier, evaluate, train_classifier
from fedbip_flower.models.ldm import pick_devices
from tests.helpers import Model, honest_payload


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uploads(tiny_components):
    model = Model.of(tiny_components, 32)
    domains = ("medical", "satellite", "thermal", "chalkboard", "medical")
    return {k: honest_payload(model, seed=k, domain=d) for k, d in enumerate(domains)}


@pytest.fixture
def cfg(fast_run_config):
    return FedBiPConfig.from_run_config({**fast_run_config, "server.multiplier": 2, "classifier.epochs": 2})


def test_streamed_set_reads_back_what_was_synthesized_and_trains_the_same_model(
    tiny_components, uploads, cfg, tmp_path
):
    memory = server_pipeline.build_global_model(tiny_components, uploads, cfg)
    disk = server_pipeline.build_global_model(tiny_components, uploads, cfg, store=SyntheticStore(tmp_path / "syn"))
    files = sorted(p.name for p in (tmp_path / "syn").iterdir())
    assert len(files) == len(uploads) and all(f.endswith(".safetensors") for f in files)
    assert all(disk.synthetic[k].path is not None for k in disk.order)
    x, y, sites = read_synthetic_folder(tmp_path / "syn")
    assert torch.equal(x, memory.images) and torch.equal(y, memory.labels)
    assert sites == [uploads[k].domain for k in memory.order]
    assert torch.equal(disk.images, memory.images)
    # each site's file holds exactly what its synthesis made with its seed
    k = memory.order[2]
    want = server_pipeline.synthesize_upload(
        tiny_components, uploads[k], cfg, server_pipeline.synthesis_seed(cfg.seed, 2)
    )
    got = disk.synthetic[k].load()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert _same(_state(disk.classifier), _state(memory.classifier))


def test_a_batch_reads_only_its_rows_in_the_order_asked(tiny_components, tmp_path):
    g = torch.Generator().manual_seed(0)
    store = SyntheticStore(tmp_path)
    parts = [torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8) for n in (5, 1, 7)]
    for k, x in enumerate(parts):
        store.put(k, k, f"site {k}", x, torch.full((len(x),), k))
    data = store.dataset([0, 1, 2])
    assert isinstance(data, SyntheticSet) and len(data) == 13
    rows = [12, 0, 5, 6, 3, 5]
    x, y = data.__getitems__(rows)
    full = torch.cat(parts)
    assert torch.equal(x, full[rows]) and y.tolist() == [2, 0, 1, 2, 0, 1]
    with pytest.raises(IndexError):
        data.__getitems__([13])
    with pytest.raises(ValueError, match="one image shape"):
        store.put(3, 3, "odd", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2))
        store.dataset([0, 3])
    # a tensor and the same images from disk train the same model, also with reader processes
    c = ClassifierConfig(epochs=2, batch_size=4, stem="cifar")
    m1, _ = train_classifier(full, torch.cat([torch.full((len(p),), k) for k, p in enumerate(parts)]), 3, c, 0, "cpu")
    m2, _ = train_classifier(data, None, 3, dataclasses.replace(c, workers=2), 0, "cpu", progress=False)
    assert _same(_state(m1), _state(m2))


def test_synthesis_over_two_workers_makes_the_same_set_as_one(tiny_components, uploads, cfg):
    second = copy.deepcopy(tiny_components)
    assert second.unet is not tiny_components.unet
    one = server_pipeline.build_global_model(tiny_components, uploads, cfg)
    two = server_pipeline.build_global_model(tiny_components, uploads, cfg, workers=[tiny_components, second])
    shared = server_pipeline.build_global_model(tiny_components, uploads, cfg, workers=[tiny_components] * 2)
    for other in (two, shared):
        assert other.order == one.order
        assert torch.equal(other.images, one.images) and torch.equal(other.labels, one.labels)
        assert _same(_state(other.classifier), _state(one.classifier))


def test_both_workers_take_sites(tiny_components, uploads, cfg, monkeypatch):
    """The sites really are spread: each worker synthesizes some of them."""
    second = copy.deepcopy(tiny_components)
    used = []
    real = server_pipeline.synthesize_upload

    def synth(worker, payload, cfg, seed, progress=False):
        used.append(worker is second)
        import time

        time.sleep(0.2)  # long enough for the other worker to take the next site
        return real(worker, payload, cfg, seed, progress)

    monkeypatch.setattr(server_pipeline, "synthesize_upload", synth)
    server_pipeline.build_global_model(tiny_components, uploads, cfg, workers=[tiny_components, second])
    assert len(used) == len(uploads) and any(used) and not all(used)


def test_classifier_resolution_resizes_for_training_and_scoring():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(24) % 3
    c = ClassifierConfig(epochs=1, batch_size=8, stem="cifar", resolution=16)
    model, stats = train_classifier(x, y, 3, c, 0, "cpu", progress=False)
    assert model.input_resolution == 16 and stats["sgd-steps"] == 3
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    acc = evaluate(model, x, y)
    assert 0.0 <= acc <= 1.0 and seen == [(16, 16)]
    # the client builds the classifier from the same config: same input side
    assert build_classifier(c, 3).input_resolution == 16
    full, _ = train_classifier(x, y, 3, dataclasses.replace(c, resolution=0), 0, "cpu", progress=False)
    assert not _same(_state(full), _state(model))


def test_device_list():
    assert device_list("auto") == ["auto"]
    assert device_list("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert [str(d) for d in pick_devices("cpu,cpu")] == ["cpu", "cpu"]
    if not torch.cuda.is_available():
        assert [str(d) for d in pick_devices("auto")] == ["cpu"]
    for bad in ("gpu", "cuda:x", "cpu,,cpu", ""):
        with pytest.raises(ConfigError, match="model.device"):
            FedBiPConfig.from_run_config({"model.device": bad})


@pytest.mark.slow
def test_scale_command_on_a_tiny_federation(tiny_model, tmp_path, monkeypatch):
    """The scale benchmark runs the three phases per size in their own processes, resumes,
    and reports per-site work that does not grow with the number of sites."""
    import json
    import subprocess

    from fedbip_flower.research import benchmark

    out = tmp_path / "scale"
    args = ["scale", "--smoke", "--sites", "1,5", "--out", str(out), "--threads", "1"]
    benchmark.main([*args, "--run-config", f'model.id="{tiny_model}"'])
    rows = json.loads((out / "scale.json").read_text())["rows"]
    assert [r["sites"] for r in rows] == [1, 5]
    # 2 shots x 10 classes per site, one image per latent: linear in the sites
    assert [r["num_synthetic"] for r in rows] == [20, 100]
    assert rows[0]["upload_kb_mean"] == rows[1]["upload_kb_mean"]
    assert all(0.0 <= r["mean_accuracy"] <= 1.0 and r["server_peak_rss_mb"] > 0 for r in rows)
    assert len(list((out / "sites-0005" / "synthetic").glob("*.safetensors"))) == 5
    assert "| 5 |" in (out / "scale.md").read_text()
    # resumed: every phase's result is there, nothing runs again
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    benchmark.main([*args, "--resume", "--run-config", f'model.id="{tiny_model}"'])
    assert calls == [] and json.loads((out / "scale.json").read_text())["rows"] == rows
