"""A hostile (or broken) site among honest ones never stops the run: one test per hole.

Replies are crafted (no personalization runs): honest uploads are valid random payloads
for the tiny test model, the hostile one is an upload, evaluation reply or error that used
to make the whole run fail after every other site had done its work.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict

from fedbip_flower.federation.payload import (
    PayloadError,
    safe_filename,
    safe_text,
    to_record_dict,
    validate_reply,
)
from fedbip_flower.federation.server import run_server
from tests.fakegrid import FakeGrid, set_task_identity
from tests.helpers import Model, expected, honest_payload, instruction

set_task_identity()
DOMAINS = ("medical", "satellite", "thermal", "chalkboard")


@pytest.fixture(scope="module")
def model(tiny_components) -> Model:
    return Model.of(tiny_components, 32)


def _upload(model: Model, nid: int, domain: str | None = None) -> RecordDict:
    return to_record_dict(honest_payload(model, seed=nid, n=6, domain=domain or DOMAINS[nid % 4]))


def _score(acc=0.5, n=10) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"accuracy": acc, "num-examples": n})})


def _app(train: dict, evaluate: dict):
    """A ClientApp stand-in answering each node with its crafted reply (or raising)."""

    def app(msg: Message, ctx) -> Message:
        nid = msg.metadata.dst_node_id
        item = (train if msg.metadata.message_type == "train" else evaluate)[nid]
        if isinstance(item, Exception):
            raise item
        return Message(item, reply_to=msg)

    return app


def _run(tmp_path: Path, cfg: dict, train: dict, evaluate: dict | None = None) -> tuple[dict, str, Path]:
    evaluate = evaluate or {nid: _score() for nid in train}
    out = tmp_path / "out"
    grid = FakeGrid({nid: {} for nid in train}, _app(train, evaluate))
    res = run_server(grid, {**cfg, "output-dir": str(out)}, run_id=1, progress=False)
    (run_dir,) = list(out.iterdir())
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == res["status"]
    return res, (run_dir / "server.log").read_text(), run_dir


def _by_node(res: dict) -> dict[int, dict]:
    return {c["node_id"]: c for c in res["clients"]}


def _honest(model, *nids) -> dict:
    return {nid: _upload(model, nid) for nid in nids}


# ----------------------------------------------------------------------------- uploads
def test_a_metric_list_rejects_only_its_node(fast_run_config, tmp_path, model):
    bad = _upload(model, 102)
    bad["metrics"]["loss-first"] = [1.0, 2.0]  # a MetricRecord may hold lists
    res, log, _ = _run(tmp_path, fast_run_config, {**_honest(model, 100, 101), 102: bad})
    assert res["status"] == "completed"
    c = _by_node(res)[102]
    assert c["status"] == "rejected" and "metric 'loss-first' must be a number" in c["reason"]
    assert "rejected the upload of node 102" in log


def test_a_template_too_long_in_tokens_is_rejected_at_validation(fast_run_config, tmp_path, model):
    bad = _upload(model, 102)
    bad["meta"]["template"] = "a [S] " + "zebra " * 40 + "[V]"  # short in characters, 40+ tokens
    res, log, _ = _run(tmp_path, fast_run_config, {**_honest(model, 100, 101), 102: bad})
    assert res["status"] == "completed" and res["num_synthetic"] == 12
    c = _by_node(res)[102]
    assert c["status"] == "rejected" and "cannot be laid out with the server's tokenizer" in c["reason"]
    assert "the model takes 32" in c["reason"] and "rejected the upload of node 102" in log


def test_client_domains_never_leave_the_run_folder(fast_run_config, tmp_path, model):
    train = {
        100: _upload(model, 100, "../../escaped"),
        101: _upload(model, 101, "é" * 200),
        102: _upload(model, 102, "a/b\\c"),
        103: _upload(model, 103, "nul\x00byte"),
    }
    res, log, run_dir = _run(tmp_path, {**fast_run_config, "min-clients": 3}, train)
    by = _by_node(res)
    assert by[103]["status"] == "rejected" and "control characters" in by[103]["reason"]
    assert [by[n]["status"] for n in (100, 101, 102)] == ["accepted"] * 3
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    inside = run_dir.relative_to(tmp_path)
    assert all(p.parent in (inside, inside / "synthetic") for p in files), files
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert pngs == ["synthetic_a-b-c_node102.png", "synthetic_client_node101.png", "synthetic_escaped_node100.png"]
    shards = sorted(p.name for p in (run_dir / "synthetic").iterdir())
    assert shards == ["0000_escaped.safetensors", "0001_a-b-c.safetensors", "0002_client.safetensors"], shards
    assert "\x00" not in log


def test_a_failed_reply_with_a_hostile_reason_is_logged_bounded_and_printable(fast_run_config, tmp_path, model):
    hostile = RuntimeError("line\n" * 5000 + "\x1b[2J\u202eforged")
    res, log, _ = _run(tmp_path, fast_run_config, {**_honest(model, 100, 101), 102: hostile})
    c = _by_node(res)[102]
    assert c["status"] == "rejected" and c["reason"].startswith("client failed (code 2)")
    assert len(c["reason"].encode()) <= 600 and "\n" not in c["reason"] and "\x1b" not in c["reason"]
    line = next(ln for ln in log.splitlines() if "rejected the upload of node 102" in ln)
    assert "\x1b" not in log and "\u202e" not in log and len(line) < 800


def test_class_names_that_differ_from_the_majority_reject_one_node(fast_run_config, tmp_path, model):
    bad = _upload(model, 102)
    bad["meta"]["class-names"] = ["a", "b", "c", "\u202e" * 150]
    res, log, _ = _run(tmp_path, fast_run_config, {**_honest(model, 100, 101), 102: bad})
    c = _by_node(res)[102]
    assert c["status"] == "rejected" and "differ from the majority" in c["reason"]
    assert "\u202e" not in log


def test_a_synthesis_failure_rejects_only_that_node(fast_run_config, tmp_path, model, monkeypatch):
    from fedbip_flower.federation import server_pipeline

    real = server_pipeline.synthesize_client

    def flaky(components, payload, *args, **kwargs):
        if payload.domain == "thermal":
            raise RuntimeError("out of memory")
        return real(components, payload, *args, **kwargs)

    monkeypatch.setattr(server_pipeline, "synthesize_client", flaky)
    res, log, _ = _run(tmp_path, fast_run_config, _honest(model, 100, 101, 102))  # 102 is 'thermal'
    c = _by_node(res)[102]
    assert res["status"] == "completed" and res["num_synthetic"] == 12
    assert c["status"] == "rejected" and "synthesis from its upload failed: RuntimeError: out of memory" in c["reason"]
    assert "rejected the upload of node 102" in log


def test_too_few_uploads_left_after_synthesis_stop_the_run_naming_the_nodes(
    fast_run_config, tmp_path, model, monkeypatch
):
    from fedbip_flower.federation import server_pipeline
    from fedbip_flower.federation.strategy import FedBiPError

    monkeypatch.setattr(server_pipeline, "synthesize_client", lambda *a, **k: 1 / 0)
    with pytest.raises(FedBiPError, match="only 0 good upload.*left after synthesis.*node 100: synthesis"):
        _run(tmp_path, fast_run_config, _honest(model, 100, 101))


def test_an_upload_that_decodes_to_another_image_size_is_rejected(fast_run_config, tmp_path, model):
    """Concept-only uploads start from noise at the model's size; a hostile upload with
    latents at data.resolution's size would decode to other images and break the training set."""
    cfg = {**fast_run_config, "client.upload-latents": False, "data.resolution": 64}
    train = {}
    for nid in (100, 101):
        p = honest_payload(model, seed=nid, domain=DOMAINS[nid % 4])
        p.latents = p.latents[:0]  # concept level only, as these honest clients are told
        train[nid] = to_record_dict(p)
    big = dataclasses.replace(model, size=32)  # latents for 64 px images
    train[102] = to_record_dict(honest_payload(big, seed=102, domain="thermal"))
    res, log, _ = _run(tmp_path, cfg, train)
    c = _by_node(res)[102]
    assert res["status"] == "completed" and res["num_synthetic"] == 12
    assert c["status"] == "rejected" and "synthesizes images of shape (3, 64, 64)" in c["reason"]


# ----------------------------------------------------------------------------- evaluation replies
def test_unreadable_evaluation_replies_are_ignored_naming_the_node(fast_run_config, tmp_path, model):
    evaluate = {
        100: _score(0.75, 10),
        101: RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": math.inf})}),
        102: RecordDict({"metrics": MetricRecord({"accuracy": [0.5], "num-examples": 4})}),
        103: RecordDict({"meta": ConfigRecord({"domain": "x"})}),
    }
    cfg = {**fast_run_config, "min-clients": 4}
    res, log, _ = _run(tmp_path, cfg, _honest(model, 100, 101, 102, 103), evaluate)
    by = _by_node(res)
    assert res["status"] == "completed" and res["mean_accuracy"] == 0.75 and res["num_scored"] == 1
    # each problem is logged naming the node (and the domain it uploaded)
    assert "malformed test count (inf)" in by[101]["evaluation"] and "node 101 (satellite): sent a malformed" in log
    assert "malformed accuracy ([0.5])" in by[102]["evaluation"] and "node 102 (thermal): sent a malformed" in log
    assert "no 'metrics' record" in by[103]["evaluation"] and "node 103 (chalkboard): sent no 'metrics'" in log


def test_rejected_sites_are_scored_apart_from_the_headline(fast_run_config, tmp_path, model):
    bad = _upload(model, 102)
    bad["meta"]["model-fingerprint"] = "another-model"
    evaluate = {100: _score(0.4), 101: _score(0.6), 102: _score(1.0, 50)}
    res, _, _ = _run(tmp_path, fast_run_config, {**_honest(model, 100, 101), 102: bad}, evaluate)
    assert res["mean_accuracy"] == pytest.approx(0.5) and res["num_scored"] == 2
    assert res["rejected_scores"] == [{"node_id": 102, "domain": "", "accuracy": 1.0, "num_test": 50}]
    assert res["rejected_mean_accuracy"] == 1.0


def test_a_classifier_no_site_could_score_is_reported_as_such(fast_run_config, tmp_path, model):
    evaluate = {100: _score(0.0, 0), 101: RuntimeError("no test images here")}
    res, log, run_dir = _run(tmp_path, fast_run_config, _honest(model, 100, 101), evaluate)
    assert res["status"] == "unscored" and res["mean_accuracy"] is None
    assert res["classifier_path"] == str(run_dir / "classifier.safetensors")
    assert Path(res["classifier_path"]).is_file()
    assert "no accepted site could score it" in res["error"] and str(run_dir) in res["error"]
    assert "node 100 (medical): no test images" in res["error"]
    assert "node 101 (satellite): failed to evaluate" in res["error"]
    assert "no score for the classifier" in log


# ----------------------------------------------------------------------------- the strategy itself
def test_one_hostile_site_among_four_leaves_the_other_three(fast_run_config, tmp_path, model):
    bad = _upload(model, 103)
    bad["metrics"]["loss-first"] = [0.0]
    bad["meta"]["template"] = "[S] " + "word " * 60 + "[V]"
    bad["meta"]["domain"] = "../" * 60
    evaluate = {
        100: _score(0.2),
        101: _score(0.4),
        102: _score(0.6),
        103: RecordDict({"metrics": MetricRecord({"accuracy": math.nan, "num-examples": -1})}),
    }
    res, log, _ = _run(
        tmp_path, {**fast_run_config, "min-clients": 3}, {**_honest(model, 100, 101, 102), 103: bad}, evaluate
    )
    assert res["status"] == "completed" and res["num_scored"] == 3
    assert res["mean_accuracy"] == pytest.approx(0.4) and res["num_synthetic"] == 18
    assert _by_node(res)[103]["status"] == "rejected" and "rejected the upload of node 103" in log


def test_replies_from_unknown_or_repeated_nodes_are_ignored(fast_run_config, tiny_components, model):
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.federation.strategy import FedBiPStrategy

    cfg = FedBiPConfig.from_run_config({**fast_run_config, "min-clients": 2})
    strategy = FedBiPStrategy(cfg, tiny_components, progress=False)
    grid = FakeGrid({1: {}, 2: {}}, None)
    msgs = list(strategy.configure_train(1, None, ConfigRecord(), grid))
    for k, m in enumerate(msgs):  # as the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id{k}"
    stranger = instruction(99)
    second = _upload(model, 2, "a second upload")
    replies = [
        Message(_upload(model, 1), reply_to=msgs[0]),
        Message(_upload(model, 2), reply_to=msgs[1]),
        Message(second, reply_to=msgs[1]),
        Message(_upload(model, 99), reply_to=stranger),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert sorted(strategy.sites.clients) == [1, 2] and metrics["num-accepted"] == 2
    ev = strategy.aggregate_evaluate(1, [Message(_score(0.5), reply_to=instruction(99))])
    assert ev is None and 99 not in strategy.sites.clients


def test_an_oversized_test_count_is_not_a_score(fast_run_config, tiny_components):
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.federation.strategy import FedBiPStrategy

    strategy = FedBiPStrategy(FedBiPConfig.from_run_config(fast_run_config), tiny_components, progress=False)
    strategy.sites.instruct([instruction(1)], "train")
    strategy.sites.clients[1].status = "accepted"
    msg = instruction(1, "evaluate")
    strategy.sites.instruct([msg], "evaluate")
    out = strategy.aggregate_evaluate(1, [Message(_score(0.9, 2**70), reply_to=msg)])
    assert out is None and "malformed test count" in strategy.sites.clients[1].evaluation


# ----------------------------------------------------------------------------- validation units
EXP = expected()
MODEL = Model("fp", 4, 16, 16)


def _rd():
    return to_record_dict(honest_payload(MODEL, 0))


def _set(path: str, value):
    rd = _rd()
    rec, key = path.split(":")
    rd[rec][key] = value
    return rd


UNITS = {
    "metric list": (lambda: _set("metrics:x", [1.0]), "must be a number, got list"),
    "metric not finite": (lambda: _set("metrics:x", math.nan), "not finite"),
    "metric name too long": (lambda: _set("metrics:" + "k" * 65, 1.0), "metric name is 65 characters"),
    "too many metrics": (lambda: _many_metrics(), "above the cap of 64"),
    "class name with NUL": (lambda: _set("meta:class-names", ["a\x00", "b", "c", "d", "e"]), "control characters"),
    "class name too long": (lambda: _set("meta:class-names", ["a" * 201, "b", "c", "d", "e"]), "201 characters"),
    "too many classes": (lambda: _set("meta:class-names", [str(i) for i in range(10001)]), "10001 items"),
    "domain with newline": (lambda: _set("meta:domain", "a\nb"), "domain .* contains control characters"),
    "domain too long": (lambda: _set("meta:domain", "d" * 201), "domain is 201 characters"),
    "lone surrogate": (lambda: _set("meta:domain", "a\ud800"), "control characters"),
    "template too long": (lambda: _set("meta:template", "[S][V]" + "a" * 1000), "template is 1006 characters"),
    "huge fingerprint": (lambda: _set("meta:model-fingerprint", "f" * 5000), "model-fingerprint is 5000"),
}


def _many_metrics():
    rd = _rd()
    for i in range(65):
        rd["metrics"][f"m{i}"] = 1.0
    return rd


@pytest.mark.parametrize("case", sorted(UNITS))
def test_validation_bounds_strings_lists_and_metrics(case):
    make, match = UNITS[case]
    with pytest.raises(PayloadError, match=match):
        validate_reply(make(), EXP)


def test_validation_lays_out_the_prompts_with_the_servers_tokenizer(tiny_components, model):
    exp = expected(
        model_fingerprint=model.fingerprint,
        tokenizer=tiny_components.tokenizer,
    )
    ok = validate_reply(_upload(model, 1), exp)
    assert ok.metrics == {"loss-first": 0.5, "num-train": 6.0}
    # 8 domain tokens and 8 tokens per class concept in a 22-word template: 41 tokens
    long = _upload(model, 1)
    long["upload"]["s"] = Array(torch.zeros(8, 16).numpy())
    long["upload"]["v"] = Array(torch.zeros(3, 8, 16).numpy())
    long["meta"]["template"] = "a [S] " + "photo " * 20 + "of a [V]"
    with pytest.raises(PayloadError, match="prompt for class 'class0' is 41 tokens; the model takes 32"):
        validate_reply(long, exp)
    long["meta"]["template"] = "[S] [V]"
    assert validate_reply(long, exp).v.shape == (3, 8, 16)


def test_safe_names_and_log_text():
    assert safe_filename("../../etc/passwd") == "etc-passwd"
    assert safe_filename("..") == safe_filename("") == safe_filename("\x00") == "client"
    assert safe_filename("é" * 300) == "client" and len(safe_filename("a" * 500)) == 64
    assert "/" not in safe_filename("a/b\\c") and "\\" not in safe_filename("a/b\\c")
    text = safe_text("a\x00b\nc\u202e" + "é" * 400, 100)
    assert "\x00" not in text and "\n" not in text and "\u202e" not in text and len(text.encode()) <= 100


def test_an_accepted_payload_synthesizes(tiny_components, model):
    from fedbip_flower.config import ServerConfig
    from fedbip_flower.method.synthesize import synthesize_client

    exp = expected(
        model_fingerprint=model.fingerprint,
        tokenizer=tiny_components.tokenizer,
    )
    rd = _upload(model, 3, domain="weird domain: ünïcode 🙂 [S] [V]")
    rd["meta"]["template"] = "[V] [S]"
    x, y = synthesize_client(
        tiny_components, validate_reply(rd, exp), ServerConfig(inference_steps=2, multiplier=1), seed=0, progress=False
    )
    assert x.dtype == torch.uint8 and len(x) == len(y) == 6
