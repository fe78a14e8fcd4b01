"""Property-based fuzzing of the server's intake (the strategies are in ``tests/fuzzing.py``).

Hostile uploads (mutated records, keys, dtypes, shapes, headers, bytes, values, strings, types,
metrics, error replies) are each accepted and then synthesized, or rejected with a logged
reason naming the node; hostile evaluation replies never crash the scoring; a whole upload
round with a hostile reply beside two honest ones completes. A bounded number of examples runs
here; the larger run on demand (counts printed):

    FEDBIP_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_intake.py -s
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.models.ldm import load_components
from tests import fuzzing
from tests.helpers import Model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflowing casts of the mutations
EXAMPLES = int(os.environ.get("FEDBIP_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVER = {
    "min-clients": 2,
    "server.inference-steps": 2,
    "server.batch-size": 16,
    "classifier.epochs": 1,
    "classifier.batch-size": 16,
    "server.max-upload-mb": 64.0,
}


@pytest.fixture(scope="module")
def server(tiny_model):
    cfg = FedBiPConfig.from_run_config({"model.id": tiny_model, "model.device": "cpu", **SERVER})
    comps = load_components(cfg.model.id, "cpu", "float32")
    return comps, cfg, Model.of(comps, cfg.data.resolution)


@pytest.fixture(scope="module", autouse=True)
def quiet_logs():
    """Thousands of rejections: checked, not printed."""
    ours, flwr_log = logging.getLogger("fedbip_flower"), logging.getLogger("flwr")
    saved = ours.propagate, ours.level, flwr_log.level
    ours.propagate = False
    ours.setLevel(logging.INFO)
    flwr_log.setLevel(logging.ERROR)  # "record ... replaced" warnings of the mutations
    yield
    ours.propagate, _, _ = saved
    ours.setLevel(saved[1])
    flwr_log.setLevel(saved[2])


def test_fuzzed_uploads_are_accepted_and_synthesized_or_rejected_naming_the_node(server):
    comps, cfg, model = server
    seen: Counter = Counter()

    @SETTINGS
    @given(fuzzing.uploads(model))
    def check(content):
        outcome, detail = fuzzing.check_upload(comps, cfg, 1000 + sum(seen.values()), content)
        seen[outcome] += 1
        assert outcome in ("accepted", "rejected"), detail

    check()
    print(f"\nfuzzed uploads: {dict(seen)}")
    assert sum(seen.values()) >= min(EXAMPLES, 20)
    assert seen["rejected"] > 0  # the mutations do reach the validation


def test_fuzzed_evaluation_replies_never_crash(server):
    comps, cfg, _ = server
    seen: Counter = Counter()

    @SETTINGS
    @given(fuzzing.evaluation_replies())
    def check(content):
        outcome, detail = fuzzing.check_evaluation(comps, cfg, 7, content)
        seen[outcome] += 1
        assert outcome != "crashed", detail

    check()
    print(f"\nfuzzed evaluation replies: {dict(seen)}")


@pytest.mark.slow
def test_a_whole_round_with_a_fuzzed_reply_completes_for_the_honest_sites(server):
    comps, cfg, model = server

    @settings(SETTINGS, max_examples=max(3, EXAMPLES // 20))
    @given(fuzzing.uploads(model))
    def check(content):
        outcome, detail = fuzzing.check_full_round(comps, cfg, model, content)
        assert outcome == "accepted", detail

    check()
