"""A stop always completes: no process outlives its launcher, no CLI call blocks forever."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbip_flower.tools import launch, supervise
from fedbip_flower.tools.deploy import common, flwrcli
from tests.helpers import fake_flwr

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# A leader that starts a grandchild detached into its own session (as Flower does with its
# SuperExec), prints both pids, and sleeps.
FAMILY = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "print('grandchild', g.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not supervise.is_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _grandchild(log: Path) -> int:
    deadline = time.time() + 30
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        m = re.search(r"^grandchild (\d+)", text, re.M)
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError("the family did not start")


def test_a_stop_reaches_children_detached_into_their_own_session(tmp_path):
    with supervise.Processes({}, tmp_path) as procs:
        leader = procs.start("family", [sys.executable, "-c", FAMILY])
        grandchild = _grandchild(tmp_path / "family.log")
    assert leader.poll() is not None and _gone(grandchild, 5)


def test_no_process_outlives_a_sigkilled_launcher(tmp_path):
    owner_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedbip_flower.tools.supervise import Processes\n"
        "procs = Processes({}, Path(sys.argv[1]))\n"
        "p = procs.start('family', [sys.executable, '-c', sys.argv[2]])\n"
        "print('leader', p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code, str(tmp_path), FAMILY], stdout=subprocess.PIPE, text=True
    )
    leader = grandchild = 0
    try:
        leader = int(owner.stdout.readline().split()[1])
        grandchild = _grandchild(tmp_path / "family.log")
        assert supervise.is_alive(leader) and supervise.is_alive(grandchild)
        owner.send_signal(signal.SIGKILL)  # no cleanup code of the owner runs
        owner.wait(timeout=10)
        assert _gone(leader, 30) and _gone(grandchild, 30), "a process outlived its SIGKILLed owner"
    finally:
        owner.kill()
        for pid in (leader, grandchild):
            if pid and supervise.is_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_flwr_run_that_never_answers_times_out_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "BIN", fake_flwr(tmp_path, "time.sleep(600)"))
    t0 = time.time()
    with pytest.raises(launch.LaunchError, match="started no run \\(timed out after 2 s\\)"):
        launch.flwr_run(tmp_path, "c", {}, timeout=2, echo=False)
    assert time.time() - t0 < 20


def test_flwr_run_stops_following_a_stream_at_the_timeout(tmp_path, monkeypatch):
    body = "print('Successfully started run 42', flush=True); time.sleep(600)"
    monkeypatch.setattr(launch, "BIN", fake_flwr(tmp_path, body))
    t0 = time.time()
    run_id, text = launch.flwr_run(tmp_path, "c", {}, timeout=2, echo=False)
    assert run_id == 42 and "Successfully" in text and time.time() - t0 < 20


@pytest.mark.slow
def test_flwr_cli_calls_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(flwrcli, "BIN", fake_flwr(tmp_path, "time.sleep(600)"))  # where flwr_cli looks it up
    t0 = time.time()
    with pytest.raises(common.DeployError, match="did not answer in 1 s"):
        flwrcli.flwr_cli(["supernode", "ls"], {}, timeout=1)
    with pytest.raises(common.DeployError, match="did not answer"):
        flwrcli.wait_online("c", {}, count=1, timeout=2)
    assert time.time() - t0 < 60


def test_logs_survive_restarts_and_rotate_by_size(tmp_path, monkeypatch):
    say = "import sys; print('\\n'.join(f'{sys.argv[1]} {i:03d}' for i in range(40)))"
    for life in ("first", "second"):
        with supervise.Processes({}, tmp_path) as procs:
            procs.start("role", [sys.executable, "-c", say, life]).wait(timeout=30)
    text = supervise.read_log(tmp_path / "role.log")
    assert "first 039" in text and "second 039" in text and text.count("started (pid") == 2
    # past the size cap the file rotates: role.log.1 ..., nothing is truncated in place
    monkeypatch.setattr(supervise, "LOG_MAX_BYTES", 400)
    with supervise.Processes({}, tmp_path) as procs:
        procs.start("small", [sys.executable, "-c", say, "third"]).wait(timeout=30)
    parts = sorted(p.name for p in tmp_path.glob("small.log*"))
    assert "small.log.1" in parts and all((tmp_path / p).stat().st_size <= 400 for p in parts)
    assert supervise.read_log(tmp_path / "small.log").splitlines()[-1] == "third 039"
