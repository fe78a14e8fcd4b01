"""A real multi-site deployment on loopback: TLS, SuperNode authentication, process isolation.

One SuperLink (TLS with certificates from ``scripts/deploy/make-certs.sh``,
``--enable-supernode-auth``, runtime dependency installation disabled, ``--isolation
process``) with its ServerApp ``flower-superexec``, and three sites, each a
``flower-supernode --isolation process`` with its own ``flower-superexec`` for the
ClientApp and its own imagefolder (``data-dir`` in the node config): the topology of
``docker/compose.yml``, built with the same functions as ``scripts/deploy/*.sh``
(``fedbip_flower.tools.deploy``). Node keys come from ``make-node-keys.sh`` and are registered
with ``flwr supernode register``. All processes run on 127.0.0.1 (no network namespaces).

The first three tests are fast checks of the helpers and scripts; the others are marked
``slow`` and share one deployment (module-scoped fixture).

``flwr run`` exits 0 even when the run fails, so every check reads the run's real status
(``flwr ls --run-id``) and the ServerApp's ``results.json``.

Node loss: a SuperNode that crashes (SIGKILL) stops sending heartbeats; the SuperLink marks
it offline once ``2 x 30 s`` (Flower 1.42's heartbeat patience x interval) have passed since
its last heartbeat and answers the ServerApp's pending message with a NODE_UNAVAILABLE
error reply, so ``grid.send_and_receive`` returns before ``server.round-timeout``. A SuperNode
that is stopped (SIGTERM) deactivates itself and is reported at once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedbip_flower.data import shapes
from fedbip_flower.tools.deploy import cli, roles
from fedbip_flower.tools.deploy.commands import ensure_secret, site_commands, superlink_commands
from fedbip_flower.tools.deploy.common import DeployError
from fedbip_flower.tools.deploy.deployment import Deployment, scripts_dir
from fedbip_flower.tools.deploy.flwrcli import supernodes
from fedbip_flower.tools.deploy.sitedata import write_site
from fedbip_flower.tools.deploy.status import status_report
from fedbip_flower.tools.launch import find_results, free_port
from tests.helpers import flag

ROOT = Path(__file__).resolve().parents[1]
SITES = (1, 2, 3)
VICTIM = 3  # the site lost in the node-loss tests
PER_CLASS = 4  # images per class in each site folder (10 classes)
SHOTS, TEST_PER_CLASS = 2, 4  # a site folder leaves 2 test images per class (the bundled data would leave 4)
# Not the styles the bundled benchmark would give partition-id N-1 (medical, satellite,
# thermal), so results.json shows that each node read its own folder.
STYLES = {1: "satellite", 2: "thermal", 3: "medical"}
# Backstop only: Flower reports a lost node within ~60 s; a loaded 2-core CI box needs minutes
# for a healthy round (seen: > 240 s while another test suite ran), so keep this generous.
ROUND_TIMEOUT = 900.0
SMALL = (
    f"client.steps=2 data.shots={SHOTS} data.max-test-per-class={TEST_PER_CLASS} "
    "server.inference-steps=2 classifier.epochs=1 server.wait-timeout=60 "
    f"server.round-timeout={ROUND_TIMEOUT}"
)
RUN_TIMEOUT = 1800.0
SHARED: dict[str, dict] = {}  # results handed from one node-loss test to the next


# ----------------------------------------------------------------------------- helpers
def _diag(dep: Deployment, text: str = "") -> str:
    """Log tails for assertion messages."""
    names = ["superlink", "superexec-serverapp"]
    names += [f"{kind}-{n}" for n in SITES for kind in ("supernode", "superexec-clientapp")]
    parts = [f"--- flwr run ---\n{text[-3000:]}"] if text else []
    parts += [f"--- {name} ---\n{dep.log(name)[-1500:]}" for name in names]
    return "\n".join(parts)


def _run(dep: Deployment, out: Path, min_clients: int) -> tuple[dict, dict, str]:
    """``flwr run --stream``; returns (``flwr ls`` record, results.json or {}, CLI output)."""
    run_id, text = dep.run(ROOT, f"output-dir='{out}' min-clients={min_clients} {SMALL}", timeout=RUN_TIMEOUT)
    run = dep.status(run_id, wait=120)
    path = find_results(out, run_id)
    return run, json.loads(path.read_text()) if path else {}, text


class Background(threading.Thread):
    """Run ``fn`` in a thread (``flwr run --stream`` blocks until the run ends)."""

    def __init__(self, fn: Callable[[], tuple[dict, dict, str]]):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test
            self.error = err

    def outcome(self) -> tuple[dict, dict, str]:
        self.join(RUN_TIMEOUT + 180)
        assert not self.is_alive(), "flwr run did not return"
        if self.error is not None:
            raise self.error
        return self.result


def _wait_for_clientapp(dep: Deployment, site: int, baseline: int, bg: Background) -> None:
    """Wait until ``site`` runs a ClientApp for the new run: the instruction has reached it."""
    deadline = time.time() + 900
    while dep.clientapp_starts(site) <= baseline:
        assert bg.is_alive(), f"the run ended before site {site} got its instruction\n{_diag(dep)}"
        assert time.time() < deadline, f"site {site} started no ClientApp in 900 s\n{_diag(dep)}"
        time.sleep(0.5)


def _offline_at(dep: Deployment, node_id: int) -> float:
    """When the SuperLink marked ``node_id`` offline (``flwr supernode ls``; 1 s resolution)."""
    for node in supernodes(dep.connection, dep.cli_env):
        if int(node["node-id"]) == node_id:
            assert node["status"] == "offline", node
            stamp = dt.datetime.strptime(node["offline-at"], "%Y-%m-%d %H:%M:%SZ")
            return stamp.replace(tzinfo=dt.UTC).timestamp()
    raise AssertionError(f"node {node_id} not listed by `flwr supernode ls`")


def _ensure_sites(env: SimpleNamespace) -> None:
    """(Re)start any site that a previous test stopped, then wait until all are online."""
    for n in SITES:
        if n not in env.dep.sites:
            env.dep.start_site(n, env.data[n])
            env.started += list(env.dep.sites[n].procs.values())
    env.dep.wait_online(len(SITES), timeout=300)


# ----------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> SimpleNamespace:
    """SuperLink (TLS + node auth) and three authenticated sites; everything stopped at the end."""
    root = tmp_path_factory.mktemp("deploy")
    started = []
    # The sites share the cores (Deployment.start_site's default threads: cores / sites).
    with Deployment(root, port=free_port()) as dep:
        try:
            dep.make_certs()
            dep.make_keys(len(SITES) + 1)  # node4's key is never registered
            started += list(dep.start_superlink().procs.values())
            node_ids = {n: dep.register(n) for n in SITES}
            data = {n: write_site(root / "data" / f"site-{n}", STYLES[n], PER_CLASS) for n in SITES}
            env = SimpleNamespace(dep=dep, node_ids=node_ids, data=data, started=started, root=root)
            _ensure_sites(env)
            yield env
        finally:
            dep.close()
            alive = [p.args[0] for p in started if p.poll() is None]
            assert not alive, f"processes still running after the deployment stopped: {alive}"


# ----------------------------------------------------------------------------- fast checks
def test_site_folder(tmp_path: Path) -> None:
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.data.loading import NodeConfig, load_client_data

    out = write_site(tmp_path / "site", "thermal", per_class=3)
    rows = (out / "train" / "metadata.csv").read_text().splitlines()
    assert rows[0] == "file_name,label,domain" and len(rows) == 1 + 10 * 3
    assert (out / "classes.txt").read_text().split("\n")[:10] == list(shapes.CLASSES)
    cfg = FedBiPConfig.from_run_config({"data.shots": 2, "data.max-test-per-class": 5})
    data = load_client_data(cfg.data, NodeConfig(0, 3, str(out)), seed=0)
    assert data.domain == "thermal" and data.class_names == list(shapes.CLASSES)
    assert len(data.train_labels) == 20 and len(data.test_labels) == 10
    with pytest.raises(DeployError, match="already exists"):
        write_site(out, "thermal", per_class=3)
    # --framing close-up writes the sites' larger shapes (the rows are class-major, 3 per class)
    from PIL import Image

    from fedbip_flower.tools.deploy.cli import main

    assert (
        main(["make-site-data", str(tmp_path / "close"), "thermal", "--per-class", "3", "--framing", "close-up"]) == 0
    )
    name = (tmp_path / "close" / "train" / "metadata.csv").read_text().splitlines()[1 + 3 * 4 + 1].split(",")[0]
    got = np.asarray(Image.open(tmp_path / "close" / "train" / name).convert("RGB"))
    assert np.array_equal(got, shapes.render_sample("thermal", shapes.CLASSES[4], 1, framing="close-up"))


def test_shrunk_folder_loads_to_the_same_tensors(tmp_path: Path) -> None:
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.data.loading import DataError, NodeConfig, load_client_data, shrink_imagefolder
    from fedbip_flower.tools.deploy.cli import main

    src = write_site(tmp_path / "site", "sketch", per_class=3, resolution=64)
    assert main(["shrink-data", str(src), str(tmp_path / "small"), "--resolution", "32"]) == 0
    cfg = FedBiPConfig.from_run_config({"data.shots": 2, "data.max-test-per-class": 5, "data.resolution": 32})
    a = load_client_data(cfg.data, NodeConfig(0, 1, str(src)), seed=1)
    b = load_client_data(cfg.data, NodeConfig(0, 1, str(tmp_path / "small")), seed=1)
    assert a.class_names == b.class_names and a.domain == b.domain
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_labels, b.test_labels)
    from PIL import Image

    sizes = {Image.open(f).size for f in (tmp_path / "small").rglob("*.png")}
    assert sizes == {(32, 32)} and {Image.open(f).size for f in src.rglob("*.png")} == {(64, 64)}
    with pytest.raises(DataError, match="not empty"):
        shrink_imagefolder(src, tmp_path / "small", 32)


def test_commands_match_the_compose_topology(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    secret = ensure_secret(tmp_path / "s" / "superexec.secret")
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and len(secret.read_text()) == 64
    cmds = superlink_commands(tmp_path / "link", port=8443, certs_dir=certs, secret=secret)
    link, execr = cmds["superlink"], cmds["superexec-serverapp"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert "--disable-runtime-dependency-installation" in link
    assert flag(link, "--isolation") == "process" and flag(link, "--port") == "8443"
    assert flag(link, "--ssl-certfile") == str(certs / "server.pem")
    assert flag(execr, "--root-certificates") == str(certs / "ca.crt") and "--insecure" not in execr
    assert flag(execr, "--runtime-api-address") == "127.0.0.1:8443"
    assert flag(link, "--superexec-auth-secret-file") == flag(execr, "--superexec-auth-secret-file")

    data = write_site(tmp_path / "data" / "site-2", "medical", per_class=1)
    (tmp_path / "node2").write_text("k")
    cmds = site_commands(
        2, data, superlink="link.example.org:8443", root_cert=certs / "ca.crt", key=tmp_path / "node2", secret=secret
    )
    node, execr = cmds["supernode-2"], cmds["superexec-clientapp-2"]
    assert flag(node, "--superlink") == "link.example.org:8443" and "--insecure" not in node
    assert flag(node, "--auth-supernode-private-key") == str(tmp_path / "node2")
    assert flag(node, "--isolation") == "process" and flag(node, "--port") == "9095"
    assert parse_config_args([flag(node, "--node-config")]) == {
        "data-dir": str(data),
        "partition-id": 1,
        "num-partitions": 3,
    }
    assert "--insecure" in execr and flag(execr, "--runtime-api-address") == "127.0.0.1:9095"

    quick = superlink_commands(tmp_path / "link", certs_dir=None)["superlink"]
    assert "--insecure" in quick and "--enable-supernode-auth" not in quick


def test_scripts_print_usage() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    names = [
        "start-superlink.sh",
        "start-site.sh",
        "connect.sh",
        "register-nodes.sh",
        "run.sh",
        "status.sh",
        "quick-try.sh",
    ]
    for name in names:
        res = subprocess.run(
            ["bash", str(scripts_dir() / name), "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0 and "Usage:" in res.stdout, (name, res.stdout, res.stderr)
    res = subprocess.run(
        ["bash", str(scripts_dir() / "start-site.sh")], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert res.returncode == 2 and "Usage:" in res.stderr
    res = subprocess.run(
        [sys.executable, str(scripts_dir() / "make-site-data.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and "metadata.csv" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- deployment
@pytest.mark.slow
def test_unregistered_node_is_refused(deployment: SimpleNamespace) -> None:
    dep = deployment.dep
    procs = dep.start_site(4, deployment.data[1], key=dep.key(4), wait=False)
    deployment.started += list(procs.procs.values())
    try:
        code = procs.procs["supernode-4"].wait(timeout=240)
        log = procs.log("supernode-4")
    finally:
        dep.stop_site(4)
    assert code != 0, log
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log
    online = {int(n["node-id"]) for n in supernodes(dep.connection, dep.cli_env) if n["status"] == "online"}
    assert online == set(deployment.node_ids.values())


@pytest.mark.slow
def test_three_sites_complete(deployment: SimpleNamespace) -> None:
    dep = deployment.dep
    _ensure_sites(deployment)
    run, res, text = _run(dep, deployment.root / "out-three", 3)

    assert run["status"] == "finished:completed", f"{run}\n{_diag(dep, text)}"
    assert res.get("status") == "completed", res.get("error")
    by_id = {c["node_id"]: c for c in res["clients"]}
    assert set(by_id) == set(deployment.node_ids.values())
    for n, node_id in deployment.node_ids.items():
        c = by_id[node_id]
        assert c["status"] == "accepted", c
        assert c["domain"] == STYLES[n], c  # the node read its own data-dir
        assert 0.0 <= c["accuracy"] <= 1.0
        assert c["num_test"] == 10 * (PER_CLASS - SHOTS)
        assert c["num_images"] == 10 * SHOTS and c["upload_bytes"] > 0
    assert res["mean_accuracy"] is not None
    assert res["config"]["model.id"] == "bundled"
    # the registered names reach the ServerApp
    assert {c["name"] for c in res["clients"]} == {f"site-{n}" for n in SITES}

    # each site keeps the classifier it was sent, its own score and the run id, in its folder
    from safetensors.torch import load_file

    run_id = run["run-id"]
    server_weights = load_file(res["classifier_path"])
    for n, node_id in deployment.node_ids.items():
        kept = dep.root / f"site-{n}" / "results" / f"run{run_id}"
        score = json.loads((kept / "score.json").read_text())
        assert score["run_id"] == str(run_id) and score["accuracy"] == by_id[node_id]["accuracy"], score
        assert score["num_test"] == by_id[node_id]["num_test"] and score["domain"] == STYLES[n]
        weights = load_file(str(kept / "classifier.safetensors"))
        assert all(torch.equal(weights[k], server_weights[k]) for k in server_weights)
        site_log = dep.log(f"superexec-clientapp-{n}")
        assert "personalization: step" in site_log and f"accuracy {score['accuracy']:.4f}" in site_log, site_log[-2000:]
        assert "Downloading data" not in site_log  # a local read is not a download
        assert (dep.root / f"site-{n}" / "hf-datasets-cache").is_dir()  # the site's cache stays in its folder

    # the operator follows the run in `flwr run --stream` (the same lines as `flwr log`)
    for line in ("phase 1/4 uploads", "upload 3/3", "phase 2/4 synthesis", "phase 3/4 classifier", "phase 4/4"):
        assert line in text, f"{line!r} not streamed\n{text[-3000:]}"
    assert len(re.findall(r"score of node \d+ \(site-\d", text)) == 3, text[-3000:]

    # and in one screen
    report = status_report(dep.connection, dep.cli_env, run_id)
    assert f"run {run_id}: finished:completed" in report and "phase: phase 4/4" in report, report
    assert all(f"site-{n}" in report for n in SITES) and report.count("accepted ") >= 3, report


@pytest.mark.slow
def test_lost_node_run_completes_with_the_others(deployment: SimpleNamespace) -> None:
    """min-clients=2: a site crashes (SIGKILL) mid-round; the run finishes with the other two."""
    dep, ids = deployment.dep, deployment.node_ids
    _ensure_sites(deployment)
    baseline = dep.clientapp_starts(VICTIM)
    bg = Background(lambda: _run(dep, deployment.root / "out-lost-min2", 2))
    bg.start()
    _wait_for_clientapp(dep, VICTIM, baseline, bg)
    killed_at = time.time()
    dep.stop_site(VICTIM, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    run, res, text = bg.outcome()

    assert run["status"] == "finished:completed", f"{run}\n{_diag(dep, text)}"
    by_id = {c["node_id"]: c for c in res["clients"]}
    lost = by_id[ids[VICTIM]]
    assert lost["status"] == "rejected" and lost["reason"], lost
    assert lost["accuracy"] is None
    for n in SITES:
        if n != VICTIM:
            c = by_id[ids[n]]
            assert c["status"] == "accepted" and 0.0 <= c["accuracy"] <= 1.0, c
    # Flower reported the loss (heartbeat expiry), not FedBiP's round timeout.
    assert res["timings_s"]["clients"] < ROUND_TIMEOUT - 60, res["timings_s"]
    detected = _offline_at(dep, ids[VICTIM]) - killed_at
    print(
        f"\nSIGKILL: node marked offline {detected:.0f} s after the kill; "
        f"upload round took {res['timings_s']['clients']:.0f} s"
    )
    assert -2 <= detected <= 75  # 2 x 30 s after the last heartbeat (sent every 17.5-22.5 s)
    SHARED["lost-min2"] = res


@pytest.mark.slow
def test_lost_node_is_reported_under_its_own_id(deployment: SimpleNamespace) -> None:
    res = SHARED.get("lost-min2")
    assert res, "needs test_lost_node_run_completes_with_the_others"
    by_id = {c["node_id"]: c for c in res["clients"]}
    assert set(by_id) == set(deployment.node_ids.values()), sorted(by_id)
    assert "unavailable" in by_id[deployment.node_ids[VICTIM]]["reason"].lower()


@pytest.mark.slow
def test_lost_node_below_min_clients_fails(deployment: SimpleNamespace) -> None:
    """min-clients=3: a site is stopped (SIGTERM) mid-round; the run fails naming min-clients."""
    dep, ids = deployment.dep, deployment.node_ids
    dep.stop_site(VICTIM)  # (if still up) and restarted with the same registered key:
    _ensure_sites(deployment)
    # its log kept the earlier life's lines: one start header per life, nothing truncated
    assert dep.log(f"supernode-{VICTIM}").count("started (pid") >= 2
    baseline = dep.clientapp_starts(VICTIM)
    bg = Background(lambda: _run(dep, deployment.root / "out-lost-min3", 3))
    bg.start()
    _wait_for_clientapp(dep, VICTIM, baseline, bg)
    stopped_at = time.time()
    dep.stop_site(VICTIM, signal.SIGTERM)  # a clean stop: the SuperNode deactivates itself
    run, res, text = bg.outcome()

    assert run["status"] == "finished:failed", f"{run}\n{_diag(dep, text)}"
    assert res.get("status") == "failed", res
    assert re.search(r"only \d good upload\(s\), min-clients is 3", res["error"]), res["error"]
    assert ids[VICTIM] in {c["node_id"] for c in res["clients"] if c["status"] == "rejected"}
    assert res["timings_s"]["clients"] < ROUND_TIMEOUT - 60, res["timings_s"]
    detected = _offline_at(dep, ids[VICTIM]) - stopped_at
    print(f"\nSIGTERM: node offline {detected:.0f} s after the stop; status-details: {run.get('status-details')}")
    assert -2 <= detected <= 15


def test_a_missing_site_folder_names_a_helper_that_exists(tmp_path):
    with pytest.raises(DeployError, match="not a site data folder") as info:
        site_commands(1, tmp_path / "nowhere")
    helper = re.search(r"scripts/deploy/\S+", str(info.value)).group(0)
    assert (Path(__file__).resolve().parents[1] / helper).is_file(), helper


def test_a_second_start_of_a_running_site_is_refused_before_it_touches_anything(tmp_path, capsys):
    from fedbip_flower.tools.supervise import RoleLock

    data = write_site(tmp_path / "data", "satellite", 2)
    role = tmp_path / "deploy" / "site-1"
    (role / "logs").mkdir(parents=True)
    log = role / "logs" / "supernode-1.log"
    log.write_text("the running site's log\n")
    with RoleLock(role, "site 1"):  # site 1 runs (this process holds its lock)
        code = cli.main(["--deploy-dir", str(tmp_path / "deploy"), "site", "1", str(data), "--insecure"])
    err = capsys.readouterr().err
    assert code == 1 and "site 1 is already running" in err and f"pid {os.getpid()}" in err, err
    assert log.read_text() == "the running site's log\n" and not (role / "superexec.secret").exists()
    with RoleLock(role, "site 1"):  # once stopped, the lock is free again
        pass


def test_the_unregistered_site_hint_names_the_fix():
    text = roles.hint("... Exit Code: 305 ... Failed to activate SuperNode ...")
    assert "not registered" in text and "register-nodes.sh" in text


def test_sites_on_one_machine_share_the_cores_fairly(tmp_path):
    from fedbip_flower.tools.deploy.commands import fair_threads, is_loopback, node_config, thread_env

    cores = os.cpu_count() or 1
    assert fair_threads(1) == cores and fair_threads(3) == max(1, cores // 3) and fair_threads(10**6) == 1
    assert thread_env(2)["OMP_NUM_THREADS"] == "2" and thread_env(None) == {}
    assert is_loopback("127.0.0.1:8000") and is_loopback("localhost:9092") and not is_loopback("10.0.0.2:8000")
    text = node_config(2, tmp_path / "d", 3, tmp_path / "r")
    assert f"results-dir='{(tmp_path / 'r').resolve()}'" in text and "partition-id=1" in text
