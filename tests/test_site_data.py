"""Bad site data gets a clear answer at the start: the helper's and the app's defaults fit,
and a site that cannot give both a training and a test split refuses before any work."""

from __future__ import annotations

import pytest

from fedbip_flower.config import DataConfig, FedBiPConfig
from fedbip_flower.data.loading import NodeConfig, load_client_data
from fedbip_flower.federation.client import SiteDataError, run_train
from fedbip_flower.tools.deploy import cli, sitedata


def test_the_site_data_helper_defaults_fit_the_app_defaults(tmp_path):
    folder = sitedata.write_site(tmp_path / "site-1", sitedata.site_style(1))  # the helper's defaults
    data = load_client_data(DataConfig(), NodeConfig(0, 3, str(folder)), seed=0)  # the app's defaults
    shots = DataConfig().shots
    assert len(data.train_labels) == 10 * shots and len(data.test_labels) == 10 * (sitedata.SITE_PER_CLASS - shots)
    assert "16 training + 8 test image(s) per class" in sitedata.split_note(sitedata.SITE_PER_CLASS)
    assert sitedata.split_note(8).startswith("WARNING") and "--per-class 24" in sitedata.split_note(8)


def test_make_site_data_warns_when_no_test_split_would_be_left(tmp_path, capsys):
    assert cli.main(["make-site-data", str(tmp_path / "s"), "medical", "--per-class", "8"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: with data.shots=16" in out and "no test split" in out


def test_a_site_without_a_test_split_refuses_before_personalization(tmp_path, fast_run_config, monkeypatch):
    from fedbip_flower.federation import client

    folder = sitedata.write_site(tmp_path / "site-2", "satellite", per_class=8)
    monkeypatch.setattr(client, "personalize", lambda *a, **k: pytest.fail("personalization ran"))
    monkeypatch.setattr(client, "load_components", lambda *a, **k: pytest.fail("the LDM was loaded"))
    cfg = {**fast_run_config, "data.shots": 16}
    with pytest.raises(SiteDataError) as info:
        run_train(
            FedBiPConfig.from_run_config(cfg).to_run_config(),
            {"partition-id": 1, "num-partitions": 3, "data-dir": str(folder)},
            progress=False,
        )
    msg = str(info.value)
    assert "site 'satellite'" in msg and str(folder) in msg
    assert "80 image(s) in 10 class(es) (8-8 per class) give 80 training and 0 test image(s) with data.shots=16" in msg
    assert "--per-class 24" in msg and "data.shots=4" in msg


def test_the_launcher_reports_an_unscored_run_with_its_own_exit_code(capsys):
    from fedbip_flower.tools.launch import UNSCORED_EXIT, print_summary

    results = {
        "status": "unscored",
        "mean_accuracy": None,
        "timings_s": {"total": 1.0},
        "error": "a classifier was trained on 60 synthetic images (it is saved at /x/classifier.safetensors), "
        "but no accepted site could score it: node 1 (medical\x1b): no test images.",
        "clients": [{"node_id": 1, "domain": "medical\x1b", "status": "accepted", "accuracy": None, "upload_bytes": 9}],
    }
    assert print_summary(results) == UNSCORED_EXIT == 3
    out, err = capsys.readouterr()
    assert "FedBiP run UNSCORED" in err and "/x/classifier.safetensors" in err and "\x1b" not in out
