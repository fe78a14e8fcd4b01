"""ClientApp and ServerApp handlers with a fake Grid: the whole round, bad replies, failures."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, MessageType, RecordDict

from client_app import app as client_module
from fedbip_flower.config import ConfigError
from fedbip_flower.federation.server import run_server
from fedbip_flower.federation.strategy import FedBiPError
from server_app import app as server_module
from tests.fakegrid import FakeGrid, instruction, set_task_identity

set_task_identity()


def _nodes(n):
    return {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}


def _results(out: Path) -> dict:
    (path,) = out.glob("*/results.json")
    return json.loads(path.read_text())


def test_client_train_handler_replies_with_one_upload(fast_run_config):
    msg = instruction(RecordDict({"config": ConfigRecord(fast_run_config)}), MessageType.TRAIN, 101)
    ctx = Context(
        run_id=1, node_id=101, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    rep = client_module.app(msg, ctx)
    assert not rep.has_error()
    assert set(rep.content.array_records) == {"upload"}
    assert rep.content["meta"]["domain"] == "satellite"
    # what leaves the client: latents, labels and concepts only, never pixels
    sizes = {k: tuple(a.shape) for k, a in rep.content["upload"].items()}
    assert sizes["latents"] == (30, 4, 16, 16) and all(len(s) < 5 for s in sizes.values())


def test_server_main_full_round(fast_run_config, tmp_path):
    grid = FakeGrid(_nodes(2), client_module.app)
    ctx = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**fast_run_config, "output-dir": str(tmp_path)},
    )
    server_module.main(grid, ctx)
    res = _results(tmp_path)
    assert res["status"] == "completed"
    assert [c["status"] for c in res["clients"]] == ["accepted", "accepted"]
    assert {c["domain"] for c in res["clients"]} == {"medical", "satellite"}
    assert all(0 <= c["accuracy"] <= 1 and c["upload_bytes"] > 0 for c in res["clients"])
    assert res["num_synthetic"] == 60
    # Flower's Result is kept: its metrics agree with the outcome the strategy reported
    flower = res["flower_metrics"]
    assert flower["evaluate"]["1"]["accuracy-mean"] == pytest.approx(res["mean_accuracy"])
    assert flower["train"]["1"]["num-synthetic"] == res["num_synthetic"]
    # exactly one upload per client, then one evaluation message per client
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("train") == 2 and kinds.count("evaluate") == 2 and len(kinds) == 4
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "classifier.safetensors").is_file() and (run_dir / "server.log").stat().st_size > 0
    assert len(list(run_dir.glob("synthetic_*.png"))) == 2
    assert set(res["timings_s"]) >= {"clients", "synthesis", "classifier", "evaluation", "total"}


def _nan_latents(rep):
    arr = rep.content["upload"]["latents"]
    rep.content["upload"]["latents"] = Array(np.full(arr.shape, np.nan, np.float16))
    return rep


def _wrong_model(rep):
    rep.content["meta"]["model-fingerprint"] = "0000"
    return rep


def _raw_images(rep):
    rep.content["upload"]["images"] = Array(np.zeros((2, 3, 32, 32), np.uint8))
    return rep


@pytest.mark.parametrize(
    ("tamper", "reason"), [(_nan_latents, "NaN"), (_wrong_model, "fingerprint"), (_raw_images, "unexpected array")]
)
def test_bad_reply_is_rejected_and_the_run_continues(fast_run_config, tmp_path, tamper, reason):
    grid = FakeGrid(_nodes(3), client_module.app, tamper={102: tamper})
    run_server(grid, {**fast_run_config, "output-dir": str(tmp_path)}, run_id=1, progress=False)
    res = _results(tmp_path)
    bad = [c for c in res["clients"] if c["node_id"] == 102][0]
    assert bad["status"] == "rejected"
    assert reason in bad["reason"]
    assert sum(c["status"] == "accepted" for c in res["clients"]) == 2
    log = next(tmp_path.iterdir()).joinpath("server.log").read_text()
    assert "rejected the upload of node 102" in log


def test_failing_client_and_lost_node(fast_run_config, tmp_path):
    nodes = _nodes(3)
    nodes[101] = {**nodes[101], "data-dir": str(tmp_path / "no-such-site")}
    grid = FakeGrid(nodes, client_module.app, lost=[102])
    cfg = {**fast_run_config, "output-dir": str(tmp_path / "out"), "min-clients": 1, "server.round-timeout": 2.0}
    run_server(grid, cfg, run_id=1, progress=False)
    res = _results(tmp_path / "out")
    by = {c["node_id"]: c for c in res["clients"]}
    assert by[100]["status"] == "accepted"
    # the site's reason reaches the server, its local path does not
    assert by[101]["status"] == "rejected" and "<data-dir>" in by[101]["reason"]
    assert "no-such-site" not in by[101]["reason"] and str(tmp_path) not in json.dumps(res["clients"])
    assert by[102]["status"] == "rejected" and "no reply" in by[102]["reason"]


def test_upload_round_stops_early_when_min_clients_is_out_of_reach(fast_run_config, tmp_path):
    """One site fails at once and another never answers: with min-clients=3 of 3 the run cannot
    complete, so the server fails at the first failure instead of waiting out the round."""
    nodes = _nodes(3)
    nodes[101] = {**nodes[101], "data-dir": str(tmp_path / "no-such-site")}
    grid = FakeGrid(nodes, client_module.app, lost=[102])
    cfg = {**fast_run_config, "output-dir": str(tmp_path), "min-clients": 3, "server.round-timeout": 600.0}
    t0 = time.time()
    with pytest.raises(
        FedBiPError, match="only 1 good upload.*min-clients is 3.*node 102: no reply yet when the round stopped"
    ):
        run_server(grid, cfg, run_id=1, progress=False)
    assert time.time() - t0 < 120  # not the 600 s round timeout
    log = next(tmp_path.iterdir()).joinpath("server.log").read_text()
    assert "upload round stopped early" in log and re.search(r"upload [12]/3: node 101 failed", log), log


def test_site_keeps_its_classifier_and_score(fast_run_config, tmp_path):
    """With ``results-dir`` in its node config, a site keeps the classifier it was sent, its
    score and the run id; the server's results agree."""
    nodes = _nodes(2)
    nodes[100] = {**nodes[100], "results-dir": str(tmp_path / "site-100")}
    grid = FakeGrid(nodes, client_module.app)
    run_server(grid, {**fast_run_config, "output-dir": str(tmp_path / "out")}, run_id=1, progress=False)
    res = _results(tmp_path / "out")
    (run_dir,) = (tmp_path / "site-100").glob("run*")
    score = json.loads((run_dir / "score.json").read_text())
    server_side = next(c for c in res["clients"] if c["node_id"] == 100)
    assert score["run_id"] == "1" and score["accuracy"] == server_side["accuracy"]
    assert score["num_test"] == server_side["num_test"] > 0
    from safetensors.torch import load_file

    sent = load_file(str(next((tmp_path / "out").iterdir()) / "classifier.safetensors"))
    kept = load_file(str(run_dir / "classifier.safetensors"))
    assert sent.keys() == kept.keys() and all(torch.equal(sent[k], kept[k]) for k in sent)
    lines = (tmp_path / "site-100" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["accuracy"] == score["accuracy"]
    assert not (tmp_path / "site-101").exists()


def test_too_few_good_replies_stop_the_run(fast_run_config, tmp_path):
    grid = FakeGrid(_nodes(2), client_module.app, tamper={101: _wrong_model})
    with pytest.raises(FedBiPError, match="only 1 good upload.*min-clients is 2.*node 101.*fingerprint"):
        run_server(grid, {**fast_run_config, "output-dir": str(tmp_path)}, run_id=1, progress=False)
    res = _results(tmp_path)
    assert res["status"] == "failed" and "min-clients" in res["error"]
    assert not any(m.metadata.message_type == "evaluate" for m in grid.sent)


def test_too_few_nodes_connected(fast_run_config, tmp_path):
    grid = FakeGrid(_nodes(1), client_module.app)
    cfg = {**fast_run_config, "output-dir": str(tmp_path), "server.wait-timeout": 0.0}
    with pytest.raises(FedBiPError, match="only 1 node"):
        run_server(grid, cfg, run_id=1, progress=False)


def test_bad_config_stops_before_any_work(fast_run_config, tmp_path):
    grid = FakeGrid(_nodes(2), client_module.app)
    with pytest.raises(ConfigError, match="client.lrr"):
        run_server(grid, {**fast_run_config, "client.lrr": 1.0, "output-dir": str(tmp_path)}, progress=False)
    assert grid.sent == [] and not list(tmp_path.iterdir())


def test_same_seed_same_results(fast_run_config, tmp_path):
    accs = []
    for k in range(2):
        out = tmp_path / str(k)
        run_server(
            FakeGrid(_nodes(2), client_module.app),
            {**fast_run_config, "output-dir": str(out)},
            run_id=k,
            progress=False,
        )
        res = _results(out)
        accs.append([c["accuracy"] for c in res["clients"]])
        from safetensors.torch import load_file

        w = load_file(str(next(out.iterdir()) / "classifier.safetensors"))
        accs[-1].append(float(w["fc.weight"].sum()))
    assert accs[0] == accs[1]


def test_no_concept_steps_and_a_site_without_test_images_give_valid_json(fast_run_config, tmp_path):
    from fedbip_flower.tools.deploy.sitedata import write_site

    # Site 101 holds exactly `shots` images per class: nothing is left for its test split, so
    # its ClientApp refuses at once (before personalization) and the server rejects it.
    nodes = _nodes(2)
    nodes[101]["data-dir"] = str(write_site(tmp_path / "site", "thermal", per_class=3))
    out = tmp_path / "out"
    res = run_server(
        FakeGrid(nodes, client_module.app),
        {**fast_run_config, "client.steps": 0, "min-clients": 1, "output-dir": str(out)},
        run_id=3,
        progress=False,
    )
    text = next(out.glob("*/results.json")).read_text()
    assert "NaN" not in text and json.loads(text)["status"] == "completed"
    by_node = {c["node_id"]: c for c in json.loads(text)["clients"]}
    assert by_node[101]["status"] == "rejected" and by_node[101]["accuracy"] is None
    assert "30 training and 0 test" in by_node[101]["reason"] and "'thermal'" in by_node[101]["reason"]
    assert 0 <= by_node[100]["accuracy"] <= 1 and res["mean_accuracy"] == by_node[100]["accuracy"]
    assert all("loss-first" not in c["client_metrics"] for c in by_node.values())
