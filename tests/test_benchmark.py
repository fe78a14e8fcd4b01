"""The benchmark's smoke scale runs every method end to end; the privacy metrics are sane."""

from __future__ import annotations

import json

import pytest
import torch

from fedbip_flower.config import load_experiment
from fedbip_flower.research import benchmark


def test_metrics():
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(benchmark.ssim(x, x), torch.ones(3), atol=1e-5)
    assert (benchmark.ssim(x, torch.rand(3, 3, 16, 16)) < 0.5).all()
    assert (benchmark.psnr(x, x) > 90).all()


def test_fedavg_weights():
    a, b = {"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.ones(2), "n": torch.tensor(3)}
    out = benchmark.fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.full((2,), 0.75)) and out["n"] == 3


@pytest.mark.slow
def test_smoke_benchmark_runs_all_methods(tiny_model, tmp_path):
    extra = {**load_experiment("smoke"), "model.id": tiny_model, "data.domains": "medical,satellite"}
    seen = []
    run = benchmark.run_setting(
        "shapes-feature",
        list(benchmark.ALL_METHODS),
        0,
        extra,
        on_method=lambda r: seen.append((len(r["methods"]), r["complete"])),
    )
    assert set(run["methods"]) == set(benchmark.ALL_METHODS) and run["complete"]
    assert seen == [(k + 1, False) for k in range(len(benchmark.ALL_METHODS))]
    for m, v in run["methods"].items():
        assert len(v["accuracy"]) == 4 and all(0 <= a <= 1 for a in v["accuracy"].values()), m
        assert len(v["upload_bytes"]) == 4
    up = run["methods"]
    assert up["fedbip-m"]["num_train_images"] == 5 * up["fedbip"]["num_train_images"]
    assert up["concept-only"]["upload_bytes"][0] < up["fedbip"]["upload_bytes"][0]
    assert up["fedavg-oneshot"]["upload_bytes"][0] > 10 * up["fedbip"]["upload_bytes"][0]
    priv = run["privacy"]
    assert set(priv) == {"default", "no-interpolation"}
    for v in priv.values():
        a = v["attacks"][v["best_attack"]]
        assert -1 <= a["ssim_source"] <= 1 and a["psnr_source"] > 0
    md = benchmark.to_markdown(benchmark.summarize([run]))
    assert "| fedbip |" in md and "mean +- std" in md


def _run(seed, methods, acc, config=None):
    return {
        "setting": "s",
        "seed": seed,
        "privacy": None,
        "config": config or {"seed": seed},
        "methods": {
            m: {
                "accuracy": {"a": acc, "b": acc},
                "upload_bytes": [10, 10],
                "client_seconds": [1.0, 1.0],
                "server_seconds": 2.0,
            }
            for m in methods
        },
    }


def test_merge_joins_methods_per_setting_and_seed(tmp_path):
    import json

    import pytest

    f1, f2, f3 = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    f1.write_text(json.dumps({"runs": [_run(0, ["x"], 0.5), _run(1, ["x", "y"], 0.3)]}))
    f2.write_text(json.dumps({"runs": [_run(0, ["x", "y"], 0.1)]}))  # a later run of seed 0 wins
    runs = benchmark.merge_runs([f1, f2])
    assert [(r["seed"], sorted(r["methods"])) for r in runs] == [(0, ["x", "y"]), (1, ["x", "y"])]
    table = benchmark.summarize(runs)
    assert table["s"]["x"]["means"] == [0.1, 0.3]
    assert "| x | 0.200 | 0.200 | 0.200 +- 0.141 | 2 |" in benchmark.to_markdown(table)
    f3.write_text(json.dumps({"runs": [_run(0, ["z"], 0.9, config={"seed": 0, "classifier.epochs": 150})]}))
    with pytest.raises(ValueError, match="another configuration"):
        benchmark.merge_runs([f1, f3])


def test_a_stopped_benchmark_resumes_where_it_stopped(tiny_model, tmp_path, caplog):
    rc = f"model.id='{tiny_model}' data.domains='medical,satellite'"
    args = ["accuracy", "--smoke", "--seeds", "0", "--no-audit", "--out", str(tmp_path), "--run-config", rc]
    benchmark.main([*args, "--methods", "fedbip,zero-shot"])
    first = json.loads((tmp_path / "benchmark.partial.json").read_text())["runs"][0]["methods"]
    caplog.set_level("INFO")
    benchmark.main([*args, "--methods", "fedbip,zero-shot,centralized", "--resume"])
    run = json.loads((tmp_path / "benchmark.json").read_text())["runs"]
    assert len(run) == 1 and set(run[0]["methods"]) == {"fedbip", "zero-shot", "centralized"}
    assert run[0]["methods"]["fedbip"] == first["fedbip"]  # kept, not run again
    assert "fedbip: kept from the earlier run" in caplog.text and "] centralized" in caplog.text
    with pytest.raises(ValueError, match="another config"):
        benchmark.main([*args[:-1], rc + " seed=0 client.steps=3", "--methods", "fedbip", "--resume"])


def test_merge_ignores_the_epoch_count_under_a_step_budget(tmp_path):
    f1, f2 = tmp_path / "a.json", tmp_path / "b.json"
    budget = {"seed": 0, "classifier.steps": 300}
    f1.write_text(json.dumps({"runs": [_run(0, ["x"], 0.5, config={**budget, "classifier.epochs": 25})]}))
    f2.write_text(json.dumps({"runs": [_run(0, ["y"], 0.4, config={**budget, "classifier.epochs": 30})]}))
    assert sorted(benchmark.merge_runs([f1, f2])[0]["methods"]) == ["x", "y"]
    f2.write_text(json.dumps({"runs": [_run(0, ["y"], 0.4, config={**budget, "classifier.steps": 200})]}))
    with pytest.raises(ValueError, match="another configuration"):
        benchmark.merge_runs([f1, f2])


def test_classifier_seeds_retrain_on_the_same_training_set(tiny_model, tmp_path, monkeypatch, caplog):
    seeds = []
    real = benchmark.train_classifier

    def spy(x, y, num_classes, cfg, seed, *args, **kwargs):
        seeds.append((float(x.double().sum()), seed))
        return real(x, y, num_classes, cfg, seed, *args, **kwargs)

    monkeypatch.setattr(benchmark, "train_classifier", spy)
    rc = f"model.id='{tiny_model}' data.domains='medical,satellite'"
    args = ["accuracy", "--smoke", "--seeds", "1", "--no-audit", "--out", str(tmp_path), "--run-config", rc]
    benchmark.main([*args, "--methods", "fedbip,centralized,ensemble", "--classifier-seeds", "3"])
    run = json.loads((tmp_path / "benchmark.json").read_text())["runs"][0]["methods"]
    for m in ("fedbip", "centralized"):
        by_seed = run[m]["accuracy_by_classifier_seed"]
        assert list(by_seed) == ["1", "1001", "1002"], m
        assert by_seed["1"] == run[m]["accuracy"], m
        assert all(set(a) == set(run[m]["accuracy"]) for a in by_seed.values()), m
    # fedbip's repeats (its seed-1 classifier is the server pipeline's), then centralized's
    # three, then the ensemble's local models (seed 1, no repeats): each on its own training set
    (f1, s1), (f2, s2), (c1, s3), (c2, s4), (c3, s5) = seeds[:5]
    assert [s1, s2, s3, s4, s5] == [1001, 1002, 1, 1001, 1002] and all(s == 1 for _, s in seeds[5:])
    assert f1 == f2 != c1 == c2 == c3
    assert "accuracy_by_classifier_seed" not in run["ensemble"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "Classifier seeds" in md and "| shapes-feature | 1 | fedbip | 1: " in md
    caplog.set_level("INFO")
    benchmark.main([*args, "--methods", "fedbip,centralized,ensemble", "--classifier-seeds", "3", "--resume"])
    assert caplog.text.count("kept from the earlier run") == 3
    with pytest.raises(ValueError, match=">= 1"):
        benchmark.run_setting("shapes-feature", ["fedbip"], 0, {}, classifier_seeds=0)
