"""One server pipeline: the ServerApp and the benchmark's FedBiP methods build the same model.

Client order and synthesis seeds come from the uploads alone (domain, content digest), so
neither node ids nor the order of the replies change the global model, and the benchmark's
``fedbip`` row equals the Flower app's per-client accuracies for the same config and seed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ConfigRecord, Message

from client_app import app as client_module
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation import server_pipeline
from fedbip_flower.federation.client import run_train
from fedbip_flower.federation.payload import validate_reply
from fedbip_flower.federation.server import run_server
from fedbip_flower.federation.sites import expected_for
from fedbip_flower.federation.strategy import FedBiPStrategy, RunOutcome
from fedbip_flower.research import benchmark
from tests.fakegrid import FakeGrid, set_task_identity
from tests.helpers import Model, honest_payload

set_task_identity()


@pytest.fixture(scope="module")
def model(tiny_components) -> Model:
    return Model.of(tiny_components, 32)


# ----------------------------------------------------------------------------- order and seeds
def test_client_order_is_by_domain_then_content_whatever_the_keys(model):
    pairs = ((1, "thermal"), (2, "medical"), (3, "medical"))
    a, b, c = (honest_payload(model, seed=k, domain=d) for k, d in pairs)
    first, second = {900: a, 17: b, 5: c}, {"x": c, "y": a, "z": b}
    in_order = [first[k] for k in server_pipeline.client_order(first)]
    assert [p.domain for p in in_order] == ["medical", "medical", "thermal"]
    assert all(p is q for p, q in zip(in_order, [second[k] for k in server_pipeline.client_order(second)], strict=True))
    assert server_pipeline.synthesis_seed(3, 2) == 3002


def test_the_digest_covers_the_upload_not_the_client_metrics(model):
    p = honest_payload(model, seed=1)
    d = server_pipeline.upload_digest(p)
    assert d == server_pipeline.upload_digest(dataclasses.replace(p, metrics={"client-seconds": 12.5}))
    # the wire dtypes: a float32 copy of the fp16 latents is the same upload
    assert d == server_pipeline.upload_digest(dataclasses.replace(p, latents=p.latents.float()))
    s = p.s.clone()
    s[0, 0] += 1
    assert d != server_pipeline.upload_digest(dataclasses.replace(p, s=s))
    assert d != server_pipeline.upload_digest(dataclasses.replace(p, domain="thermal"))


def test_a_failing_upload_is_dropped_by_the_steps_and_raised_by_build_global_model(
    fast_run_config, tiny_components, model, monkeypatch
):
    cfg = FedBiPConfig.from_run_config(fast_run_config)
    uploads = {k: honest_payload(model, seed=k, domain=d) for k, d in ((0, "medical"), (1, "thermal"))}
    real = server_pipeline.synthesize_upload

    def synth(worker, payload, cfg, seed, progress=False):
        if payload.domain == "thermal":
            raise RuntimeError("out of memory")
        return real(worker, payload, cfg, seed, progress)

    monkeypatch.setattr(server_pipeline, "synthesize_upload", synth)
    with pytest.raises(server_pipeline.PipelineError, match="client 1: synthesis from its upload failed"):
        server_pipeline.build_global_model(tiny_components, uploads, cfg)
    synthesized = server_pipeline.synthesize_uploads(tiny_components, uploads, cfg)
    assert list(synthesized.shards) == [0] and list(synthesized.rejected) == [1]
    assert "RuntimeError: out of memory" in synthesized.rejected[1]
    built = server_pipeline.train_global(tiny_components, synthesized, cfg)
    assert built.order == [0] and list(built.rejected) == [1]
    assert len(built.labels) == 6 and built.stats["sgd-steps"] >= 1


# ----------------------------------------------------------------------------- app == benchmark
def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strategy_round(cfg: FedBiPConfig, components, uploads: dict, nodes: list[int], reverse: bool) -> RunOutcome:
    """aggregate_train with the real client replies ``uploads`` (by partition), the one of
    partition p sent from node ``nodes[p]``; ``reverse`` reverses the order of arrival."""
    strategy = FedBiPStrategy(cfg, components, progress=False)
    msgs = list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid({n: {} for n in nodes}, None)))
    sent = {}
    for k, m in enumerate(msgs):  # as the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id{k}"
        sent[m.metadata.dst_node_id] = m
    replies = [Message(uploads[part], reply_to=sent[nid]) for part, nid in enumerate(nodes)]
    strategy.aggregate_train(1, replies[::-1] if reverse else replies)
    return strategy.outcome()


def test_the_global_model_depends_on_the_uploads_not_on_node_ids_or_reply_order(fast_run_config, tiny_components):
    # Three sites, two sharing the 'thermal' domain (a tie the content digest breaks).
    run_config = {**fast_run_config, "data.domains": "thermal,medical", "seed": 2}
    cfg = FedBiPConfig.from_run_config(run_config)
    uploads = {
        p: run_train(ConfigRecord(cfg.to_run_config()), {"partition-id": p, "num-partitions": 3}, False)
        for p in range(3)
    }
    one = _strategy_round(cfg, tiny_components, uploads, [101, 102, 103], reverse=False)
    two = _strategy_round(cfg, tiny_components, uploads, [9000, 42, 7], reverse=True)
    assert _same_state(_state(one.classifier), _state(two.classifier))
    # The benchmark's server side on the same uploads builds the same classifier.
    payloads = [validate_reply(uploads[p], expected_for(tiny_components, cfg)) for p in range(3)]
    built, nbytes = benchmark.fedbip_server(tiny_components, payloads, cfg)
    assert _same_state(_state(one.classifier), _state(built.classifier))
    assert sorted(nbytes) == sorted(r.upload_bytes for r in one.clients)
    assert [payloads[k].domain for k in built.order] == ["medical", "thermal", "thermal"]


def test_the_benchmark_fedbip_row_is_the_apps_result(fast_run_config, tmp_path):
    """The same run config and seed through the Flower apps (fake grid, real ClientApp and
    ServerApp code) and through ``benchmark.run_setting``: equal accuracies per client."""
    seed = 3
    # Partition 0 is 'thermal', 1 'medical': the client order (by domain) is not the
    # partition order, and the node ids are in neither order.
    extra = {**fast_run_config, "data.domains": "thermal,medical"}
    setting = tmp_path / "two-sites.toml"  # an experiment preset of its own: two sites
    setting.write_text('min-clients = 2\ndata.partition-by = "domain"\n')
    row = benchmark.run_setting(str(setting), ["fedbip"], seed, extra, audit=False)["methods"]["fedbip"]

    nodes = {5000: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}
    app_config = {"data.partition-by": "domain", **extra, "seed": seed, "output-dir": str(tmp_path)}
    res = run_server(FakeGrid(nodes, client_module.app), app_config, run_id=1, progress=False)
    assert res["status"] == "completed"
    app_acc = {c["domain"]: c["accuracy"] for c in res["clients"]}
    assert app_acc == row["accuracy"]  # float equality, per client
    assert res["mean_accuracy"] == sum(row["accuracy"].values()) / 2
    assert res["num_synthetic"] == row["num_train_images"]
    by_node = {c["node_id"]: c for c in res["clients"]}
    assert [by_node[5000]["upload_bytes"], by_node[12]["upload_bytes"]] == row["upload_bytes"]
