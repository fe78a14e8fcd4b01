"""A whole deployment on one machine (loopback): the SuperLink role plus sites, as the
deployment test and the quick try run it; the checked run (``flwr run`` plus the real status
and the results) that the ``run`` and ``quick-try`` commands print."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedbip_flower.tools.deploy.commands import (
    ensure_secret,
    fair_threads,
    role_env,
    site_commands,
    superlink_commands,
    thread_env,
)
from fedbip_flower.tools.deploy.common import DEFAULT_CONNECTION, SUPERLINK_PORT, DeployError
from fedbip_flower.tools.deploy.flwrcli import register_node, wait_online
from fedbip_flower.tools.deploy.roles import start_role
from fedbip_flower.tools.deploy.sitedata import SITE_PER_CLASS, site_style, write_site
from fedbip_flower.tools.launch import (
    LaunchError,
    checked_results,
    flower_env,
    flwr_run,
    free_port,
    print_summary,
    run_status,
    write_connection,
)
from fedbip_flower.tools.supervise import Processes, RoleLock, read_log


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
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    sites: dict[int, Processes] = field(default_factory=dict)
    site_stacks: dict[int, contextlib.ExitStack] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.certs, self.keys = self.root / "certs", self.root / "keys"
        self.cli_env = flower_env(self.root / "flwr-home")
        self.address = f"127.0.0.1:{self.port}"

    # -- preparation (the scripts' make-certs.sh / make-node-keys.sh)
    def make_certs(self) -> None:
        run_script("make-certs.sh", str(self.certs), "IP:127.0.0.1,DNS:localhost", env={"FLWR_CERT_BITS": "2048"})

    def make_keys(self, count: int) -> None:
        run_script("make-node-keys.sh", str(self.keys), str(count))

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
        link = self.stack.enter_context(start_role(cmds, role_env(role), role, {"superlink": self.port}))
        write_connection(
            self.root / "flwr-home", self.connection, self.address, str(self.certs / "ca.crt") if self.tls else None
        )
        return link

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
            env = role_env(role, thread_env(threads or fair_threads(num_sites)))
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
    return Path(__file__).resolve().parents[3] / "scripts" / "deploy"


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``scripts/deploy/<name>`` with bash (at most 5 min); its output, or DeployError."""
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


def report_run(run: dict, results: dict) -> int:
    """Print a checked run's results summary and where its outputs are; returns the summary's
    exit code."""
    code = print_summary(results)
    print(f"run {run.get('run-id')} {run.get('status')}; outputs: {Path(results['results_path']).parent}")
    return code


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
    return report_run(run, results)
