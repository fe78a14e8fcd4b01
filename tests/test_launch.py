"""The launcher's status reading and process handling, with a stand-in `flwr` executable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from fedbip_flower.tools import launch, supervise
from tests.helpers import fake_flwr


def test_run_status_reads_the_finished_run(tmp_path, monkeypatch):
    runs = {"runs": [{"run-id": "7", "status": "finished:failed"}, {"run-id": "8", "status": "running"}]}
    monkeypatch.setattr(launch, "BIN", fake_flwr(tmp_path, f"print(json.dumps({runs!r}))"))
    assert launch.run_status(7, "c", {}, wait=5)["status"] == "finished:failed"


def test_run_status_unreadable_answer_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "BIN", fake_flwr(tmp_path, "print('not json'); sys.exit(1)"))
    t0 = time.time()
    with pytest.raises(launch.LaunchError, match="cannot read the status of run 3: not json"):
        launch.run_status(3, "c", {}, wait=3)
    assert time.time() - t0 >= 3  # retried until the deadline, not failed at the first answer


def test_run_status_hanging_flwr_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "BIN", fake_flwr(tmp_path, "time.sleep(60)"))
    real_run = subprocess.run
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: real_run(*a, **{**k, "timeout": 1}))
    with pytest.raises(launch.LaunchError, match="did not answer"):
        launch.run_status(3, "c", {}, wait=0)


def test_processes_stops_every_process_even_one_ignoring_sigterm(tmp_path):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    with supervise.Processes({}, tmp_path) as procs:
        stubborn = procs.start("stubborn", [sys.executable, "-c", code])
        plain = procs.start("plain", [sys.executable, "-c", "import time; time.sleep(600)"])
        deadline = time.time() + 30
        while "up" not in procs.log("stubborn").splitlines() and time.time() < deadline:
            time.sleep(0.1)
        # both really run, and the stubborn one has installed its SIGTERM handler
        assert "up" in procs.log("stubborn").splitlines() and stubborn.poll() is None and plain.poll() is None
        procs.stop_all(grace=2)  # SIGTERM to both, SIGKILL after 2 s
    assert plain.poll() is not None
    assert stubborn.poll() == -signal.SIGKILL  # it ignored SIGTERM: only the kill stopped it
