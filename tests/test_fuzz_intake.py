"""Property-based fuzzing of the server's intake (hypothesis drives ``fedbip_flower.tools.fuzz``).

Random mutations of a valid reply (records, keys, dtypes, shapes, headers, bytes, values,
strings, types, metrics, error replies) never make the strategy raise: each reply is either
accepted and then synthesized, or rejected with a logged reason naming its node. A bounded
number of examples runs here; ``FEDBIP_FUZZ_EXAMPLES=2000`` runs more, and
``python -m fedbip_flower.tools.fuzz --replies 2000`` is the on-demand command with counts.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbip_flower.tools import fuzz

EXAMPLES = int(os.environ.get("FEDBIP_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class DrawSource(fuzz.Source):
    """The fuzzer's random choices, drawn from hypothesis (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def real(self) -> float:
        return self.data.draw(st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e4, 1e3, -0.0]))

    def text(self, max_len: int = 40) -> str:
        chars = st.characters(exclude_categories=())  # surrogates and control characters too
        long = st.sampled_from(fuzz._CHARS).map(lambda c: c * 1500)
        return self.data.draw(st.text(alphabet=chars, max_size=max_len) | long)

    def raw(self, max_len: int = 64) -> bytes:
        return self.data.draw(st.binary(max_size=max_len))


@pytest.fixture(scope="module")
def fuzz_strategy(tiny_model):
    strategy, model = fuzz.make_strategy(tiny_model)
    return strategy, model


@pytest.fixture(scope="module")
def quiet_logs():
    import logging

    ours, flwr_log = logging.getLogger("fedbip_flower"), logging.getLogger("flwr")
    saved = ours.propagate, flwr_log.level
    ours.propagate = False
    flwr_log.setLevel(logging.ERROR)
    sink = logging.NullHandler()
    ours.addHandler(sink)
    yield
    ours.removeHandler(sink)
    ours.propagate, _ = saved
    flwr_log.setLevel(saved[1])


def test_fuzzed_uploads_are_accepted_and_synthesized_or_rejected_naming_the_node(fuzz_strategy, quiet_logs):
    strategy, model = fuzz_strategy
    seen = {}

    @SETTINGS
    @given(st.data())
    def check(data):
        src = DrawSource(data)
        nid = 1000 + len(seen)
        content = fuzz.fuzzed_content(src, model, seed=len(seen))
        outcome, detail = fuzz.try_upload(strategy, nid, content, seed=0)
        seen[outcome] = seen.get(outcome, 0) + 1
        assert outcome in ("accepted", "rejected"), detail

    check()
    assert sum(seen.values()) >= min(EXAMPLES, 20)


def test_fuzzed_evaluation_replies_never_crash(fuzz_strategy, quiet_logs):
    strategy, _ = fuzz_strategy

    @SETTINGS
    @given(st.data())
    def check(data):
        outcome, detail = fuzz.try_evaluation(strategy, 7, fuzz.fuzzed_evaluation(DrawSource(data)))
        assert outcome != "crashed", detail

    check()


def test_the_seeded_fuzzer_finds_no_crash(tiny_model, capsys):
    code = fuzz.main(["--replies", "120", "--model", tiny_model, "--full-every", "60", "--quiet", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fuzzed replies: 120 tried" in out and "0 crashed" in out and "0 accepted but not synthesizable" in out
    assert "0 caught by the per-client guard" in out and "2 full rounds" in out
