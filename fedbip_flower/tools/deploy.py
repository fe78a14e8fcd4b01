"""Multi-site deployment of the FedBiP app: site data, Flower commands, bring-up helpers.

The topology is Flower 1.42's "process isolation" (the same as ``docker/compose.yml``)::

    SuperLink  (Fleet + Control + Runtime APIs on one port; TLS; SuperNode auth)
      +-- flower-superexec          runs the ServerApp      (--root-certificates)
    site N: SuperNode (--isolation process, Runtime API on 127.0.0.1:<9093+N>)
      +-- flower-superexec          runs the site's ClientApp

The scripts in ``scripts/deploy/`` are thin wrappers around this module's command line
(``python -m fedbip_flower.tools.deploy --help``), and ``tests/test_deployment.py`` builds its
loopback deployment from the same functions, so the commands the docs show are the
commands the test runs.

Every role keeps its state in its own folder under the deployment folder (default
``./deploy``): ``superlink/`` (``state.db``, logs, SuperExec secret, ``flwr-home``) and
``site-N/`` (logs, SuperExec secret, ``flwr-home``). ``FLWR_HOME`` of a role is always
``<its folder>/flwr-home``; the ``flwr`` CLI uses ``$FLWR_HOME`` or ``./deploy/flwr-home``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedbip_flower.config import DataConfig
from fedbip_flower.data import shapes
from fedbip_flower.data.loading import DataError, shrink_imagefolder
from fedbip_flower.jsonio import write_json
from fedbip_flower.tools.launch import (
    BIN,
    LaunchError,
    checked_results,
    flower_env,
    flwr_run,
    free_port,
    print_summary,
    project_root,
    run_status,
    wait_for_port,
    write_connection,
)
from fedbip_flower.tools.supervise import Processes, RoleBusy, RoleLock, read_log

SUPERLINK_PORT = 8000
SITE_PORT_BASE = 9093  # site N serves its Runtime API on 127.0.0.1:(9093 + N)
DEFAULT_CONNECTION = "fedbip"
DEFAULT_DEPLOY_DIR = Path("deploy")
SITE_STYLES = shapes.HELDOUT_STYLES  # site N gets SITE_STYLES[(N - 1) % 4] by default
# The app's default data.shots training images per class, plus 8 test images per class: a site
# folder made with the defaults splits into both with the app's defaults.
APP_SHOTS = DataConfig().shots
SITE_TEST_PER_CLASS = 8
SITE_PER_CLASS = APP_SHOTS + SITE_TEST_PER_CLASS


class DeployError(RuntimeError):
    """Bad deployment input (missing certificate, key, data folder, ...)."""


# ----------------------------------------------------------------------------- site data
def site_style(site: int) -> str:
    """Default held-out style (domain) of site ``site`` (1-based): medical, satellite, ..."""
    return SITE_STYLES[(site - 1) % len(SITE_STYLES)]


def write_site(
    out_dir: str | Path,
    style: str,
    per_class: int = SITE_PER_CLASS,
    seed: int = 0,
    resolution: int = 32,
    force: bool = False,
    framing: str = DataConfig().framing,
) -> Path:
    """Write one site's data folder from the bundled benchmark; returns its absolute path.

    The default ``per_class`` (24) is the app's default ``data.shots`` (16) plus 8 test
    images per class; a site needs more images per class than ``data.shots`` to keep a test
    split (see :func:`split_note`).

    Layout (what ``data-dir`` in a node config must name; see ``fedbip_flower.data.loading``)::

        <out_dir>/classes.txt                  class names, one per line (label = line index)
        <out_dir>/train/metadata.csv           file_name,label,domain
        <out_dir>/train/<class>/<style>_<i>.png

    ``label`` is the class id (index into ``shapes.CLASSES``), ``domain`` the style name.
    An existing ``train/`` folder is kept unless ``force``.
    """
    if style not in shapes.STYLES:
        raise DeployError(f"unknown style {style!r}; known: {', '.join(shapes.STYLES)}")
    if per_class < 1:
        raise DeployError(f"per_class must be >= 1, got {per_class}")
    out = Path(out_dir).expanduser().resolve()
    train = out / "train"
    if (train / "metadata.csv").exists():
        if not force:
            raise DeployError(f"{train / 'metadata.csv'} already exists (use force / --force to rewrite)")
        shutil.rmtree(train)
    from PIL import Image

    images, labels, _ = shapes.render_array([style], per_class, seed, resolution, framing=framing)
    slug = style.replace(" ", "-")
    rows = []
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        cls = shapes.CLASSES[int(label)]
        rel = f"{cls}/{slug}_{k:05d}.png"
        (train / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(train / rel)
        rows.append((rel, int(label), style))
    with open(train / "metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "label", "domain"])
        writer.writerows(rows)
    (out / "classes.txt").write_text("\n".join(shapes.CLASSES) + "\n")
    return out


def split_note(per_class: int, shots: int = APP_SHOTS) -> str:
    """How ``per_class`` images per class split with ``data.shots=shots``; a warning if no
    test image would be left."""
    if per_class > shots:
        return f"with data.shots={shots}: {shots} training + {per_class - shots} test image(s) per class"
    fix = f"use --per-class {shots + SITE_TEST_PER_CLASS} or more"
    if per_class >= 2:
        fix += f', or run with --run-config "data.shots={per_class // 2}"'
    return (
        f"WARNING: with data.shots={shots} (the app's default) all {per_class} image(s) per class go "
        f"to training and the site has no test split: its ClientApp will refuse to take part; {fix}"
    )


# ----------------------------------------------------------------------------- commands
def ensure_secret(path: Path) -> Path:
    """A SuperExec shared secret (random, mode 600), created if missing."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def _local(host: str) -> str:
    """The address a process on the same machine dials to reach a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else host


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}")
    return path


def superlink_commands(
    state_dir: Path,
    *,
    port: int = SUPERLINK_PORT,
    host: str = "0.0.0.0",
    certs_dir: Path | None = None,
    node_auth: bool = True,
    secret: Path | None = None,
) -> dict[str, list[str]]:
    """Commands of the SuperLink role: ``superlink`` and ``superexec-serverapp``.

    ``certs_dir`` (``ca.crt``, ``server.pem``, ``server.key`` from make-certs.sh) turns on
    TLS; ``None`` is the insecure quick try (no TLS, no SuperNode authentication).
    ``secret`` (a SuperExec shared secret file) authenticates the ServerApp SuperExec on
    the Runtime API, which shares the public port with the Fleet API.
    """
    state_dir = Path(state_dir).resolve()
    link = [str(BIN / "flower-superlink")]
    execr = [str(BIN / "flower-superexec"), "--runtime-api-address", f"{_local(host)}:{port}"]
    if certs_dir is not None:
        certs_dir = Path(certs_dir).resolve()
        ca = _need(certs_dir / "ca.crt", "CA certificate (make-certs.sh)")
        link += [
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(_need(certs_dir / "server.pem", "server certificate")),
            "--ssl-keyfile",
            str(_need(certs_dir / "server.key", "server key")),
        ]
        if node_auth:
            link.append("--enable-supernode-auth")
        execr += ["--root-certificates", str(ca)]
    else:
        link.append("--insecure")
        execr.append("--insecure")
    link += [
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_dir / "state.db"),
    ]
    if secret is not None:
        link += ["--superexec-auth-secret-file", str(Path(secret).resolve())]
        execr += ["--superexec-auth-secret-file", str(Path(secret).resolve())]
    return {"superlink": link, "superexec-serverapp": execr}


def node_config(site: int, data_dir: Path, num_sites: int = 3, results_dir: Path | None = None) -> str:
    """The SuperNode's ``--node-config``: its data folder, partition, and (``results_dir``)
    where its ClientApp keeps each run's classifier and score."""
    folders = {"data-dir": data_dir, "results-dir": results_dir}
    text = []
    for key, folder in folders.items():
        if folder is None:
            continue
        path = str(Path(folder).resolve())
        if "'" in path or '"' in path:
            raise DeployError(f"the {key} path must not contain quotes: {path}")
        text.append(f"{key}='{path}'")
    return " ".join([*text, f"partition-id={site - 1}", f"num-partitions={max(site, num_sites)}"])


def fair_threads(sites_here: int) -> int:
    """Threads per site when ``sites_here`` sites share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, sites_here))


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that caps a site's compute threads (torch reads it at start)."""
    if not threads:
        return {}
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def site_commands(
    site: int,
    data_dir: Path,
    *,
    superlink: str = f"127.0.0.1:{SUPERLINK_PORT}",
    port: int | None = None,
    root_cert: Path | None = None,
    key: Path | None = None,
    secret: Path | None = None,
    num_sites: int = 3,
    results_dir: Path | None = None,
) -> dict[str, list[str]]:
    """Commands of site ``site``: ``supernode-N`` and ``superexec-clientapp-N``.

    ``root_cert`` (the SuperLink's ``ca.crt``) turns on TLS to the SuperLink; ``None`` is
    the insecure quick try. ``key`` is the site's private SuperNode key (make-node-keys.sh),
    whose ``.pub`` must be registered on the SuperLink. The SuperNode's Runtime API listens
    on 127.0.0.1 only; its ClientApp SuperExec runs on the same machine.
    """
    if site < 1:
        raise DeployError(f"site numbers start at 1, got {site}")
    data_dir = Path(data_dir).resolve()
    if not (data_dir / "train" / "metadata.csv").is_file():
        raise DeployError(
            f"{data_dir} is not a site data folder (no train/metadata.csv); "
            "make one with scripts/deploy/make-site-data.py"
        )
    port = port or SITE_PORT_BASE + site
    node = [str(BIN / "flower-supernode")]
    if root_cert is not None:
        node += ["--root-certificates", str(_need(Path(root_cert).resolve(), "CA certificate"))]
    else:
        node.append("--insecure")
    if key is not None:
        node += ["--auth-supernode-private-key", str(_need(Path(key).resolve(), "SuperNode private key"))]
    node += [
        "--superlink",
        superlink,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config(site, data_dir, num_sites, results_dir),
    ]
    execr = [str(BIN / "flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{port}"]
    if secret is not None:
        node += ["--superexec-auth-secret-file", str(Path(secret).resolve())]
        execr += ["--superexec-auth-secret-file", str(Path(secret).resolve())]
    return {f"supernode-{site}": node, f"superexec-clientapp-{site}": execr}


def role_env(role_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a role's processes: FLWR_HOME=<role_dir>/flwr-home, the Hugging Face
    datasets cache in <role_dir>/hf-datasets-cache (a site's cache of its own data stays in
    its folder), offline HF, no telemetry."""
    role_dir = Path(role_dir).resolve()
    env = flower_env(role_dir / "flwr-home")
    env.setdefault("HF_DATASETS_CACHE", str(role_dir / "hf-datasets-cache"))  # unless set by the user
    env.update(extra or {})
    return env


def cli_home(deploy_dir: Path = DEFAULT_DEPLOY_DIR) -> Path:
    """FLWR_HOME of the ``flwr`` CLI: $FLWR_HOME if set, else <deploy_dir>/flwr-home."""
    return Path(os.environ.get("FLWR_HOME") or Path(deploy_dir) / "flwr-home").resolve()


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One ``flwr`` CLI call, never longer than ``timeout`` seconds (then DeployError)."""
    try:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise DeployError(f"`flwr {' '.join(args[:2])}` did not answer in {timeout:.0f} s") from err


NAMES_FILE = "fedbip-node-names.json"  # in the flwr CLI's FLWR_HOME: node id -> site name


def remember_name(flwr_home: Path, node_id: int, name: str) -> None:
    """Record the site name a node was registered with (``flwr supernode ls`` in Flower 1.42
    does not show it; ``status`` does)."""
    path = Path(flwr_home) / NAMES_FILE
    names = node_names(flwr_home)
    names[str(node_id)] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, names, sort_keys=True)


def node_names(flwr_home: Path) -> dict[str, str]:
    try:
        data = json.loads((Path(flwr_home) / NAMES_FILE).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def register_node(public_key: Path, connection: str, env: dict[str, str], name: str | None = None) -> int:
    """``flwr supernode register``; returns the node id (and records its name under the CLI's
    FLWR_HOME). Raises DeployError on failure."""
    args = ["supernode", "register", str(Path(public_key).resolve()), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    res = flwr_cli(args, env)
    try:
        data = json.loads(res.stdout)
        node_id = int(data["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DeployError(
            f"`flwr supernode register {public_key}` failed ({res.returncode}):\n{res.stdout}{res.stderr}"
        ) from err
    if name and env.get("FLWR_HOME"):
        remember_name(Path(env["FLWR_HOME"]), node_id, name)
    return node_id


def supernodes(connection: str, env: dict[str, str], timeout: float = 60) -> list[dict]:
    """``flwr supernode ls --format json``: one dict per registered node."""
    res = flwr_cli(["supernode", "ls", connection, "--format", "json"], env, timeout)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError as err:
        raise DeployError(f"`flwr supernode ls` failed: {res.stdout}{res.stderr}") from err
    if isinstance(data, dict) and data.get("success") is False:
        raise DeployError(f"`flwr supernode ls` failed: {str(data.get('error-message', ''))[-500:]}")
    nodes = data.get("nodes", []) if isinstance(data, dict) else data
    return [n for n in nodes or [] if isinstance(n, dict)]


def wait_online(connection: str, env: dict[str, str], count: int, timeout: float = 60.0) -> list[dict]:
    """Wait until ``count`` SuperNodes are online; returns them."""
    deadline = time.time() + timeout
    while True:
        try:
            nodes = supernodes(connection, env, timeout=max(10.0, min(60.0, deadline - time.time())))
        except DeployError:
            if time.time() > deadline:
                raise
            nodes = []
        online = [n for n in nodes if n.get("status") == "online"]
        if len(online) >= count:
            return online
        if time.time() > deadline:
            raise DeployError(f"only {len(online)} of {count} SuperNode(s) online after {timeout:.0f} s")
        time.sleep(1.0)


# ----------------------------------------------------------------------------- running roles
@contextlib.contextmanager
def start_role(
    commands: dict[str, list[str]],
    env: dict[str, str],
    role_dir: Path,
    ports: dict[str, int] | None = None,
    startup_timeout: float = 60.0,
    echo: bool = False,
) -> Iterator[Processes]:
    """Start a role's processes in order (waiting for each listed port); stop all on exit.
    Logs go to ``<role_dir>/logs/<name>.log`` (appended, rotated by size)."""
    role_dir = Path(role_dir).resolve()
    with Processes(env, role_dir / "logs", echo=echo) as procs:
        for name, argv in commands.items():
            proc = procs.start(name, argv, cwd=role_dir)
            if ports and name in ports:
                try:
                    wait_for_port(ports[name], proc, startup_timeout)
                except LaunchError as err:
                    raise LaunchError(f"{name}: {err}\n{procs.log(name)[-3000:]}{hint(procs.log(name))}") from err
        yield procs


def hint(log: str) -> str:
    """What a role's log means for its operator, when Flower's own words do not say it."""
    if "Failed to activate SuperNode" in log or "Exit Code: 305" in log:
        return (
            "\nThe SuperLink refused this site: its public key is not registered there (or was registered "
            "on another SuperLink / state.db). Send the .pub file to the SuperLink operator, who runs "
            "scripts/deploy/register-nodes.sh with it (docs/deployment.md, step 5); then start the site again."
        )
    if "Address already in use" in log:
        return "\nAnother process on this machine uses the port: pass --port."
    return ""


def serve(
    commands: dict[str, list[str]], env: dict[str, str], role_dir: Path, ports: dict[str, int] | None = None
) -> int:
    """Run a role in the foreground until Ctrl-C / SIGTERM or until one process exits; its
    processes' output is echoed with a ``[name]`` prefix and kept in its log files."""

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    code = 0
    try:
        with start_role(commands, env, role_dir, ports, echo=True) as procs:
            print(f"running: {', '.join(procs.procs)} (logs in {procs.log_dir}); Ctrl-C stops them", flush=True)
            while True:
                dead = [(n, p.returncode) for n, p in procs.procs.items() if p.poll() is not None]
                if dead:
                    time.sleep(0.5)  # the processes' last words
                    name, code = dead[0]
                    print(f"{name} exited with code {code}; stopping the others", file=sys.stderr, flush=True)
                    why = hint(procs.log(name))
                    if why:
                        print(why.strip(), file=sys.stderr, flush=True)
                    code = code or 1
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, old)
    return code


# ----------------------------------------------------------------------------- a whole deployment
@dataclass
class Deployment:
    """A SuperLink role plus sites on one machine (loopback): the test's and quick try's topology.

    ``tls=True`` makes certificates with ``scripts/deploy/make-certs.sh`` and node keys with
    ``make-node-keys.sh`` (under ``root``), and turns on SuperNode authentication.
    """

    root: Path
    tls: bool = True
    port: int = SUPERLINK_PORT
    connection: str = DEFAULT_CONNECTION
    site_env: dict[str, str] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    sites: dict[int, Processes] = field(default_factory=dict)
    site_stacks: dict[int, contextlib.ExitStack] = field(default_factory=dict)
    link: Processes | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.certs, self.keys = self.root / "certs", self.root / "keys"
        self.cli_env = flower_env(self.root / "flwr-home")
        self.address = f"127.0.0.1:{self.port}"

    # -- preparation (the scripts' make-certs.sh / make-node-keys.sh)
    def make_certs(self) -> None:
        _script("make-certs.sh", str(self.certs), "IP:127.0.0.1,DNS:localhost", env={"FLWR_CERT_BITS": "2048"})

    def make_keys(self, count: int) -> None:
        _script("make-node-keys.sh", str(self.keys), str(count))

    def key(self, site: int) -> Path:
        return self.keys / f"node{site}"

    # -- roles
    def start_superlink(self) -> Processes:
        role = self.root / "superlink"
        self.stack.enter_context(RoleLock(role, "the SuperLink"))
        cmds = superlink_commands(
            role,
            port=self.port,
            host="127.0.0.1",
            certs_dir=self.certs if self.tls else None,
            secret=ensure_secret(role / "superexec.secret"),
        )
        self.link = self.stack.enter_context(start_role(cmds, role_env(role), role, {"superlink": self.port}))
        write_connection(
            self.root / "flwr-home", self.connection, self.address, str(self.certs / "ca.crt") if self.tls else None
        )
        return self.link

    def register(self, site: int) -> int:
        return register_node(self.key(site).with_suffix(".pub"), self.connection, self.cli_env, f"site-{site}")

    def start_site(
        self,
        site: int,
        data_dir: Path,
        key: Path | None = None,
        port: int | None = None,
        num_sites: int = 3,
        wait: bool = True,
        threads: int | None = None,
    ) -> Processes:
        """Start site ``site`` (its own stack, so it can be stopped alone). It keeps its
        results in ``<root>/site-N/results``; ``threads`` (default: a fair share of the cores
        among ``num_sites`` sites) caps its compute threads."""
        self.stop_site(site)
        role = self.root / f"site-{site}"
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(RoleLock(role, f"site {site}"))
            port = port or free_port()
            cmds = site_commands(
                site,
                data_dir,
                superlink=self.address,
                port=port,
                root_cert=self.certs / "ca.crt" if self.tls else None,
                key=(key or self.key(site)) if self.tls else None,
                secret=ensure_secret(role / "superexec.secret"),
                num_sites=num_sites,
                results_dir=role / "results",
            )
            ports = {f"supernode-{site}": port} if wait else {}
            env = role_env(role, {**thread_env(threads or fair_threads(num_sites)), **self.site_env})
            procs = stack.enter_context(start_role(cmds, env, role, ports))
        except BaseException:
            stack.close()
            raise
        self.sites[site], self.site_stacks[site] = procs, stack
        return procs

    def stop_site(self, site: int, sig: int = signal.SIGTERM) -> None:
        """Stop a site: ``SIGKILL`` simulates a crash (no goodbye to the SuperLink)."""
        procs, stack = self.sites.pop(site, None), self.site_stacks.pop(site, None)
        if procs is not None:
            procs.stop_all(sig)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        for site in list(self.sites):
            self.stop_site(site)
        self.stack.close()

    def __enter__(self) -> Deployment:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, name: str) -> str:
        """A process's log (``superlink``, ``supernode-N``, ``superexec-clientapp-N``, ...)."""
        role = "superlink" if name in ("superlink", "superexec-serverapp") else f"site-{name.rsplit('-', 1)[-1]}"
        return read_log(self.root / role / "logs" / f"{name}.log")

    def clientapp_starts(self, site: int) -> int:
        """ClientApp processes started by site ``site``'s SuperExec (one per message it received)."""
        return self.log(f"superexec-clientapp-{site}").count("Start `flwr-clientapp` process")

    # -- runs
    def wait_online(self, count: int, timeout: float = 60.0) -> list[dict]:
        return wait_online(self.connection, self.cli_env, count, timeout)

    def run(self, app: Path, run_config: str, timeout: float = 900, echo: bool = False) -> tuple[int, str]:
        return flwr_run(app, self.connection, self.cli_env, run_config, timeout=timeout, echo=echo)

    def status(self, run_id: int, wait: float = 120) -> dict:
        """The run's ``flwr ls`` record once finished (``run_status`` retries a slow CLI)."""
        return run_status(run_id, self.connection, self.cli_env, wait=wait)


def scripts_dir() -> Path:
    """``scripts/deploy`` of the project (a source checkout)."""
    return Path(__file__).resolve().parents[2] / "scripts" / "deploy"


def _script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    path = scripts_dir() / name
    if not path.is_file():
        raise DeployError(f"{path} not found (the deploy scripts come with the source checkout)")
    res = subprocess.run(
        ["bash", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if res.returncode != 0:
        raise DeployError(f"{name} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


# ----------------------------------------------------------------------------- status
_PHASE = re.compile(r"phase (\d)/4 (\w+)")
_REPLY = re.compile(r"(upload|evaluation) (\d+)/(\d+): (.*)")
_SCORE = re.compile(r"score of (node \d+.*?) \[(\w+)\]: (.*)")
_REJECT = re.compile(r"rejected the upload of (node \d+.*?): (.*)")
_STEPS = re.compile(r"(synthesis \d+/\d+|classifier: epoch \d+/\d+)")


def run_progress(log: str) -> list[str]:
    """What a run's ServerApp log (``flwr log --show``) says so far: the phase, replies,
    rejections, the last synthesis / classifier step, each site's score, the mean."""
    phase, step, replies, rejected, scores, final = "", "", {}, [], [], []
    for line in log.splitlines():
        if m := _PHASE.search(line):
            phase = f"phase {m.group(1)}/4: {m.group(2)}"
        if m := _REPLY.search(line):
            replies[m.group(1)] = f"{m.group(2)} of {m.group(3)} in (last: {m.group(4).strip()})"
        if m := _REJECT.search(line):
            rejected.append(f"  {m.group(1)}: {m.group(2).strip()[:160]}")
        if m := _STEPS.search(line):
            step = m.group(1)
        if m := _SCORE.search(line):
            scores.append(f"  {m.group(1):<40} {m.group(2):<9} {m.group(3).strip()}")
        if "mean accuracy over" in line or "FedBiP run failed" in line or "upload round stopped early" in line:
            final.append("  " + line.split(": ", 1)[-1].strip() if ": " in line else line.strip())
    out = [f"phase: {phase or 'not started (waiting for nodes?)'}" + (f"; last step: {step}" if step else "")]
    out += [f"{kind} replies: {text}" for kind, text in replies.items()]
    if rejected:
        out += ["rejected uploads:", *rejected]
    if scores:
        out += ["scores (accepted sites make the mean):", *scores]
    return out + final


def _seconds(value) -> str:
    try:
        return f"{float(value):.0f} s"
    except (TypeError, ValueError):
        return str(value or "")


def status_report(connection: str, env: dict[str, str], run_id: int | str | None = None) -> str:
    """One screen for the operator: the registered sites (with the names they were registered
    with), the last runs, and the chosen run's progress from its ServerApp log."""
    names = node_names(Path(env.get("FLWR_HOME", "")))
    out = [f"SuperLink connection {connection!r}", "", f"{'node id':>22}  {'site':<12} {'status':<12} since"]
    for n in supernodes(connection, env):
        since = n.get("online-at") if n.get("status") == "online" else (n.get("offline-at") or n.get("created-at"))
        out.append(
            f"{n.get('node-id', '?'):>22}  {names.get(str(n.get('node-id')), '-'):<12} {n.get('status', '?'):<12} {since or ''}"
        )
    res = flwr_cli(["ls", connection, "--format", "json"], env, timeout=60)
    try:
        runs = sorted(json.loads(res.stdout).get("runs", []), key=lambda r: int(r.get("run-id", 0)))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise DeployError(f"`flwr ls` failed: {res.stdout}{res.stderr}") from err
    out += ["", f"runs: {len(runs)}" + (" (the last 5)" if len(runs) > 5 else "")]
    out += [f"  run {r.get('run-id')}: {r.get('status')}, {_seconds(r.get('elapsed'))}" for r in runs[-5:]]
    run_id = int(run_id) if run_id else None
    chosen = next((r for r in runs if int(r.get("run-id", 0)) == run_id), None) if run_id else (runs or [None])[-1]
    if chosen is None:
        return "\n".join(out + ([f"no run {run_id}"] if run_id else []))
    rid = int(chosen["run-id"])
    logs = flwr_cli(["log", str(rid), connection, "--show"], env, timeout=120)
    out += [
        "",
        f"run {rid}: {chosen.get('status')}"
        + (f" ({chosen['status-details']})" if chosen.get("status-details") not in (None, "", "N/A") else ""),
    ]
    out += run_progress(logs.stdout)
    return "\n".join(out)


# ----------------------------------------------------------------------------- checked run
def checked_run(
    app: Path,
    connection: str,
    env: dict[str, str],
    output_dir: Path,
    run_config: str = "",
    timeout: float = 3600,
    echo: bool = True,
) -> tuple[dict, dict]:
    """``flwr run --stream``, then the real status from ``flwr ls`` and the run's results.json.

    Raises LaunchError unless the run is ``finished:completed`` with results.
    """
    output_dir = Path(output_dir).resolve()
    rc = f"output-dir='{output_dir}'" + (f" {run_config}" if run_config else "")
    run_id, _ = flwr_run(app, connection, env, rc, timeout=timeout, echo=echo)
    run = run_status(run_id, connection, env)
    return run, checked_results(run, run_id, output_dir)


def quick_try(
    app: Path,
    deploy_dir: Path,
    num_sites: int = 3,
    per_class: int = SITE_PER_CLASS,
    run_config: str = "",
    timeout: float = 3600,
) -> int:
    """Insecure loopback try: SuperLink + ``num_sites`` sites on this machine, one run, stop all."""
    deploy_dir = Path(deploy_dir).resolve() / "quick-try"
    sites = []
    for n in range(1, num_sites + 1):
        folder = deploy_dir / "sites" / f"site-{n}"
        if not (folder / "train" / "metadata.csv").is_file():
            write_site(folder, site_style(n), per_class)
        sites.append(folder)
    port = free_port()
    with Deployment(deploy_dir, tls=False, port=port, connection="fedbip-quick-try") as dep:
        dep.start_superlink()
        for n, folder in enumerate(sites, 1):
            dep.start_site(n, folder, num_sites=num_sites)
        dep.wait_online(num_sites)
        print(f"SuperLink on {dep.address} (insecure), {num_sites} site(s) online; starting the run", flush=True)
        try:
            rc = f"min-clients={num_sites}" + (f" {run_config}" if run_config else "")
            run, results = checked_run(app, dep.connection, dep.cli_env, deploy_dir / "outputs", rc, timeout)
        except LaunchError as err:
            print(f"\nFedBiP run FAILED: {err}\nlogs: {deploy_dir}/*/logs", file=sys.stderr)
            return 1
    code = print_summary(results)
    print(f"run {run.get('run-id')} {run.get('status')}; outputs: {Path(results['results_path']).parent}")
    return code


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedbip_flower.tools.deploy",
        description="FedBiP multi-site deployment helpers (see docs/deployment.md).",
    )
    p.add_argument(
        "--deploy-dir",
        type=Path,
        default=DEFAULT_DEPLOY_DIR,
        help="deployment folder holding each role's state (default: ./deploy)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "make-site-data",
        help="write a site's data folder from the bundled benchmark",
        description="Write OUT_DIR/train/metadata.csv (file_name,label,domain), "
        "OUT_DIR/train/<class>/*.png and OUT_DIR/classes.txt from the bundled "
        "FedBiP-Shapes benchmark: one style (domain), 10 classes.",
    )
    s.add_argument("out_dir", type=Path, help="the site folder (a node config's data-dir)")
    s.add_argument(
        "style",
        nargs="?",
        default=None,
        help=f"one of: {', '.join(shapes.STYLES)} (default: site N's held-out style, "
        f"N=1..{len(SITE_STYLES)}: {', '.join(SITE_STYLES)})",
    )
    s.add_argument("--site", type=int, default=1, help="site number; picks the default style")
    s.add_argument(
        "--per-class",
        type=int,
        default=SITE_PER_CLASS,
        help=f"images per class (default {SITE_PER_CLASS}: the app's data.shots={APP_SHOTS} "
        f"training + {SITE_TEST_PER_CLASS} test images; use more than data.shots)",
    )
    s.add_argument("--seed", type=int, default=0, help="rendering seed (default 0)")
    s.add_argument("--resolution", type=int, default=32, choices=shapes.SUPPORTED_RESOLUTIONS)
    s.add_argument(
        "--framing", default=DataConfig().framing, choices=tuple(shapes.FRAMINGS), help="object size (data.framing)"
    )
    s.add_argument("--force", action="store_true", help="rewrite an existing folder's train/")

    s = sub.add_parser(
        "shrink-data",
        help="copy an imagefolder at the pipeline's resolution (lossless PNG)",
        description="Copy SRC (train/metadata.csv + images) to DST at --resolution as PNG: "
        "it loads to exactly the same tensors at that data.resolution, and is much smaller.",
    )
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    s.add_argument("--resolution", type=int, default=32)

    s = sub.add_parser("superlink", help="run the SuperLink + ServerApp SuperExec in the foreground")
    s.add_argument("--certs", type=Path, default=None, help="make-certs.sh folder (default: <deploy-dir>/certs)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth (loopback quick try only)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=SUPERLINK_PORT)

    s = sub.add_parser("site", help="run site N's SuperNode + ClientApp SuperExec in the foreground")
    s.add_argument("site", type=int)
    s.add_argument("data_dir", type=Path)
    s.add_argument("--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port")
    s.add_argument(
        "--ca", type=Path, default=None, help="SuperLink CA certificate (default: <deploy-dir>/certs/ca.crt)"
    )
    s.add_argument("--key", type=Path, default=None, help="private node key (default: <deploy-dir>/keys/nodeN)")
    s.add_argument("--port", type=int, default=None, help="Runtime API port (default: 9093 + N)")
    s.add_argument("--num-sites", type=int, default=3)
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of this site (OMP_NUM_THREADS); default: with a loopback SuperLink (all "
        "sites on this machine) cores / --num-sites, else all cores",
    )
    s.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the site keeps each run's classifier and score (default: <deploy-dir>/site-N/results)",
    )
    s.add_argument("--insecure", action="store_true", help="no TLS, no node key (loopback quick try only)")

    s = sub.add_parser("connection", help="write the flwr CLI connection into $FLWR_HOME/config.toml")
    s.add_argument("--name", default=DEFAULT_CONNECTION)
    s.add_argument("--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}")
    s.add_argument("--ca", type=Path, default=None, help="CA certificate (default: <deploy-dir>/certs/ca.crt)")
    s.add_argument("--insecure", action="store_true")

    s = sub.add_parser("register", help="flwr supernode register each public key")
    s.add_argument("public_keys", type=Path, nargs="+")
    s.add_argument("--connection", default=DEFAULT_CONNECTION)

    s = sub.add_parser("run", help="flwr run + real status check + results summary")
    s.add_argument("--connection", default=DEFAULT_CONNECTION)
    s.add_argument("--app", type=Path, default=None)
    s.add_argument("--output-dir", type=Path, default=None, help="default: <deploy-dir>/outputs")
    s.add_argument("--run-config", default="")
    s.add_argument("--timeout", type=float, default=3600)

    s = sub.add_parser(
        "status",
        help="one screen: the sites, the runs, and the latest (or --run-id) run's phase and scores",
        description="Reads the SuperLink through the flwr CLI (flwr supernode ls, flwr ls, flwr log): "
        "works from any machine with a connection; site names come from register's record.",
    )
    s.add_argument("--connection", default=DEFAULT_CONNECTION)
    s.add_argument("--run-id", type=int, default=None, help="default: the latest run")

    s = sub.add_parser("quick-try", help="insecure loopback deployment: 1 SuperLink + N sites, one run, stop")
    s.add_argument("--num-sites", type=int, default=3)
    s.add_argument(
        "--per-class",
        type=int,
        default=SITE_PER_CLASS,
        help=f"images per class in each generated site folder (default {SITE_PER_CLASS})",
    )
    s.add_argument("--app", type=Path, default=None)
    s.add_argument("--run-config", default="")
    s.add_argument("--timeout", type=float, default=3600)

    for name, handler in HANDLERS.items():
        sub.choices[name].set_defaults(handler=handler)
    a = p.parse_args(argv)
    a.deploy_dir = a.deploy_dir.resolve()
    try:
        return a.handler(a)
    except (DeployError, LaunchError, DataError, RoleBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- subcommands
def _make_site_data(a: argparse.Namespace) -> int:
    style = a.style or site_style(a.site)
    out = write_site(a.out_dir, style, a.per_class, a.seed, a.resolution, a.force, a.framing)
    print(
        f"wrote {out} ({len(shapes.CLASSES)} classes x {a.per_class} images, domain {style!r}; {split_note(a.per_class)})"
    )
    return 0


def _shrink_data(a: argparse.Namespace) -> int:
    n = shrink_imagefolder(a.src, a.dst, a.resolution)
    print(f"wrote {n} images at {a.resolution} px to {a.dst}")
    return 0


def _superlink(a: argparse.Namespace) -> int:
    role = a.deploy_dir / "superlink"
    with RoleLock(role, "the SuperLink"):  # a second start is refused before it touches anything
        certs = None if a.insecure else (a.certs or a.deploy_dir / "certs")
        secret = ensure_secret(role / "superexec.secret")
        cmds = superlink_commands(role, port=a.port, host=a.host, certs_dir=certs, secret=secret)
        mode = "INSECURE" if a.insecure else "TLS + SuperNode auth"
        print(f"SuperLink role folder: {role} ({mode})", flush=True)
        return serve(cmds, role_env(role), role, {"superlink": a.port})


def _site(a: argparse.Namespace) -> int:
    dd = a.deploy_dir
    role = dd / f"site-{a.site}"
    with RoleLock(role, f"site {a.site}"):
        port = a.port or SITE_PORT_BASE + a.site
        results = (a.results_dir or role / "results").resolve()
        cmds = site_commands(
            a.site,
            a.data_dir,
            superlink=a.superlink,
            port=port,
            root_cert=None if a.insecure else (a.ca or dd / "certs" / "ca.crt"),
            key=None if a.insecure else (a.key or dd / "keys" / f"node{a.site}"),
            secret=ensure_secret(role / "superexec.secret"),
            num_sites=a.num_sites,
            results_dir=results,
        )
        threads = a.threads or (fair_threads(a.num_sites) if is_loopback(a.superlink) else None)
        print(
            f"site {a.site} role folder: {role}; data {a.data_dir.resolve()}; results {results}; "
            f"SuperLink {a.superlink}; compute threads {threads or os.cpu_count()}",
            flush=True,
        )
        return serve(cmds, role_env(role, thread_env(threads)), role, {f"supernode-{a.site}": port})


def _cli_env(a: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    home = cli_home(a.deploy_dir)
    return home, flower_env(home)


def _connection(a: argparse.Namespace) -> int:
    home, _ = _cli_env(a)
    ca = None if a.insecure else (a.ca or a.deploy_dir / "certs" / "ca.crt").resolve()
    if ca is not None:
        _need(ca, "CA certificate")
    write_connection(home, a.name, a.superlink, str(ca) if ca else None)
    print(f"wrote connection {a.name!r} -> {a.superlink} into {home / 'config.toml'}")
    return 0


def _register(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    for key in a.public_keys:
        node_id = register_node(key, a.connection, env, key.stem.replace("node", "site-"))
        print(f"registered {key} as SuperNode {node_id} on {a.connection!r}")
    return 0


def _run(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    output = a.output_dir or a.deploy_dir / "outputs"
    try:
        run, results = checked_run(a.app or project_root(), a.connection, env, output, a.run_config, a.timeout)
    except LaunchError as err:
        print(f"\nFedBiP run FAILED: {err}", file=sys.stderr)
        return 1
    code = print_summary(results)
    print(f"run {run.get('run-id')} {run.get('status')}; outputs: {Path(results['results_path']).parent}")
    return code


def _status(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    print(status_report(a.connection, env, a.run_id))
    return 0


def _quick_try(a: argparse.Namespace) -> int:
    return quick_try(a.app or project_root(), a.deploy_dir, a.num_sites, a.per_class, a.run_config, a.timeout)


HANDLERS = {
    "make-site-data": _make_site_data,
    "shrink-data": _shrink_data,
    "superlink": _superlink,
    "site": _site,
    "connection": _connection,
    "register": _register,
    "run": _run,
    "status": _status,
    "quick-try": _quick_try,
}


if __name__ == "__main__":
    sys.exit(main())
