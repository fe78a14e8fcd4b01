"""The Flower command lines and environments of each role: the SuperLink role (``flower-superlink``
plus the ServerApp's ``flower-superexec``) and a site (``flower-supernode`` plus its ClientApp's
``flower-superexec``), the SuperExec secret, the node config, and a site's compute threads."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fedbip_flower.tools.deploy.common import SITE_PORT_BASE, SUPERLINK_PORT, DeployError
from fedbip_flower.tools.launch import BIN, flower_env


def ensure_secret(path: Path) -> Path:
    """A SuperExec shared secret (random, mode 600), created if missing."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def need_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else DeployError naming ``what`` is missing."""
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}")
    return path


def _local(host: str) -> str:
    """The address a process on the same machine dials to reach a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else host


def superlink_commands(
    state_dir: Path,
    *,
    port: int = SUPERLINK_PORT,
    host: str = "0.0.0.0",
    certs_dir: Path | None = None,
    secret: Path | None = None,
) -> dict[str, list[str]]:
    """Commands of the SuperLink role: ``superlink`` and ``superexec-serverapp``.

    ``certs_dir`` (``ca.crt``, ``server.pem``, ``server.key`` from make-certs.sh) turns on
    TLS and SuperNode authentication; ``None`` is the insecure quick try (no TLS, no SuperNode
    authentication). ``secret`` (a SuperExec shared secret file) authenticates the ServerApp
    SuperExec on the Runtime API, which shares the public port with the Fleet API.
    """
    state_dir = Path(state_dir).resolve()
    link = [str(BIN / "flower-superlink")]
    execr = [str(BIN / "flower-superexec"), "--runtime-api-address", f"{_local(host)}:{port}"]
    if certs_dir is not None:
        certs_dir = Path(certs_dir).resolve()
        ca = need_file(certs_dir / "ca.crt", "CA certificate (make-certs.sh)")
        link += [
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(need_file(certs_dir / "server.pem", "server certificate")),
            "--ssl-keyfile",
            str(need_file(certs_dir / "server.key", "server key")),
            "--enable-supernode-auth",
        ]
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
    """Whether ``host:port`` names this machine (all sites then share its cores)."""
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
        node += ["--root-certificates", str(need_file(Path(root_cert).resolve(), "CA certificate"))]
    else:
        node.append("--insecure")
    if key is not None:
        node += ["--auth-supernode-private-key", str(need_file(Path(key).resolve(), "SuperNode private key"))]
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
